"""Kernel cases for benchmarks/kernel_bench.py: vidu_kernels/adaln.py's LayerNorm + adaLN modulation, gated residual and
the fused residual-then-norm, against Block.forward's eager torch expressions, at the real shapes:

  wan2.1-1.3b at 960x544: dim 1536, 60 x 34 = 2040 tokens per latent frame; one frame (a 1-frame chunk) and the
                          preset's chunk of 3 frames
  small (the starter) at its 256x256: dim 320, 16 x 16 = 256 tokens per latent frame, one frame

The dtypes are the model's: the residual stream x float32, the modulation rows [B, F, 1, dim] float32, a linear's
output y bf16, the normalised h cast to the next linear's bf16. (benchmarks/kernel_bench.py puts the repository
root on sys.path for the imports.)
"""
from __future__ import annotations

import torch

from models.config import PRESETS
from vidu_kernels import adaln as A


def shapes() -> list[tuple[str, int, int, int, int]]:
    """(label, B, F, S, dim) of the benchmarked streams."""
    wan = PRESETS["wan2.1-1.3b"].replace(height=544, width=960)
    small = PRESETS["small"]
    return [("wan1.3b 960x544 1 frame", 1, 1, wan.tokens_per_frame(), wan.dit.dim),
            (f"wan1.3b 960x544 {wan.chunk_frames} frames", 1, wan.chunk_frames, wan.tokens_per_frame(), wan.dit.dim),
            (f"small {small.width}x{small.height} 1 frame", 1, 1, small.tokens_per_frame(), small.dit.dim)]


def cases(device: str) -> list[dict]:
    out = []
    g = torch.Generator(device=device).manual_seed(0)
    for label, B, F, S, D in shapes():
        def r(*shape, dtype=torch.float32, scale=1.0):
            return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
        x = r(B, F, S, D, scale=2.0) + 0.5
        y = r(B, F, S, D, dtype=torch.bfloat16)
        shift, scale, gate = (r(B, F, 1, D, scale=0.3) for _ in range(3))
        w, b = r(D, scale=0.1) + 1, r(D, scale=0.1)
        n, mod = B * F * S * D, B * F * D * 4                     # elements of the stream, bytes of one modulation
        bf16 = torch.bfloat16
        out += [
            {"name": f"norm_modulate -> bf16 | {label}",
             "torch": lambda x=x, sh=shift, sc=scale: A.norm_modulate_reference(x, sh, sc, out_dtype=bf16),
             "ours": lambda x=x, sh=shift, sc=scale: A.norm_modulate(x, sh, sc, out_dtype=bf16),
             "bytes": n * (4 + 2) + 2 * mod},
            {"name": f"gated_residual | {label}",
             "torch": lambda x=x, y=y, gt=gate: A.gated_residual_reference(x, y, gt),
             "ours": lambda x=x, y=y, gt=gate: A.gated_residual(x, y, gt),
             "bytes": n * (4 + 2 + 4) + mod},
            {"name": f"gated_residual + norm_modulate -> bf16 | {label}",
             "torch": lambda x=x, y=y, gt=gate, sh=shift, sc=scale:
                 A.gated_residual_norm_modulate_reference(x, y, gt, sh, sc, out_dtype=bf16),
             "ours": lambda x=x, y=y, gt=gate, sh=shift, sc=scale:
                 A.gated_residual_norm_modulate(x, y, gt, sh, sc, out_dtype=bf16),
             "bytes": n * (4 + 2 + 4 + 2) + 3 * mod},
            {"name": f"gated_residual + affine LayerNorm (norm3) -> bf16 | {label}",
             "torch": lambda x=x, y=y, gt=gate, w=w, b=b:
                 A.gated_residual_norm_modulate_reference(x, y, gt, None, None, 1e-6, w, b, out_dtype=bf16),
             "ours": lambda x=x, y=y, gt=gate, w=w, b=b:
                 A.gated_residual_norm_modulate(x, y, gt, None, None, 1e-6, w, b, out_dtype=bf16),
             "bytes": n * (4 + 2 + 4 + 2) + mod + 2 * D * 4},
        ]
    return out
