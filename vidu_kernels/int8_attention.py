"""Low-bit attention: INT8 Q.K^T with per-block scales and K smoothing, 16-bit P.V (issue 18).

The idea is SageAttention's (written here from the description, no code taken): the scores Q.K^T are the
bulk of attention's multiply work and tolerate 8-bit operands, if
  - K is smoothed first: K - mean_over_keys(K) (per batch and head). Softmax is invariant to adding a constant to
    a row of scores, and q.(k - m) = q.k - q.m shifts each query's row by the constant q.m, so the attention is
    unchanged; but the keys of a DiT share a large common component, and removing it lets 8 bits resolve what
    differs between keys instead of spending them on what all keys share;
  - each block of tokens gets its own scale: symmetric INT8, x_i8 = round(x * 127 / amax(|x| over the block)),
    per block of `block_q` query tokens (one head) and of `block_k` key tokens (one head);
and P.V stays in 16 bits (P rounded to V's bf16/fp16, accumulated in float32).

The softmax scale 1/sqrt(D) and log2(e) (the kernel uses exp2) are folded into Q's scales, so a score is
int32(q_i8 . k_i8) * q_scale[q block] * k_scale[k block], in log2 units.

- `quantize_qk_reference(q, k, block_q, block_k, smooth_k=True)` -> QuantQK: the int8 tensors and float32 scales.
- `int8_attention_reference(q, k, v, block_q, block_k, smooth_k=True)`: the dequantized scores in float32,
  exact softmax and P.V in float32, [B, Lq, H, D] in q's dtype: the oracle of the kernel (same quantization, so
  the kernel matches it up to float32 summation order and, for 16-bit V, P's rounding to V's dtype). Its own
  error against the exact `attention_reference` is the quantization's: a relative L2 of about 1e-2 on random
  data (tests/test_kernel_int8_attention.py measures it).
- `int8_attention(q, k, v, mask=None, block_q=128, block_k=64, smooth_k=True)` -> [B, Lq, H, D] in q's dtype:
  where runs_triton(q, k, v), two small Triton kernels (the keys' column sums in slices, then per key block:
  the mean subtracted, the block's scale, INT8 keys in a [B, H, Lk padded, D padded] buffer) and the attention
  kernel (per batch, head and block of block_q queries: Q loaded once and quantized in registers, then a loop
  over the key blocks with tl.dot(int8, int8) -> int32, an online softmax in float32 and tl.dot(P, V) with
  float32 accumulation; the key tail and query tail masked); elsewhere int8_attention_reference. A mask, or
  dtypes/shapes the kernel does not take (mixed dtypes, D > 256), go to `vidu_kernels.attention.attention`
  (SDPA).

Tensors are tokens-first as everywhere in vidu_kernels: q [B, Lq, H, D], k/v [B, Lk, H, D]; Lq may differ from
Lk (streaming: the chunk's queries against [cached context + chunk] keys), neither need be a multiple of its block.
Head dims are padded to max(32, next power of two) inside the kernel (int8 tensor-core dots need K >= 32), so
any D <= 256 runs. Block sizes: powers of two >= 16.

On the GPU (not yet run on one when this was written; the interpreter checks the math): at the Wan shapes (D 128)
the default launch, 128 x 64 tiles, 8 warps, 3 stages, compiles for sm_90 to int8 wgmma for Q.K^T and bf16 wgmma
for P.V, with the K/V tiles pipelined through cp.async, 196 registers, no spills, 90 KB of shared memory
(tests/test_kernel_int8_attention.py compiles it through ptxas without a GPU). 128 x 128 / 8 warps (~228
registers) and 64 x 64 / 4 warps (175) also compile without spills; 128 x 64 / 4 warps spills. Which is fastest is
for benchmarks/kernel_bench.py on the H200 to say.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vidu_kernels._triton import HAVE_TRITON, runs_triton

if HAVE_TRITON:
    from vidu_kernels._triton import round_bf16
from vidu_kernels.attention import attention
from vidu_kernels.prefix_cache import PrefixCache, prefix_length

LOG2E = 1.4426950408889634
_TINY = 1e-30                    # floor of a block's amax: an all-zero block gets scale ~0 and int8 zeros
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_D = 256


def _f32(x: float) -> float:
    """x rounded to float32, as the kernel receives a float argument."""
    return float(torch.tensor(x, dtype=torch.float32))


def _score_scale(D: int) -> float:
    """What Q's scales carry besides amax/127: the softmax scale and log2(e) (scores in log2 units, for exp2)."""
    return _f32(LOG2E / math.sqrt(D))


