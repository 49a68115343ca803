"""Kernel cases for benchmarks/kernel_bench.py: vidu_kernels/qk_rope.py's fused RMS q/k norm + RoPE and its RoPE of the
cached keys, against Attention.self_attend's eager torch expressions (the references: RMSNorm, split into heads,
models.rope.apply_rope), at the stream's real shapes, bf16 (the model's dtype):

  wan2.1-1.3b at 960x544: dim 1536 = 12 heads of 128, 60 x 34 = 2040 tokens per latent frame;
                          a chunk of 1 frame against 9 frames of cached keys (window 8 + a 1-frame sink chunk), and
                          the preset's chunk of 3 frames against 11 (window 8 + a 3-frame sink)
  small (the starter) at its 256x256: dim 320 = 5 heads of 64, 16 x 16 = 256 tokens per frame, chunk 1 vs 9

Per shape: the query path (rotated only), the key path (rotated and the pre-RoPE keys the cache keeps) and the
re-rotation of the cached pre-RoPE keys to their positions in the window. The angles are those of real positions
(rope_angles of grid_positions, frames counted from 10^6: hours into a stream). (benchmarks/kernel_bench.py puts the
repository root on sys.path for the imports.)
"""
from __future__ import annotations

import torch

from models.config import PRESETS
from models.rope import grid_positions, rope_angles
from vidu_kernels import qk_rope as Q

WINDOW = 8          # StreamSettings.window: latent frames of history
START = 10 ** 6     # the stream's first frame position in the cases


def shapes() -> list[tuple[str, int, int, int, int, int, int, int]]:
    """(label, B, chunk frames, context frames, h, w, heads, head dim): the chunk's tokens are frames * h * w."""
    wan = PRESETS["wan2.1-1.3b"].replace(height=544, width=960)
    small = PRESETS["small"]
    out = []
    for name, cfg, chunks in (("wan1.3b 960x544", wan, (1, wan.chunk_frames)),
                              (f"small {small.width}x{small.height}", small, (1,))):
        ph, pw = cfg.dit.patch_size[1:]
        h, w = cfg.height // 8 // ph, cfg.width // 8 // pw
        for cf in chunks:
            out.append((f"{name} chunk {cf} vs {WINDOW + cf} cached frames", 1, cf, WINDOW + cf, h, w,
                        cfg.dit.num_heads, cfg.dit.head_dim))
    return out


def cases(device: str) -> list[dict]:
    out = []
    g = torch.Generator(device=device).manual_seed(0)
    bf16 = torch.bfloat16
    for label, B, cf, ctx, h, w, H, D in shapes():
        dim, S = H * D, h * w
        L, Lc = cf * S, ctx * S
        frames = torch.arange(START, START + ctx + cf, device=device)
        ccos, csin = rope_angles(grid_positions(frames[:ctx], h, w), D)
        cos, sin = rope_angles(grid_positions(frames[ctx:], h, w), D)
        x = (torch.randn(B, L, dim, generator=g, device=device) * 2 + 0.5).to(bf16)
        weight = (1 + 0.2 * torch.randn(dim, generator=g, device=device)).to(bf16)
        ck = torch.randn(B, Lc, H, D, generator=g, device=device).to(bf16)
        n, angles = B * L * dim * 2, L * D // 2 * 4 * 2          # bytes of one bf16 [B, L, dim], of cos + sin
        out += [
            {"name": f"q: RMSNorm + RoPE, {H}x{D} | {label}",
             "torch": lambda x=x, wt=weight, c=cos, s=sin, H=H:
                 Q.qk_norm_rope_reference(x, wt, c, s, H, unrotated=False),
             "ours": lambda x=x, wt=weight, c=cos, s=sin, H=H: Q.qk_norm_rope(x, wt, c, s, H, unrotated=False),
             "bytes": 2 * n + angles + dim * 2},
            {"name": f"k: RMSNorm + RoPE + pre-RoPE keys, {H}x{D} | {label}",
             "torch": lambda x=x, wt=weight, c=cos, s=sin, H=H: Q.qk_norm_rope_reference(x, wt, c, s, H),
             "ours": lambda x=x, wt=weight, c=cos, s=sin, H=H: Q.qk_norm_rope(x, wt, c, s, H),
             "bytes": 3 * n + angles + dim * 2},
            {"name": f"cached keys: RoPE of {Lc} tokens | {label}",
             "torch": lambda k=ck, c=ccos, s=csin: Q.rope_reference(k, c, s),
             "ours": lambda k=ck, c=ccos, s=csin: Q.rope(k, c, s),
             "bytes": 2 * B * Lc * dim * 2 + Lc * D // 2 * 4 * 2},
        ]
    return out
