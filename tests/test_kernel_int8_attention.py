"""vidu_kernels/int8_attention.py: the INT8 Q.K^T attention kernels, run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1; tl.dot on int8 operands works there: numpy's int8 matmul into int32), against the int8
reference on small awkward shapes (head dims 16/32/64, token counts that are not multiples of the blocks, Lq != Lk,
strided views); the reference's own quantization error against the exact attention, with and without K smoothing
on keys that share a large offset; the fallbacks; negative controls (a wrong softmax scale, key scales of the wrong
block, no smoothing) that the comparison must catch; and, without a GPU, that the kernels compile for sm_90
(int8 wgmma, pipelined loads, no register spills)."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import compile_for_hopper
from vidu_kernels import int8_attention as I8
from vidu_kernels._triton import runs_triton
from vidu_kernels.attention import attention, attention_reference
from vidu_kernels.int8_attention import (
    int8_attention,
    int8_attention_reference,
    quantize_qk_reference,
)

B, H = 2, 2
# (D, Lq, Lk, block_q, block_k): tails on both sides, Lq < block, Lk < block, whole blocks, Lq > Lk
SHAPES = [(16, 5, 7, 16, 16), (16, 40, 70, 16, 16), (32, 17, 33, 16, 16), (32, 32, 64, 16, 32),
          (64, 23, 50, 32, 16), (64, 40, 21, 16, 16)]
ROOT = Path(__file__).resolve().parents[1]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# the comparison of the kernel with int8_attention_reference: relative L2 within TOL of its dtype. float32: the
# float32 summation order only (online softmax, the keys' mean in slices). bf16/fp16: P is rounded to V's dtype
# before P.V (the reference keeps it float32) and the output is rounded; both references' outputs are rounded too.
TOL = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 6e-3}


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and got.dtype == want.dtype and rel_l2(got, want) < TOL[want.dtype]


def qkv(D, Lq, Lk, seed, dtype=torch.float32, k_offset=0.0, strided=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g)
    k = torch.randn(B, Lk, H, D, generator=g) + k_offset * torch.randn(B, 1, H, D, generator=g)
    v = torch.randn(B, Lk, H, D, generator=g)
    if strided:                      # views of one [B, L, 3, H, D] projection, as a fused qkv linear gives them
        q = torch.stack([q, q, q], 2).unbind(2)[0]
        k, v = torch.stack([k, v, k], 2).unbind(2)[:2]
        assert not q.is_contiguous() and not k.is_contiguous()
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.fixture
def kernels_only(monkeypatch):
    """Every int8_attention call of the test runs the Triton kernels (counted), never the reference."""
    assert runs_triton(torch.zeros(1)), "the tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1)"
    calls = []
    quant, attend = I8.quantize_k_triton, I8.attend_quantized_k
    monkeypatch.setattr(I8, "int8_attention_reference",
                        lambda *a, **k: pytest.fail("the launcher ran the reference instead of the kernel"))
    monkeypatch.setattr(I8, "quantize_k_triton", lambda *a, **k: calls.append("k") or quant(*a, **k))
    monkeypatch.setattr(I8, "attend_quantized_k", lambda *a, **k: calls.append("attn") or attend(*a, **k))
    yield
    assert "k" in calls and "attn" in calls


@pytest.mark.parametrize("D,Lq,Lk,bq,bk", SHAPES)
def test_kernel_matches_int8_reference_float32(D, Lq, Lk, bq, bk, kernels_only):
    q, k, v = qkv(D, Lq, Lk, seed=D * 100 + Lq, k_offset=3.0, strided=Lq == 17)
    got = int8_attention(q, k, v, block_q=bq, block_k=bk)
    want = int8_attention_reference(q, k, v, bq, bk)
    assert close(got, want), rel_l2(got, want)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype,D,Lq,Lk", [(torch.bfloat16, 64, 23, 50), (torch.bfloat16, 32, 40, 70),
                                           (torch.float16, 16, 17, 33)])
def test_kernel_matches_int8_reference_16bit(dtype, D, Lq, Lk, kernels_only):
    q, k, v = qkv(D, Lq, Lk, seed=7 + D, dtype=dtype, k_offset=3.0)
    got = int8_attention(q, k, v, block_q=16, block_k=16)
    want = int8_attention_reference(q, k, v, 16, 16)
    assert close(got, want), rel_l2(got, want)
    # the kernel's distance to its oracle is well below the quantization's own error against exact attention
    assert rel_l2(got, want) < rel_l2(want, attention_reference(q, k, v)) / 2


def test_quantized_keys_match_reference():
    """quantize_k_triton's int8 keys, scales and mean key are the reference's (padding aside)."""
    D, Lk, bk = 48, 70, 16                                  # D padded to 64 in the buffer
    q, k, _ = qkv(D, 9, Lk, seed=3, k_offset=5.0)
    k_i8, k_scale, k_mean = I8.quantize_k_triton(k, bk)
    ref = quantize_qk_reference(q, k, 16, bk)
    assert k_i8.shape == (B, H, 80, 64) and k_scale.shape == (B, H, 5)
    assert (k_i8[:, :, Lk:] == 0).all() and (k_i8[..., D:] == 0).all()
    diff = (k_i8[:, :, :Lk, :D].int() - ref.k_i8.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3       # a mean summed in another order may move a tie
    torch.testing.assert_close(k_scale, ref.k_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(k_mean[..., :D], ref.k_mean, rtol=1e-5, atol=1e-6)


def test_quantize_reference_layout():
    D, Lq, Lk = 32, 40, 70
    q, k, _ = qkv(D, Lq, Lk, seed=5, k_offset=4.0)
    r = quantize_qk_reference(q, k, 16, 32)
    assert r.q_i8.dtype == r.k_i8.dtype == torch.int8 and r.q_scale.dtype == r.k_scale.dtype == torch.float32
    assert r.q_i8.shape == (B, H, Lq, D) and r.q_scale.shape == (B, H, 3)
    assert r.k_i8.shape == (B, H, Lk, D) and r.k_scale.shape == (B, H, 3)
    assert r.q_i8.abs().max() == 127 and r.k_i8.abs().max() == 127
    # Q's scales carry log2(e) / sqrt(D): q_i8 * q_scale is q in the log2 units of the kernel's exp2
    qd = r.q_i8.float() * r.q_scale.repeat_interleave(16, -1)[..., :Lq, None]
    want = q.permute(0, 2, 1, 3) * math.log2(math.e) / math.sqrt(D)
    assert rel_l2(qd, want) < 1e-2
    kd = r.k_i8.float() * r.k_scale.repeat_interleave(32, -1)[..., :Lk, None] + r.k_mean[:, :, None]
    assert rel_l2(kd, k.permute(0, 2, 1, 3)) < 1e-2
    torch.testing.assert_close(r.k_mean, k.mean(1))


@pytest.mark.parametrize("D,Lq,Lk,bq,bk", SHAPES)
def test_int8_reference_error_vs_exact(D, Lq, Lk, bq, bk):
    """The quantization's own error on random data (measured: relative L2 0.6-1.1e-2)."""
    q, k, v = qkv(D, Lq, Lk, seed=D + Lk)
    err = rel_l2(int8_attention_reference(q, k, v, bq, bk), attention_reference(q, k, v))
    assert 1e-4 < err < 2e-2