# ----------------------------------------------------------------------------------------------- references

class QuantQK(NamedTuple):
    q_i8: torch.Tensor      # int8 [B, H, Lq, D]
    q_scale: torch.Tensor   # float32 [B, H, ceil(Lq / block_q)]: amax / 127 * log2(e) / sqrt(D)
    k_i8: torch.Tensor      # int8 [B, H, Lk, D] (of the smoothed keys)
    k_scale: torch.Tensor   # float32 [B, H, ceil(Lk / block_k)]: amax / 127
    k_mean: torch.Tensor    # float32 [B, H, D]: the mean key subtracted (zeros without smoothing)


def _round_i8(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, then int8: trunc(x + 0.5 sign) in float32, as the kernel does it (a float ->
    int cast truncates on the GPU and in the interpreter alike)."""
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5)).to(torch.int8)


def _quantize_blocks(x: torch.Tensor, block: int, extra: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [B, H, L, D] -> (int8 [B, H, L, D], float32 scales [B, H, ceil(L / block)]): symmetric, one scale
    per block of `block` tokens (the tail block holds the rest), scale = amax / 127 * extra."""
    B, H, L, D = x.shape
    n = -(-L // block)
    xb = F.pad(x, (0, 0, 0, n * block - L)).view(B, H, n, block, D)
    amax = xb.abs().amax(dim=(3, 4)).clamp_min(_TINY)
    xi = _round_i8(xb * (127.0 / amax)[..., None, None]).view(B, H, n * block, D)[:, :, :L]
    return xi, amax / 127.0 * extra


def quantize_qk_reference(q: torch.Tensor, k: torch.Tensor, block_q: int = 128, block_k: int = 64,
                          smooth_k: bool = True, mean_keys: int | None = None) -> QuantQK:
    """q [B, Lq, H, D], k [B, Lk, H, D] (any float dtype) -> QuantQK, heads-first. K smoothing (smooth_k): the mean
    key over the Lk tokens (float32, per batch and head; over the first `mean_keys` when given: a cached context,
    whose quantized blocks then do not depend on the keys after it) is subtracted before K is quantized;
    softmax(Q K^T) is unchanged by it (each query's row of scores moves by the constant q . mean). Q's scales include
    log2(e) / sqrt(D), so q_i8 . k_i8 * q_scale * k_scale is the score in log2 units."""
    D = q.shape[-1]
    qh = q.float().permute(0, 2, 1, 3)
    kh = k.float().permute(0, 2, 1, 3)
    k_mean = kh[:, :, :mean_keys].mean(2) if smooth_k else kh.new_zeros(kh.shape[0], kh.shape[1], D)
    q_i8, q_scale = _quantize_blocks(qh, block_q, _score_scale(D))
    k_i8, k_scale = _quantize_blocks(kh - k_mean[:, :, None], block_k)
    return QuantQK(q_i8, q_scale, k_i8, k_scale, k_mean)


def int8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int = 128,
                             block_k: int = 64, smooth_k: bool = True, mean_keys: int | None = None) -> torch.Tensor:
    """The kernel's math in float32: scores from the quantized Q and (smoothed) K of `quantize_qk_reference`,
    exact softmax (exp2 of the log2-unit scores), P.V with V in float32. [B, Lq, H, D] in q's dtype. Against
    the exact attention (attention_reference) it carries the INT8 quantization error; against the kernel only
    summation order and, for 16-bit V, the kernel's rounding of P to V's dtype. mean_keys: K smoothing's mean over
    the first mean_keys keys only (quantize_qk_reference)."""
    Lq, Lk = q.shape[1], k.shape[1]
    qq = quantize_qk_reference(q, k, block_q, block_k, smooth_k, mean_keys)
    s = torch.einsum("bhqd,bhkd->bhqk", qq.q_i8.float(), qq.k_i8.float())    # exact: integers below 2^24
    qs = qq.q_scale.repeat_interleave(block_q, -1)[..., :Lq]
    ks = qq.k_scale.repeat_interleave(block_k, -1)[..., :Lk]
    s = s * (qs[..., :, None] * ks[..., None, :])
    p = torch.exp2(s - s.amax(-1, keepdim=True))
    out = torch.einsum("bhqk,bkhd->bqhd", p, v.float()) / p.sum(-1).permute(0, 2, 1)[..., None]
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------- kernels

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _to_i8(x):
        """float32 -> int8, rounding half away from zero (the cast itself truncates)."""
        return (x + tl.where(x >= 0, 0.5, -0.5)).to(tl.int8)

    @triton.jit
    def _div(a, b):
        """a / b for scalars, rounded as IEEE (and torch) round it: compiled, Triton's `/` on float32 is the
        approximate division, which would move a few int8 values by one against the reference."""
        return tl.math.div_rn(tl.full([], a, tl.float32), tl.full([], b, tl.float32))

    @triton.jit
    def _key_tile(base, skl, t0, Lk, d, D: tl.constexpr, BLOCK_T: tl.constexpr):
        t = t0 + tl.arange(0, BLOCK_T)
        x = tl.load(base + t[:, None].to(tl.int64) * skl + d[None, :], mask=(t < Lk)[:, None] & (d < D)[None, :],
                    other=0.0)
        return x.to(tl.float32)

    @triton.jit
    def _k_colsum_kernel(k_ptr, skb, skl, skh, part_ptr, Lk, H, CHUNK, NSPLIT,
                         D: tl.constexpr, DP: tl.constexpr, BLOCK_T: tl.constexpr, INTERPRET: tl.constexpr):
        """Program (b*H + h, split): the float32 sum of keys [split*CHUNK, (split+1)*CHUNK) of one head, stored
        at part[b*H + h, split, :DP] (columns past D are 0). CHUNK is a multiple of BLOCK_T."""
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // H
        h = bh % H
        d = tl.arange(0, DP)
        base = k_ptr + b.to(tl.int64) * skb + h * skh
        acc = tl.zeros([BLOCK_T, DP], dtype=tl.float32)
        start = sp * CHUNK
        if INTERPRET:
            # the interpreter cannot take a runtime argument as a range() bound (int() of a one-element numpy
            # array), so it walks the same tiles with a while loop; compiled, the for loop (pipelined)
            t0 = 0
            while t0 < CHUNK:
                acc += _key_tile(base, skl, start + t0, Lk, d, D, BLOCK_T)
                t0 += BLOCK_T
        else:
            for t0 in range(0, CHUNK, BLOCK_T):
                acc += _key_tile(base, skl, start + t0, Lk, d, D, BLOCK_T)
        tl.store(part_ptr + (bh * NSPLIT + sp) * DP + d, tl.sum(acc, 0))

    @triton.jit
    def _quant_k_kernel(k_ptr, skb, skl, skh, part_ptr, ki8_ptr, ks_ptr, mean_ptr, Lk, H, NK, NSPLIT, N_MEAN, FIRST,
                        D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_P2: tl.constexpr,
                        SMOOTH: tl.constexpr):
        """Program (key block j = FIRST + program 0, b*H + h): the block's keys minus the mean key (SMOOTH; the
        mean of the first N_MEAN keys, from their NSPLIT partial sums), scale = amax / 127, int8 keys to
        ki8[b*H + h, j*BLOCK_N + i, :DP] (rows past Lk and columns past D are 0), the scale to ks[b*H + h, j];
        block 0 also stores the mean (float32 [DP]). FIRST > 0 requantizes the blocks from FIRST on only (the
        blocks before it kept from an earlier call: a cached context's)."""
        j = FIRST + tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        d = tl.arange(0, DP)
        t = j * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = (t < Lk)[:, None] & (d < D)[None, :]
        x = tl.load(k_ptr + b.to(tl.int64) * skb + h * skh + t[:, None].to(tl.int64) * skl + d[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        if SMOOTH:
            sp = tl.arange(0, SPLIT_P2)
            parts = tl.load(part_ptr + (bh * NSPLIT + sp)[:, None] * DP + d[None, :], mask=(sp < NSPLIT)[:, None],
                            other=0.0)
            mean = tl.math.div_rn(tl.sum(parts, 0), tl.full([DP], N_MEAN, tl.float32))
            x = tl.where(ok, x - mean[None, :], 0.0)
            if j == 0:
                tl.store(mean_ptr + bh * DP + d, mean)
        amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-30)
        xi = _to_i8(x * _div(127.0, amax))
        tl.store(ki8_ptr + (bh.to(tl.int64) * NK * BLOCK_N + t[:, None]) * DP + d[None, :], xi)
        tl.store(ks_ptr + bh * NK + j, _div(amax, 127.0))

    @triton.jit
    def _attend_block(acc, m_i, l_i, q_i8, q_scale, kb_ptr, ks_ptr, v_base, svl, j, Lk, d, d_ok,
                      DP: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr, EVEN_D: tl.constexpr,
                      PV: tl.constexpr):
        """The online-softmax update with key block j. TAIL: the last, partial block (keys past Lk masked out).
        PV: how P.V multiplies: 0 float32 operands, exact ('ieee'); 1 P rounded to V's 16-bit dtype, tensor
        cores; 2 the interpreter (its tl.dot multiplies bf16 bit patterns as integers): P rounded to bf16 by its
        bits, multiplied in float32."""
        n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(kb_ptr + n[:, None] * DP + d[None, :])                    # padded buffer: no mask
        ks = tl.load(ks_ptr + j)
        s = tl.dot(q_i8, tl.trans(k)).to(tl.float32) * (q_scale * ks)         # int32 -> scores in log2 units
        if TAIL:
            s = tl.where((n < Lk)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))           # finite: every block holds a key, the first is whole
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_base + n[:, None].to(tl.int64) * svl + d[None, :]
        if TAIL:
            if EVEN_D:
                v = tl.load(v_ptrs, mask=(n < Lk)[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs, mask=(n < Lk)[:, None] & d_ok[None, :], other=0.0)
        else:
            if EVEN_D:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        if PV == 0:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        elif PV == 1:
            acc = tl.dot(p.to(v.dtype), v, acc)
        else:
            if v.dtype == tl.bfloat16:
                p16 = round_bf16(p)
            else:
                p16 = p.to(v.dtype).to(tl.float32)
            acc = tl.dot(p16, v.to(tl.float32), acc)
        return acc, m_new, l_i

    @triton.jit
    def _int8_attn_kernel(q_ptr, sqb, sql, sqh, ki8_ptr, ks_ptr, v_ptr, svb, svl, svh, o_ptr, sob, sol, soh,
                          Lq, Lk, H, NK, N_FULL, score_scale,
                          D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          PV: tl.constexpr, BF16_RNE: tl.constexpr, INTERPRET: tl.constexpr):
        """Program (query block i, b*H + h): queries [i*BLOCK_M, (i+1)*BLOCK_M) of one head, quantized here
        (their block's amax; scale * score_scale), against every key block of the int8 key buffer: N_FULL whole
        blocks, then the partial one if Lk is not a multiple of BLOCK_N. Output in o's dtype."""
        i = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        m = i * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, DP)
        m_ok = m < Lq
        d_ok = d < D
        row_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + m[:, None].to(tl.int64) * sql + d[None, :],
                    mask=row_ok, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.max(tl.abs(q), 1), 0), 1e-30)
        q_i8 = _to_i8(q * _div(127.0, amax))
        q_scale = _div(amax, 127.0) * score_scale

        kb_ptr = ki8_ptr + bh.to(tl.int64) * NK * BLOCK_N * DP
        kscale_ptr = ks_ptr + bh * NK
        v_base = v_ptr + b.to(tl.int64) * svb + h * svh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
        if INTERPRET:                                   # as in _k_colsum_kernel: a while loop for the interpreter
            j = 0
            while j < N_FULL:
                acc, m_i, l_i = _attend_block(acc, m_i, l_i, q_i8, q_scale, kb_ptr, kscale_ptr, v_base, svl, j, Lk,
                                              d, d_ok, DP, BLOCK_N, False, D == DP, PV)
                j += 1
        else:
            for j in range(0, N_FULL):
                acc, m_i, l_i = _attend_block(acc, m_i, l_i, q_i8, q_scale, kb_ptr, kscale_ptr, v_base, svl, j, Lk,
                                              d, d_ok, DP, BLOCK_N, False, D == DP, PV)
        if N_FULL < NK:
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q_i8, q_scale, kb_ptr, kscale_ptr, v_base, svl, N_FULL,
                                          Lk, d, d_ok, DP, BLOCK_N, True, D == DP, PV)
        out = acc / l_i[:, None]
        if BF16_RNE:
            out = round_bf16(out)
        tl.store(o_ptr + b.to(tl.int64) * sob + h * soh + m[:, None].to(tl.int64) * sol + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok)


