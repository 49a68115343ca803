"""Block-sparse attention (vidu_kernels.sparse_attention) against PyTorch SDPA (vidu_kernels.attention.attention)
at Wan 1.3B's streaming shapes, for benchmarks/kernel_bench.py (which puts the repository root on sys.path).

Shapes: 960x544 video -> 60x34 = 2040 tokens per latent frame, 12 heads of 128, bf16, batch 1; the chunk's
queries (1 frame: Lq 2040, or 3 frames: Lq 6120) attend to a 10-frame window of keys (Lk 20400: the reference
frame first, the cached context, the chunk last).

Inputs. On random q/k attention is not sparse at all (the pooled scores are flat, every block is kept), so each
shape is also run on a structured input, `local_qkv`: q and k are the same smooth random function of each token's
(frame, row, column) position plus 30 % noise, random Fourier features of an RBF kernel with length scales of
2 frames, 2 rows and 20 columns, scaled so that a token's score with itself exceeds a far token's by about 12
(attention local in space and time, as in a video DiT; synthetic, not activations of the model). v is random.
"err" is the relative L2 of our output against dense float32 attention on the same bf16 inputs (SDPA's own,
for comparison, is about 2e-3); "kept" (also in the name) is the share of 64x64 tiles computed. "end to end" is
`sparse_attention` as the DiT calls it: the block map (two Triton launches: pooling, selection) and the attention
kernel, all three in the timed call; "kernel only" times the attention kernel on lists built beforehand; "map only"
times the map alone ("torch" there is the torch-op map it replaced, block_mask_reference + block_lists; the outputs
compared are the mask and the kept count per query block).
"""
from __future__ import annotations

import math

import torch

from models.config import PRESETS
from vidu_kernels._triton import runs_triton
from vidu_kernels.attention import attention, attention_reference
from vidu_kernels.sparse_attention import (
    _attend,
    block_lists,
    block_map,
    block_mask_reference,
    kept_fraction,
    sparse_attention,
)

_WAN = PRESETS["wan2.1-1.3b"].replace(height=544, width=960)
H, D = _WAN.dit.num_heads, _WAN.dit.head_dim                 # 12, 128
HW = (_WAN.height // 16, _WAN.width // 16)                     # latent /8, patch /2: 34 x 60 = 2040 tokens
WINDOW = 10                                                    # key frames: reference + context + chunk
assert HW[0] * HW[1] == _WAN.tokens_per_frame()


def local_qkv(B: int, Fq: int, Fk: int, H: int, D: int, hw=HW, scales=(2.0, 2.0, 20.0), contrast: float = 12.0,
              noise: float = 0.3, seed: int = 0, device="cpu", dtype=torch.bfloat16):
    """q [B, Fq*h*w, H, D] (the last Fq frames), k/v [B, Fk*h*w, H, D] with spatially local attention (above)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, w = hw
    f, y, x = torch.meshgrid(*(torch.arange(n, device=device) for n in (Fk, h, w)), indexing="ij")
    pos = torch.stack([f, y, x], -1).reshape(-1, 3).float() / torch.tensor(scales, device=device)
    omega = torch.randn(H, 3, D, generator=g, device=device)
    phase = torch.rand(H, D, generator=g, device=device) * 2 * math.pi
    phi = math.sqrt(2 / D) * torch.cos(torch.einsum("lc,hcd->lhd", pos, omega) + phase)   # |phi| ~ 1
    a = math.sqrt(contrast * math.sqrt(D))                                                  # a^2 / sqrt(D) = contrast

    def tokens(p):
        return (a * (p + noise / math.sqrt(D) * torch.randn(B, *p.shape, generator=g, device=device))).to(dtype)

    Lq = Fq * h * w
    k, q = tokens(phi), tokens(phi[-Lq:])
    v = torch.randn(B, Fk * h * w, H, D, generator=g, device=device).to(dtype)
    return q, k, v


def random_qkv(B, Lq, Lk, H, D, seed=0, device="cpu", dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, L, H, D, generator=g, device=device).to(dtype) for L in (Lq, Lk, Lk)]


def dense_err(out: torch.Tensor, q, k, v) -> float:
    """Relative L2 of out against float32 dense attention, one head at a time (bounded memory)."""
    num = den = 0.0
    for h in range(q.shape[2]):
        sl = slice(h, h + 1)
        ref = attention_reference(q[:, :, sl].float(), k[:, :, sl].float(), v[:, :, sl].float())
        num += float((out[:, :, sl].double() - ref.double()).pow(2).sum())
        den += float(ref.double().pow(2).sum())
    return math.sqrt(num / den)


def cases(device: str) -> list[dict]:
    gpu = device.startswith("cuda")
    # off the GPU a small rehearsal of the plumbing (the launcher falls back to its torch reference)
    heads, d, hw = (H, D, HW) if gpu else (2, 64, (6, 20))
    out = []

    def case(label, q, k, v, keep, block_q=64, block_k=64, mode="end to end"):
        mask = block_mask_reference(q, k, block_q, block_k, keep, always=(0,))
        kept = kept_fraction(mask)
        B, Lq, _, _ = q.shape
        Lk = k.shape[1]
        tiles = "" if (block_q, block_k) == (64, 64) else f" tile{block_q}x{block_k}"
        row = {"name": f"Lq{Lq} Lk{Lk} {label} keep{keep}{tiles} {mode} kept{kept:.0%}", "kept": kept,
               "torch": lambda: attention(q, k, v)}
        if mode == "map only":
            def old_map():
                m = block_mask_reference(q, k, block_q, block_k, keep, always=(0,))
                return m.float(), block_lists(m)[1].float()

            def new_map():
                m, _, cnt = block_map(q, k, block_q, block_k, keep, always=(0,))
                return m.float(), cnt.float()
            row.update(torch=old_map, ours=new_map)
        else:
            if mode == "kernel only" and runs_triton(q, k, v):
                lut, cnt = block_lists(mask)
                ours = lambda: _attend(q, k, v, lut, cnt, block_q, block_k)  # noqa: E731
            elif mode == "kernel only":                # off the kernels: the reference on the given mask
                ours = lambda: sparse_attention(q, k, v, block_q=block_q, block_k=block_k, block_mask=mask)  # noqa: E731
            else:
                ours = lambda: sparse_attention(q, k, v, keep=keep, block_q=block_q, block_k=block_k,  # noqa: E731
                                                always=(0,))
            row.update(ours=ours, flops=4 * B * heads * Lq * Lk * d, err=lambda: dense_err(ours(), q, k, v))
        out.append(row)

    for fq in (_WAN.chunk_frames, 1):                  # the chunk's 3 frames (the stream's setting), then 1
        q, k, v = local_qkv(1, fq, WINDOW, heads, d, hw=hw, device=device)
        for keep in ((0.9, 0.95) if fq > 1 else (0.95,)):
            case("local", q, k, v, keep)
        case("local", q, k, v, 0.95, mode="kernel only")
        if fq > 1:
            case("local", q, k, v, 0.95, mode="map only")
            case("local", q, k, v, 0.95, block_q=128, block_k=64)
    n = hw[0] * hw[1]
    q, k, v = random_qkv(1, n, WINDOW * n, heads, d, device=device)
    case("random", q, k, v, 0.9)                       # not sparse: every tile kept (the map's and kernel's cost)
    case("random", q, k, v, 1.0, mode="kernel only")   # the kernel as a dense flash attention
    return out