def test_k_smoothing_matters(kernels_only):
    """Keys sharing a large offset (x20 their spread): smoothing removes it, so the error stays that of plain keys;
    without smoothing the int8 keys spend their bits on the offset and the error is many times larger. The exact
    attention does not change with the offset (a per-row constant); the kernel with smoothing stays small too."""
    D, Lq, Lk = 64, 40, 70
    q, k, v = qkv(D, Lq, Lk, seed=11)
    off = 20 * torch.randn(B, 1, H, D, generator=torch.Generator().manual_seed(12))
    exact = attention_reference(q, k + off, v)
    assert rel_l2(exact, attention_reference(q, k, v)) < 1e-5
    smooth = rel_l2(int8_attention_reference(q, k + off, v, 16, 16), exact)
    raw = rel_l2(int8_attention_reference(q, k + off, v, 16, 16, smooth_k=False), exact)
    assert smooth < 2e-2 and raw > 5 * smooth, (smooth, raw)
    assert rel_l2(int8_attention(q, k + off, v, block_q=16, block_k=16), exact) < 2e-2


# ----------------------------------------------------------------------------------------------- negative controls

def test_negative_controls_are_caught():
    """Broken variants of the kernel, each run for real, must fail the comparison the tests use."""
    D, Lq, Lk, bq, bk = 32, 40, 70, 16, 16
    q, k, v = qkv(D, Lq, Lk, seed=21, k_offset=20.0)
    want = int8_attention_reference(q, k, v, bq, bk)
    k_i8, k_scale, _ = I8.quantize_k_triton(k, bk)
    assert close(I8.attend_quantized_k(q, k_i8, k_scale, v, bq, bk), want)
    wrong_scale = I8.attend_quantized_k(q, k_i8, k_scale, v, bq, bk, sm_scale=1.1 / math.sqrt(D))
    assert not close(wrong_scale, want), rel_l2(wrong_scale, want)
    wrong_block = I8.attend_quantized_k(q, k_i8, k_scale.roll(1, -1), v, bq, bk)
    assert not close(wrong_block, want), rel_l2(wrong_block, want)
    k_raw, s_raw, _ = I8.quantize_k_triton(k, bk, smooth_k=False)
    unsmoothed = I8.attend_quantized_k(q, k_raw, s_raw, v, bq, bk)
    assert not close(unsmoothed, want), rel_l2(unsmoothed, want)
    # and the unsmoothed kernel is what the unsmoothed reference says
    assert close(unsmoothed, int8_attention_reference(q, k, v, bq, bk, smooth_k=False))


