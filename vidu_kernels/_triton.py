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


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def round_bf16(v):
        """float32 v rounded to bfloat16's precision (kept float32), to nearest even by its bits: the same on the
        GPU and in the interpreter, whose own float32 -> bf16 cast truncates (and whose 'rtne' mode rounds half
        up without carrying into the exponent). NaN stays NaN; a cast to bf16 after it is exact."""
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return tl.where(v != v, v, u.to(tl.float32, bitcast=True))

    @triton.jit
    def rounded(v, dtype: tl.constexpr):
        """float32 v rounded to `dtype`'s precision (kept float32), as torch rounds a cast to it."""
        if dtype == tl.bfloat16:
            return round_bf16(v)
        else:
            return v.to(dtype).to(tl.float32)
