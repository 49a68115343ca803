"""W8A8 linear layers with block scales (issue 18): 8-bit weights and activations, float32 accumulation.

Formats: "fp8" (torch.float8_e4m3fn, |q| <= 448) and "int8" (symmetric, |q| <= 127).

Scales
  weights      one float32 scale per 128 x 128 block of W [N, K] (nn.Linear layout), or per output channel and
               128-wide K block (`block_n=1`): scales [ceil(N / block_n), ceil(K / 128)]. Quantized once at load.
  activations  one float32 scale per token and 128-channel group: x [M, K] -> scales [M, ceil(K / 128)].
               Computed and applied in one Triton pass (`quantize_act`: each program loads a BLOCK_M x 128 tile
               once, takes its row amax and writes the 8-bit tile and the scales; no separate amax pass).

GEMM (`w8a8_gemm`): BLOCK_M x BLOCK_N tiles with BLOCK_K = 128 = the scale group, so every K step's partial
product (tl.dot: int32 for int8, float32 for fp8) is multiplied by x_scale[m, kb] * w_scale[n-block, kb] and added
to a float32 accumulator; bias in the epilogue; output in the caller's dtype (bf16 / fp16 / fp32).

Rounding is round-to-nearest-even in both formats, computed in float32 arithmetic before the narrowing cast, so
the kernel and the torch reference quantize bit-identically (the cast itself is then exact). This also sidesteps
Triton 3.6's interpreter, whose float32 -> float8 cast is wrong (it rounds on the first dropped bit only and lets a
rounded-up mantissa 111 carry into the exponent's low bit: 31.6 -> 16.0 instead of 32.0, ~5 % of Gaussian values
differ from torch's cast). The interpreter's float8 loads, float8 -> float32 casts and float8 tl.dot (emulated in
float16) are exact, so both formats run there. On a GPU, float8e4nv tl.dot needs compute capability >= 8.9
(Ada/Hopper); int8 tl.dot >= 8.0. Where the kernels cannot run (CPU without the interpreter, an older GPU for fp8)
the launchers run the torch reference (`runs_triton`, vidu_kernels/_triton.py).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from vidu_kernels._triton import HAVE_TRITON, interpreting, runs_triton

FORMATS: dict[str, tuple[torch.dtype, float]] = {"fp8": (torch.float8_e4m3fn, 448.0), "int8": (torch.int8, 127.0)}
BLOCK = 128      # the K group of activations and the weight block: the GEMM's BLOCK_K
_EPS = 1e-12     # floor of a block's amax, so an all-zero block has a finite scale (its values quantize to 0)


def _fmt(fmt: str) -> tuple[torch.dtype, float]:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, not {fmt!r}")
    return FORMATS[fmt]


def _round_to(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 values already scaled into the format's range -> the 8-bit tensor (round to nearest even)."""
    dtype, qmax = _fmt(fmt)
    if fmt == "int8":
        return torch.round(v).clamp_(-qmax, qmax).to(dtype)
    return v.clamp(-qmax, qmax).to(dtype)


def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    pad = -t.shape[dim] % multiple
    if not pad:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim)