# ----------------------------------------------------------------------------------------------- fallbacks

def test_fallback_without_triton(monkeypatch):
    """Where runs_triton says no (a CPU without the interpreter), the launcher runs the reference, no kernel."""
    monkeypatch.setattr(I8, "runs_triton", lambda *t: False)
    monkeypatch.setattr(I8, "quantize_k_triton", lambda *a, **k: pytest.fail("kernel launched"))
    monkeypatch.setattr(I8, "attend_quantized_k", lambda *a, **k: pytest.fail("kernel launched"))
    q, k, v = qkv(32, 17, 33, seed=31, dtype=torch.bfloat16)
    got = int8_attention(q, k, v, block_q=16, block_k=16)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert torch.equal(got, int8_attention_reference(q, k, v, 16, 16))


def test_mask_and_untaken_inputs_go_to_sdpa(monkeypatch):
    monkeypatch.setattr(I8, "quantize_k_triton", lambda *a, **k: pytest.fail("kernel launched"))
    q, k, v = qkv(32, 17, 33, seed=41)
    mask = torch.rand(17, 33, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0] = True
    assert torch.equal(int8_attention(q, k, v, mask), attention(q, k, v, mask))
    q64, k64, v64 = q.double(), k.double(), v.double()                   # a dtype the kernel does not take
    assert torch.equal(int8_attention(q64, k64, v64), attention(q64, k64, v64))
    with pytest.raises(ValueError, match="power of two"):
        int8_attention(q, k, v, block_q=24)


def test_empty_queries():
    q, k, v = qkv(32, 0, 9, seed=1)
    assert int8_attention(q, k, v).shape == (B, 0, H, 32)


# ----------------------------------------------------------------------------------------------- the GPU build

COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from vidu_kernels import int8_attention as I8
    fn = I8._int8_attn_kernel
    sig = dict(q_ptr="*bf16", sqb="i32", sql="i32", sqh="i32", ki8_ptr="*i8", ks_ptr="*fp32", v_ptr="*bf16",
               svb="i32", svl="i32", svh="i32", o_ptr="*bf16", sob="i32", sol="i32", soh="i32", Lq="i32", Lk="i32",
               H="i32", NK="i32", N_FULL="i32", score_scale="fp32", D="constexpr", DP="constexpr",
               BLOCK_M="constexpr", BLOCK_N="constexpr", PV="constexpr", BF16_RNE="constexpr", INTERPRET="constexpr")
    # what the JIT specialises at the real shapes: 16-byte aligned pointers, strides H*D, D divisible by 16
    div16 = [n for n, t in sig.items() if t.startswith("*")] + "sqb sql sqh svb svl svh sob sol soh".split()
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    consts = dict(D=128, DP=128, BLOCK_M=128, BLOCK_N=64, PV=1, BF16_RNE=False, INTERPRET=False)
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=8, num_stages=3))
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    info = ptxas_info(ptx)
    print("INT8_WGMMA", ptx.count("wgmma.mma_async.sync.aligned") and ptx.count(".s32.s8.s8"))
    print("ASYNC_COPIES", ttgir.count("async_copy_global_to_local"))
    print("PTXAS", " | ".join(line.strip() for line in info.splitlines() if "registers" in line or "spill" in line))
""")


def test_kernel_compiles_for_hopper():
    """Without a GPU: the attention kernel at the Wan shapes (D 128, 128 x 64 tiles, 8 warps, 3 stages) compiles
    for sm_90 through ptxas, with int8 wgmma instructions for Q.K^T, the key/value loads pipelined (cp.async) and no
    register spills. (Measured: 196 registers, 90 KB shared memory.)"""
    out = dict(line.split(" ", 1) for line in compile_for_hopper(COMPILE).splitlines() if " " in line)
    assert int(out["INT8_WGMMA"]) > 0
    assert int(out["ASYNC_COPIES"]) > 0
    assert "0 bytes spill stores" in out["PTXAS"], out["PTXAS"]
