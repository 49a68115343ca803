"""Where a Triton kernel runs: on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (Triton's
interpreter, how the tests check every kernel on a machine without a GPU; set it before the kernel modules
are imported: `triton.jit` reads it when it decorates). Anywhere else a kernel's launcher runs its torch
reference, so every fast path falls back to plain PyTorch off the GPU."""
from __future__ import annotations

import importlib.util
import os

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_triton(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel can run on these tensors (all on one CUDA device, or all on the CPU under
    the interpreter), and should: not when autograd must differentiate through it (the kernels have no
    backward) and not while torch.compile traces (Inductor fuses the reference itself)."""
    if not HAVE_TRITON or not tensors:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.compiler.is_compiling():
        return False
    kinds = {t.device.type for t in tensors}
    return kinds == {"cuda"} or (kinds == {"cpu"} and interpreting())