def quantize_weight(w: torch.Tensor, fmt: str, block: int = BLOCK, block_n: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (nn.Linear's layout) -> (wq [N, K] in the format's dtype, scales float32 [ceil(N / block_n),
    ceil(K / block)]), one scale per block_n x block block (block_n None: = block; 1: per output channel).
    w ~= wq * scales expanded to blocks. Done once, when the model is loaded."""
    if w.ndim != 2:
        raise ValueError(f"w must be [N, K], got {tuple(w.shape)}")
    _, qmax = _fmt(fmt)
    block_n = block if block_n is None else block_n
    n, k = w.shape
    wp = _pad_to(_pad_to(w.detach().float(), 0, block_n), 1, block)
    nb, kb = wp.shape[0] // block_n, wp.shape[1] // block
    tiles = wp.view(nb, block_n, kb, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(_EPS)
    inv = qmax / amax
    wq = _round_to(tiles * inv[:, None, :, None], fmt).view(nb * block_n, kb * block)[:n, :k].contiguous()
    return wq, (amax / qmax).contiguous()


def dequantize_weight(wq: torch.Tensor, scales: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The float32 weight [N, K] that (wq, scales) stand for (scales per block, or per channel and K block)."""
    n, k = wq.shape
    block_n = _scale_rows(n, k, scales, block)
    s = scales.float().repeat_interleave(block_n, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return wq.float() * s


def _scale_rows(n: int, k: int, scales: torch.Tensor, block: int) -> int:
    """Rows of W per weight scale: 1 (per channel) or `block`; checks the scales' shape."""
    kb = math.ceil(k / block)
    block_n = 1 if scales.shape[0] == n else block
    if tuple(scales.shape) != (math.ceil(n / block_n), kb):
        raise ValueError(f"weight scales {tuple(scales.shape)} fit neither per-block ({math.ceil(n / block)}, {kb}) "
                         f"nor per-channel ({n}, {kb}) scales of a [{n}, {k}] weight")
    return block_n


def quantize_act_reference(x: torch.Tensor, fmt: str, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] in the format's dtype, scales float32 [M, ceil(K / group)]): one scale per token
    and `group` channels, x ~= xq * scale. The torch oracle of the Triton kernel (same float32 arithmetic)."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    _, qmax = _fmt(fmt)
    m, k = x.shape
    xp = _pad_to(x.float(), 1, group).view(m, -1, group)
    amax = xp.abs().amax(-1).clamp_min(_EPS)
    inv = qmax / amax
    xq = _round_to(xp * inv[..., None], fmt).view(m, -1)[:, :k].contiguous()
    return xq, (amax / qmax).contiguous()


def w8a8_matmul_reference(xq: torch.Tensor, x_scales: torch.Tensor, wq: torch.Tensor, w_scales: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                          group: int = BLOCK) -> torch.Tensor:
    """The GEMM on quantized operands, dequantized to float32: (xq * x_scales) @ (wq * w_scales)^T + bias."""
    m, k = xq.shape
    x = xq.float() * x_scales.float().repeat_interleave(group, 1)[:, :k]
    out = x @ dequantize_weight(wq, w_scales, group).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def w8a8_linear_reference(x: torch.Tensor, wq: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None,
                          fmt: str, group: int = BLOCK) -> torch.Tensor:
    """The oracle of a W8A8 linear: x [..., K] quantized per token and group, times the dequantized weight, in
    float32 -> [..., N] in x's dtype."""
    k = x.shape[-1]
    xq, xs = quantize_act_reference(x.reshape(-1, k), fmt, group)
    out = w8a8_matmul_reference(xq, xs, wq, w_scales, bias, x.dtype, group)
    return out.reshape(*x.shape[:-1], wq.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _round_fp8(v):
        """float32 -> the nearest float8 e4m3 value (ties to even), still in float32: normals keep 3 of the 23
        mantissa bits (integer rounding on the bit pattern, so a carry moves the exponent); below 2**-6 (the
        subnormals, spacing 2**-9) by adding and taking away 1.5 * 2**14, whose float32 spacing is 2**-9. Bit-equal
        to torch's float32 -> float8_e4m3fn cast over [-448, 448], signed zeros included."""
        u = v.to(tl.int32, bitcast=True)
        normal = ((u + 0x7FFFF + ((u >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        sub = ((tl.abs(v) + 24576.0) - 24576.0).to(tl.int32, bitcast=True)
        sub = (sub | (u & -2147483648)).to(tl.float32, bitcast=True)    # v's sign bit: tiny negatives give -0.0
        r = tl.where(tl.abs(v) < 0.015625, sub, normal)
        return tl.minimum(tl.maximum(r, -448.0), 448.0)

    @triton.jit
    def _quant_act_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
                          IS_FP8: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
        """One program: BLOCK_M tokens x one group of GROUP channels, loaded once -> 8-bit values and scales."""
        pid_m = tl.program_id(0)
        g = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = g * GROUP + tl.arange(0, GROUP)
        row_ok = rm < M
        mask = row_ok[:, None] & (rk < K)[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12)
        if IS_FP8:
            inv = 448.0 / amax
            q = _round_fp8(x * inv[:, None]).to(tl.float8e4nv)
            scale = amax / 448.0
        else:
            inv = 127.0 / amax
            r = (x * inv[:, None] + 12582912.0) - 12582912.0      # round half to even: 1.5 * 2**23
            q = tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8)
            scale = amax / 127.0
        tl.store(q_ptr + rm[:, None] * stride_qm + rk[None, :], q, mask=mask)
        tl.store(s_ptr + rm * stride_sm + g, scale, mask=row_ok)

    @triton.jit
    def _w8a8_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, M, N, K: tl.constexpr,
                          stride_xm, stride_xk, stride_xsm, stride_xsk, stride_wn, stride_wk, stride_wsn, stride_wsk,
                          stride_om, stride_on, M_BUCKET,
                          W_ROWS: tl.constexpr, IS_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """out[m, n] = sum_kb (xq[m, kb] . wq[n, kb]) * xs[m, kb] * ws[n // W_ROWS, kb] + bias[n]. M_BUCKET: the
        autotuner's key for M only (unused here). K is a compile-time constant: the loop's trip count is static
        (Triton's interpreter cannot take a runtime scalar as a range() bound either); a layer has one K."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n                     # GROUP_M row tiles walk the N tiles together (L2 reuse)
        first_m = (pid // per_group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows
        pid_n = (pid % per_group) // rows

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm_in = rm % M                                  # rows / columns past the edge load a valid one, never stored
        rn_in = rn % N
        rk = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rm_in[:, None] * stride_xm + rk[None, :] * stride_xk
        w_ptrs = w_ptr + rk[:, None] * stride_wk + rn_in[None, :] * stride_wn     # [BLOCK_K, BLOCK_N] of W^T
        xs_ptrs = xs_ptr + rm_in * stride_xsm
        ws_ptrs = ws_ptr + (rn_in // W_ROWS) * stride_wsn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kb = k0 // BLOCK_K
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_left = K - k0
                a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
                b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
            if IS_INT8:
                part = tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
            else:
                part = tl.dot(a, b)
            xs = tl.load(xs_ptrs + kb * stride_xsk)
            ws = tl.load(ws_ptrs + kb * stride_wsk)
            acc += part * (xs[:, None] * ws[None, :])
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn_in).to(tl.float32)[None, :]
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc, mask=mask)

    def _gpu_configs() -> list:
        c = triton.Config
        return [c({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s) for bm, bn, w, s in (
            (128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4),
            (128, 64, 4, 4), (64, 256, 8, 3), (64, 64, 4, 4), (32, 128, 4, 4), (16, 128, 4, 4), (16, 64, 4, 4))]

    def _prune(configs, named_args, **kwargs):
        """Tiles no taller than the rows need (M bucketed: small M, decode-like, gets small BLOCK_M), and no tiles
        shorter than 64 rows for M >= 1024 (a chunk's tokens: they only add launches' worth of programs and the
        autotuner's compiles)."""
        m = named_args["M"]
        cap = max(16, triton.next_power_of_2(m))
        floor = 64 if m >= 1024 else 0
        kept = [c for c in configs if floor <= c.kwargs["BLOCK_M"] <= cap]
        return kept or configs[-1:]

    _w8a8_gemm_tuned = triton.autotune(configs=_gpu_configs(), key=["M_BUCKET", "N", "K", "IS_INT8", "W_ROWS"],
                                       prune_configs_by={"early_config_prune": _prune})(_w8a8_gemm_kernel)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _kernels_ok(fmt: str, *tensors: torch.Tensor) -> bool:
    """Triton can run this format on these tensors: CUDA (fp8 needs sm_89+, int8 sm_80+) or the interpreter."""
    if not runs_triton(*tensors):
        return False
    dev = tensors[0].device
    if dev.type != "cuda":
        return True
    return _capability(dev.index if dev.index is not None else torch.cuda.current_device()) >= (
        (8, 9) if fmt == "fp8" else (8, 0))


def quantize_act(x: torch.Tensor, fmt: str, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K], scales float32 [M, ceil(K / group)]) in one Triton pass where the kernel runs;
    elsewhere `quantize_act_reference`. Same values either way (bit-identical in the interpreter)."""
    dtype, _ = _fmt(fmt)
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    if not _kernels_ok(fmt, x):
        return quantize_act_reference(x, fmt, group)
    return _quantize_act_launch(x, fmt, group)


def _quantize_act_launch(x: torch.Tensor, fmt: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantization kernel's launch (checks done by the caller)."""
    dtype, _ = FORMATS[fmt]
    m, k = x.shape
    groups = triton.cdiv(k, group)
    xq = torch.empty((m, k), dtype=dtype, device=x.device)
    scales = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, scales
    block_m = 16 if interpreting() else 32
    _quant_act_kernel[(triton.cdiv(m, block_m), groups)](
        x, xq, scales, m, k, x.stride(0), x.stride(1), xq.stride(0), scales.stride(0),
        IS_FP8=fmt == "fp8", GROUP=group, BLOCK_M=block_m, num_warps=4)
    return xq, scales


def w8a8_gemm(xq: torch.Tensor, x_scales: torch.Tensor, wq: torch.Tensor, w_scales: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, group: int = BLOCK,
              config: dict | None = None) -> torch.Tensor:
    """The block-scaled GEMM: xq [M, K] (scales [M, ceil(K / group)]) times wq [N, K] (scales per block or per
    channel and K block) -> [M, N] in out_dtype, float32 accumulation. `config` ({"BLOCK_M", "BLOCK_N",
    "GROUP_M", "num_warps", "num_stages"}) pins the tiles instead of the autotuner (GPU) or the interpreter's
    default. Any operand dtype/stride works (scales with stride 0 too); off-kernel: `w8a8_matmul_reference`."""
    m, k = xq.shape
    n, k2 = wq.shape
    if k2 != k or xq.dtype != wq.dtype or xq.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"operands must share K and an 8-bit dtype: x {tuple(xq.shape)} {xq.dtype}, "
                         f"w {tuple(wq.shape)} {wq.dtype}")
    fmt = "int8" if xq.dtype == torch.int8 else "fp8"
    w_rows = _scale_rows(n, k, w_scales, group)
    if tuple(x_scales.shape) != (m, math.ceil(k / group)):
        raise ValueError(f"activation scales {tuple(x_scales.shape)}, expected ({m}, {math.ceil(k / group)})")
    tensors = (xq, x_scales, wq, w_scales) + ((bias,) if bias is not None else ())
    if not _kernels_ok(fmt, *tensors):
        return w8a8_matmul_reference(xq, x_scales, wq, w_scales, bias, out_dtype, group)
    return _gemm_launch(xq, x_scales, wq, w_scales, bias, out_dtype, group, w_rows, config)


def _gemm_launch(xq: torch.Tensor, x_scales: torch.Tensor, wq: torch.Tensor, w_scales: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype, group: int, w_rows: int,
                 config: dict | None = None) -> torch.Tensor:
    """The GEMM kernel's launch (checks done by the caller)."""
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    args = (xq, x_scales, wq, w_scales, bias if bias is not None else out, out, m, n, k,
            xq.stride(0), xq.stride(1), x_scales.stride(0), x_scales.stride(1), wq.stride(0), wq.stride(1),
            w_scales.stride(0), w_scales.stride(1), out.stride(0), out.stride(1))
    meta = dict(W_ROWS=w_rows, IS_INT8=xq.dtype == torch.int8, HAS_BIAS=bias is not None, EVEN_K=k % group == 0,
                BLOCK_K=group)
    if config is None and not interpreting():
        grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)  # noqa: E731
        _w8a8_gemm_tuned[grid](*args, _m_bucket(m), **meta)
        return out
    c = dict(config or {"BLOCK_M": 16 if m <= 16 else 32, "BLOCK_N": 64, "GROUP_M": 2})
    launch = {key: c.pop(key) for key in ("num_warps", "num_stages") if key in c}
    grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
    _w8a8_gemm_kernel[grid](*args, 0, **meta, **c, **launch)
    return out


def _m_bucket(m: int) -> int:
    """The autotuner's key for M: powers of two up to 256, then steps of 1024 (a new chunk length retunes)."""
    return triton.next_power_of_2(m) if m <= 256 else -(-m // 1024) * 1024


def w8a8_linear(x: torch.Tensor, wq: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None, fmt: str,
                group: int = BLOCK) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: two launches, the activations quantized by the Triton pass (per token
    and group: absmax -> scale, rounded 8-bit values) and the block-scaled GEMM; the checks once, here, not per
    launch (a 1536 x 1536 projection's GPU time is tens of microseconds: host work per call shows). Where the
    kernels cannot run, `w8a8_linear_reference`."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    tensors = (x2, wq, w_scales) + ((bias,) if bias is not None else ())
    if not _kernels_ok(fmt, *tensors):
        return w8a8_linear_reference(x, wq, w_scales, bias, fmt, group)
    if wq.dtype != FORMATS[fmt][0] or wq.shape[1] != k:
        raise ValueError(f"weight {tuple(wq.shape)} {wq.dtype} does not fit x [..., {k}] in {fmt}")
    xq, xs = _quantize_act_launch(x2, fmt, group)
    out = _gemm_launch(xq, xs, wq, w_scales, bias, x.dtype, group, _scale_rows(wq.shape[0], k, w_scales, group))
    return out.reshape(*x.shape[:-1], wq.shape[0])


# torch.compile: `runs_triton` is false while dynamo traces, so a traced `w8a8_linear` would become its torch
# reference (the dequantized float32 matmul, a GEMM in float). As a custom op the linear is one opaque node of the
# compiled graph instead, and at run time the node calls `w8a8_linear` itself: the Triton kernels where they run,
# the reference elsewhere, the same numbers as the uncompiled module. The fake implementation gives only the output's
# shape, dtype and device (for tracing); the math has its one definition above.
@torch.library.custom_op("vidu::w8a8_linear", mutates_args=())
def w8a8_linear_op(x: torch.Tensor, wq: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None, fmt: str,
                   group: int) -> torch.Tensor:
    """`w8a8_linear` as the custom op torch.ops.vidu.w8a8_linear (no autograd: inference only)."""
    return w8a8_linear(x, wq, w_scales, bias, fmt, group)


@w8a8_linear_op.register_fake
def _w8a8_linear_fake(x, wq, w_scales, bias, fmt, group):
    return x.new_empty((*x.shape[:-1], wq.shape[0]))


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightInfo:
    """What `W8A8Linear.weight` answers in place of a float weight: the compute dtype, the device and the
    shape, for code that reads `linear.weight.dtype` (the DiT casts its input to it). Anything else about the
    weight is `dequantize()`'s."""
    dtype: torch.dtype
    device: torch.device
    shape: torch.Size


class W8A8Linear(nn.Module):
    """nn.Linear with 8-bit weights (buffers `weight_q`, `weight_scales` float32) and activations quantized per
    token and 128 channels on every call. Output in the input's dtype. `.to(dtype)` / `.half()` change the compute
    dtype (the bias and `weight.dtype`), never the quantized weights or their float32 scales."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "fp8", bias: bool = True,
                 block: int = BLOCK, per_channel: bool = False, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        qdtype, _ = _fmt(fmt)
        self.in_features, self.out_features, self.fmt, self.block = in_features, out_features, fmt, block
        self.per_channel = per_channel
        rows = out_features if per_channel else math.ceil(out_features / block)
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=qdtype, device=device))
        self.register_buffer("weight_scales", torch.ones(rows, math.ceil(in_features / block), device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("_compute", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "fp8", block: int = BLOCK,
                    per_channel: bool = False) -> "W8A8Linear":
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, fmt, linear.bias is not None, block, per_channel,
                  device=w.device, dtype=w.dtype)
        wq, scales = quantize_weight(w, fmt, block, 1 if per_channel else block)
        mod.weight_q.copy_(wq)
        mod.weight_scales.copy_(scales)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    @property
    def weight(self) -> WeightInfo:
        return WeightInfo(self._compute.dtype, self.weight_q.device, self.weight_q.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] the quantized one stands for."""
        return dequantize_weight(self.weight_q, self.weight_scales, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Through the custom op (one node of a compiled graph, the kernels at run time), unless autograd must
        differentiate through x: the reference then, which it can."""
        if torch.is_grad_enabled() and x.requires_grad:
            return w8a8_linear_reference(x, self.weight_q, self.weight_scales, self.bias, self.fmt, self.block)
        return torch.ops.vidu.w8a8_linear.default(x, self.weight_q, self.weight_scales, self.bias, self.fmt, self.block)

    def _apply(self, fn, recurse=True):
        keep = {"weight_q": self.weight_q, "weight_scales": self.weight_scales}
        super()._apply(fn, recurse)
        for name, old in keep.items():           # a dtype cast is meant for the compute dtype: undo it, losslessly
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        scales = "per-channel x 128" if self.per_channel else f"{self.block}x{self.block} blocks"
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"bias={self.bias is not None}, weight scales: {scales}")


DIT_BLOCK_LINEARS = re.compile(r"(^|\.)blocks\.\d+\.((self_attn|cross_attn|audio_attn)\.(q|k|v|o)|ffn\.[02])$")


def dit_block_linears(name: str, linear: nn.Linear) -> bool:
    """quantize_linears' filter for models/dit.py: the attention projections and the FFN of every block (the
    GEMMs that carry the FLOPs), not the embeddings, the time projection or the head."""
    return DIT_BLOCK_LINEARS.search(name) is not None


def quantize_linears(module: nn.Module, fmt: str = "fp8", filter: Callable[[str, nn.Linear], bool] | None = None,
                     block: int = BLOCK, per_channel: bool = False) -> list[str]:
    """Swap, in place, every nn.Linear under `module` for which filter(dotted name, linear) is true (None: all)
    for a W8A8Linear of it. Returns the names swapped. Weights are quantized here, once."""
    targets = [(name, m) for name, m in module.named_modules()
               if name and isinstance(m, nn.Linear) and (filter is None or filter(name, m))]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, W8A8Linear.from_linear(linear, fmt, block, per_channel))
    return [name for name, _ in targets]
