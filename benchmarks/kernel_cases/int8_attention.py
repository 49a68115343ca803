"""Kernel cases for benchmarks/kernel_bench.py: vidu_kernels/int8_attention.py's INT8 Q.K^T / bf16 P.V attention
against today's path, SDPA through vidu_kernels.attention.attention, at the real shapes of the stream's
self-attention:

  wan2.1-1.3b at 960x544: 12 heads of 128, 60 x 34 = 2040 tokens per latent frame, bf16.
  - chunk of 1 latent frame streaming: Lq = 2040 queries against Lk = 10 frames = 20400 keys (the sliding
    window of 8 history frames, the 1-frame sink chunk, the chunk itself)
  - chunk of 3 frames (the preset's): Lq = 6120 against Lk = 14 frames = 28560 (window 8, sink 3, chunk 3)
  - the first chunk of 3 frames, no history yet: Lq = Lk = 6120

q, k, v are drawn at random (unit normal), k with a common offset per head as the DiT's keys have one (what K
smoothing removes). "err" is the relative L2 of ours against the float32 attention_reference; the bench's own
"rel L2 vs torch" compares with SDPA's bf16 output.

With history (Lk > Lq) each shape also has a "context cached" case: the keys are [context + chunk] as the DiT builds
them, the context's own tensor passed as `prefix` with a PrefixCache (vidu_kernels.prefix_cache), so after the first
call only the key blocks from the context's last whole block on are quantized: a chunk's denoising steps after its
first (the context's int8 blocks are built once per chunk).
"""
from __future__ import annotations

import torch

# benchmarks/kernel_bench.py puts the repository root on sys.path
from models.config import PRESETS
from vidu_kernels.attention import attention, attention_reference
from vidu_kernels.int8_attention import int8_attention
from vidu_kernels.prefix_cache import PrefixCache

WINDOW = 8      # StreamSettings.window: latent frames of history


def shapes(shrink: int = 1) -> list[tuple[str, int, int, int, int, int]]:
    """(label, B, Lq, Lk, H, D) of the benchmarked calls; shrink > 1 divides the tokens per frame (the CPU
    rehearsal, whose fallback materialises the [H, Lq, Lk] scores)."""
    wan = PRESETS["wan2.1-1.3b"].replace(height=544, width=960)
    S, H, D, cf = wan.tokens_per_frame() // shrink, wan.dit.num_heads, wan.dit.head_dim, wan.chunk_frames
    return [(f"wan1.3b 960x544 chunk 1 vs {WINDOW + 2} frames", 1, S, (WINDOW + 2) * S, H, D),
            (f"wan1.3b 960x544 chunk {cf} vs {WINDOW + 2 * cf} frames", 1, cf * S, (WINDOW + 2 * cf) * S, H, D),
            (f"wan1.3b 960x544 chunk {cf}, no history", 1, cf * S, cf * S, H, D)]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def cases(device: str) -> list[dict]:
    out = []
    g = torch.Generator(device=device).manual_seed(0)
    gpu = device.startswith("cuda")
    dt = torch.bfloat16 if gpu else torch.float32
    for label, B, Lq, Lk, H, D in shapes(1 if gpu else 16):
        q = torch.randn(B, Lq, H, D, generator=g, device=device).to(dt)
        k = (torch.randn(B, Lk, H, D, generator=g, device=device)
             + 2 * torch.randn(B, 1, H, D, generator=g, device=device)).to(dt)
        v = torch.randn(B, Lk, H, D, generator=g, device=device).to(dt)
        out.append({
            "name": f"attention {Lq}x{Lk}, {H} heads of {D} | {label}",
            "torch": lambda q=q, k=k, v=v: attention(q, k, v),
            "ours": lambda q=q, k=k, v=v: int8_attention(q, k, v),
            "flops": 4 * B * H * Lq * Lk * D,
            "err": lambda q=q, k=k, v=v: _rel_l2(int8_attention(q, k, v), attention_reference(q, k, v)),
        })
        if Lk > Lq:
            ctx = k[:, :Lk - Lq].clone()                # the context's own tensor (the DiT's rotated KV)
            k_all = torch.cat([ctx, k[:, Lk - Lq:]], 1)
            cache = PrefixCache()
            cached = lambda q=q, k=k_all, v=v, ctx=ctx, cache=cache: int8_attention(q, k, v, prefix=ctx,  # noqa: E731
                                                                                    cache=cache)
            out.append({
                "name": f"attention {Lq}x{Lk}, {H} heads of {D} | {label} | context cached",
                "torch": lambda q=q, k=k, v=v: attention(q, k, v),
                "ours": cached,
                "flops": 4 * B * H * Lq * Lk * D,
                "err": lambda q=q, k=k, v=v, f=cached: _rel_l2(f(), attention_reference(q, k, v)),
            })
    return out