def _padded_d(D: int) -> int:
    return max(32, 1 << (D - 1).bit_length())


def _check_blocks(block_q: int, block_k: int) -> None:
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, not {blk}")


def quantize_k_triton(k: torch.Tensor, block_k: int = 64, smooth_k: bool = True, num_warps: int | None = None,
                      mean_keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keys' side of the kernel: k [B, Lk, H, D] (any strides with the last one 1, else copied) ->
    (int8 [B, H, ceil(Lk / block_k) * block_k, DP] zero-padded (DP = max(32, next power of two >= D)),
    float32 scales [B, H, ceil(Lk / block_k)], float32 mean key [B, H, DP]), as quantize_qk_reference's k_i8,
    k_scale, k_mean (padding aside; mean_keys: the mean of the first mean_keys keys). Two launches: column sums in
    NSPLIT slices of the keys (of the first mean_keys), then one program per key block (the mean from the slices,
    the block's scale, its int8 keys)."""
    if k.stride(-1) != 1:
        k = k.contiguous()
    keys = _KeySide(k, block_k, smooth_k, mean_keys, num_warps)
    return keys.quantize(k, 0)


class _KeySide:
    """The quantized keys of one call, or of a cached context and the calls after it: the mean's partial sums (of
    the first n_mean keys) and the int8 buffer, scales and mean key. `quantize(k, first)` (re)writes the key blocks
    from `first` on, in place; the blocks before it stay as an earlier call wrote them."""

    def __init__(self, k: torch.Tensor, block_k: int, smooth_k: bool, mean_keys: int | None,
                 num_warps: int | None):
        B, Lk, H, D = k.shape
        self.block_k, self.smooth_k, self.D, self.DP = block_k, smooth_k, D, _padded_d(D)
        self.n_mean = Lk if mean_keys is None else mean_keys
        if not 0 < self.n_mean <= Lk:
            raise ValueError(f"mean_keys must be in 1..{Lk}, not {mean_keys}")
        dev = k.device
        self.warps = {} if dev.type != "cuda" else dict(num_warps=num_warps or 4)
        self.k_mean = torch.zeros(B, H, self.DP, dtype=torch.float32, device=dev)
        self.parts, self.nsplit = self.k_mean, 1            # not read without smoothing
        if smooth_k:
            BLOCK_T = 32
            nsplit = max(1, min(16, -(-self.n_mean // 1024)))   # slices of >= 1024 keys, at most 16
            per_split = -(-self.n_mean // nsplit)
            chunk = -(-per_split // BLOCK_T) * BLOCK_T          # keys per slice, whole BLOCK_T tiles
            self.nsplit = -(-self.n_mean // chunk)
            self.parts = torch.empty(B * H, self.nsplit, self.DP, dtype=torch.float32, device=dev)
            _k_colsum_kernel[(B * H, self.nsplit)](k, k.stride(0), k.stride(1), k.stride(2), self.parts, self.n_mean,
                                                   H, chunk, self.nsplit, D=D, DP=self.DP, BLOCK_T=BLOCK_T,
                                                   INTERPRET=dev.type != "cuda", **self.warps)
        self.k_i8 = self.k_scale = None
        self._alloc(B, H, -(-Lk // block_k), dev, 0)
        self.valid = 0                                      # leading blocks the buffers hold (quantize's last NK)

    def _alloc(self, B: int, H: int, NK: int, dev, keep: int) -> None:
        """Buffers for NK key blocks, the first `keep` copied from the old ones."""
        k_i8 = torch.empty(B, H, NK * self.block_k, self.DP, dtype=torch.int8, device=dev)
        k_scale = torch.empty(B, H, NK, dtype=torch.float32, device=dev)
        if keep:
            k_i8[:, :, :keep * self.block_k] = self.k_i8[:, :, :keep * self.block_k]
            k_scale[..., :keep] = self.k_scale[..., :keep]
        self.k_i8, self.k_scale = k_i8, k_scale

    def quantize(self, k: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Key blocks [first, ceil(Lk / block_k)) of k quantized into the buffers (resized to k's blocks, the
        first `first` kept). Returns (k_i8, k_scale, k_mean) for k."""
        B, Lk, H, D = k.shape
        NK = -(-Lk // self.block_k)
        if first > self.valid:
            raise ValueError(f"blocks before {first} were never quantized (the buffers hold {self.valid})")
        if tuple(self.k_scale.shape) != (B, H, NK):
            self._alloc(B, H, NK, k.device, first)
        if NK > first:
            _quant_k_kernel[(NK - first, B * H)](
                k, k.stride(0), k.stride(1), k.stride(2), self.parts, self.k_i8, self.k_scale, self.k_mean, Lk, H,
                NK, self.nsplit, self.n_mean, first, D=D, DP=self.DP, BLOCK_N=self.block_k,
                SPLIT_P2=triton.next_power_of_2(self.nsplit), SMOOTH=self.smooth_k, **self.warps)
        self.valid = NK
        return self.k_i8, self.k_scale, self.k_mean


def attend_quantized_k(q: torch.Tensor, k_i8: torch.Tensor, k_scale: torch.Tensor, v: torch.Tensor, block_q: int,
                       block_k: int, sm_scale: float | None = None, num_warps: int | None = None,
                       num_stages: int | None = None) -> torch.Tensor:
    """The attention kernel on keys already quantized by quantize_k_triton: q [B, Lq, H, D], v [B, Lk, H, D]
    (last stride 1, else copied) -> [B, Lq, H, D] in q's dtype. sm_scale: the softmax scale (1/sqrt(D))."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    B, Lq, H, D = q.shape
    Lk = v.shape[1]
    DP = _padded_d(D)
    NK = -(-Lk // block_k)
    if tuple(k_i8.shape) != (B, H, NK * block_k, DP) or tuple(k_scale.shape) != (B, H, NK):
        raise ValueError(f"quantized keys {tuple(k_i8.shape)} / scales {tuple(k_scale.shape)} do not fit "
                         f"q {tuple(q.shape)}, v {tuple(v.shape)} with block_k {block_k}")
    out = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    interp = q.device.type != "cuda"
    pv = 0 if v.dtype == torch.float32 else 2 if interp else 1
    extra = {} if interp else dict(num_warps=num_warps or (8 if block_q >= 128 else 4), num_stages=num_stages or 3)
    _int8_attn_kernel[(-(-Lq // block_q), B * H)](
        q, q.stride(0), q.stride(1), q.stride(2), k_i8, k_scale, v, v.stride(0), v.stride(1), v.stride(2),
        out, out.stride(0), out.stride(1), out.stride(2), Lq, Lk, H, NK, Lk // block_k, _f32(LOG2E * sm_scale),
        D=D, DP=DP, BLOCK_M=block_q, BLOCK_N=block_k, PV=pv, BF16_RNE=interp and q.dtype == torch.bfloat16,
        INTERPRET=interp, **extra)
    return out


def _kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    B, Lq, H, D = q.shape
    return (q.dtype == k.dtype == v.dtype and q.dtype in _KERNEL_DTYPES and D <= _MAX_D and k.shape == v.shape
            and k.shape[0] == B and k.shape[2] == H and k.shape[3] == D and k.shape[1] > 0)


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                   block_q: int = 128, block_k: int = 64, smooth_k: bool = True, num_warps: int | None = None,
                   num_stages: int | None = None, prefix: torch.Tensor | None = None,
                   cache: PrefixCache | None = None) -> torch.Tensor:
    """Attention with INT8 Q.K^T (per-block scales, K smoothing) and 16-bit P.V: q [B, Lq, H, D], k/v
    [B, Lk, H, D] (bf16, fp16 or fp32; one dtype) -> [B, Lq, H, D] in q's dtype. The Triton kernels where
    runs_triton(q, k, v), else int8_attention_reference. A mask (bool [Lq, Lk]), or tensors the kernel does not
    take (mixed dtypes, D > 256, no keys), go to vidu_kernels.attention.attention (SDPA) instead.
    block_q / block_k: the tokens of one Q / K quantization block, also the kernel's tile (powers of two >= 16);
    num_warps / num_stages: the attention kernel's launch on the GPU (default 8 warps for block_q >= 128, else
    4; 3 stages).
    prefix: the keys k starts with, as their own tensor (k[:, :Lc] equals it; a stream's cached context, which
    every step of a chunk attends to before the chunk's own keys): K smoothing subtracts the mean of these Lc keys
    (not of all Lk), so the int8 blocks of the context do not depend on the keys after it; with `cache`
    (vidu_kernels.prefix_cache.PrefixCache) its whole blocks are quantized once, at the first call, and kept while
    the prefix tensor is unchanged (same tensor, no in-place write since): the next calls quantize only the blocks
    from the last whole context block on. The output is the same with or without the cache (the same blocks from
    the same kernel); the cache keeps the key buffer and rewrites its tail in place each call."""
    _check_blocks(block_q, block_k)
    if mask is not None or not _kernel_takes(q, k, v):
        return attention(q, k, v, mask)
    if q.shape[1] == 0 or q.shape[0] * q.shape[2] == 0:
        return q.new_empty(q.shape)
    n_ctx = prefix_length(prefix, k)
    if not runs_triton(q, k, v):
        return int8_attention_reference(q, k, v, block_q, block_k, smooth_k, n_ctx)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if n_ctx is None or cache is None:
        k_i8, k_scale, _ = quantize_k_triton(k, block_k, smooth_k, num_warps, n_ctx)
    else:
        keys = cache.get(prefix, ("int8 keys", block_k, smooth_k, num_warps),
                         lambda: _KeySide(k, block_k, smooth_k, n_ctx, num_warps))
        k_i8, k_scale, _ = keys.quantize(k, min(keys.valid, n_ctx // block_k))
    return attend_quantized_k(q, k_i8, k_scale, v, block_q, block_k, num_warps=num_warps, num_stages=num_stages)
