"""vidu_kernels/w8a8.py in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): the activation
quantization kernel and the block-scaled GEMM against their torch references (same quantization, so tightly),
the references against float32 (bounded quantization error), per-block against per-tensor scales with outliers,
the modules, the fallback, and negative controls that the comparisons catch a wrong kernel. Both formats run in
the interpreter (the kernel rounds in float32 before its float8 cast, which the interpreter gets wrong alone)."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn as nn

from models.config import PRESETS
from models.dit import DiT
from tests.conftest import compile_for_hopper, count_launches
from vidu_kernels import w8a8 as Q
from vidu_kernels._triton import runs_triton

FMTS = ("int8", "fp8")
M_S, K_S, N_S = (1, 7, 33), (128, 200, 384), (96, 130)
GEMM_TOL = 2e-6          # relative L2 of kernel vs reference on the same quantized operands: float32 summation order


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q


def data(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5,
            torch.randn(n, generator=g) * 0.1)


@pytest.fixture(autouse=True)
def interpreter():
    if not runs_triton(torch.zeros(1)):
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1)")


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m,k", [(1, 128), (7, 200), (33, 384), (40, 70)])
def test_quantize_act_kernel_matches_reference(fmt, m, k):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) * 3
    x[:, :5] *= 40                                               # one group much louder than the others
    xq, xs = Q.quantize_act(x, fmt)
    rq, rs = Q.quantize_act_reference(x, fmt)
    assert xq.dtype == Q.FORMATS[fmt][0] and xs.shape == (m, -(-k // 128)) and xs.dtype == torch.float32
    assert torch.equal(bits(xq), bits(rq)) and torch.equal(xs, rs)
    deq = xq.float() * xs.repeat_interleave(128, 1)[:, :k]
    assert rel_l2(deq, x) < (0.03 if fmt == "int8" else 0.04)     # int8's error is the loud group's coarse step


@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_act_rounds_ties_to_even(fmt):
    """Values exactly between two codes (scale 1: the row's amax is the format's max): the kernel must round as
    torch does (to even). The interpreter's own float32 -> float8 cast fails this (off by 2x after a carry)."""
    if fmt == "fp8":
        codes = torch.arange(256, dtype=torch.uint8)
        grid = codes[(codes & 0x7F) != 0x7F].view(torch.float8_e4m3fn).float().unique()
        vals = torch.cat([(grid[1:] + grid[:-1]) / 2, grid])
    else:
        vals = torch.arange(-126, 127, dtype=torch.float32) + 0.5
    qmax = Q.FORMATS[fmt][1]
    vals = torch.cat([vals, torch.tensor([qmax])])
    x = torch.nn.functional.pad(vals, (0, -vals.numel() % 128)).view(-1, 128)
    x[:, -1] = qmax                                              # every row's scale is exactly 1
    xq, xs = Q.quantize_act(x, fmt)
    assert torch.equal(xs, torch.ones_like(xs))
    assert torch.equal(bits(xq), bits(Q.quantize_act_reference(x, fmt)[0]))
    expect = torch.round(x) if fmt == "int8" else x.to(torch.float8_e4m3fn).float()
    assert torch.equal(xq.float(), expect)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("k", K_S)
@pytest.mark.parametrize("m", M_S)
def test_gemm_matches_reference(fmt, m, k):
    for n in N_S:
        x, w, b = data(m, k, n, seed=m * 1000 + k + n)
        xq, xs = Q.quantize_act_reference(x, fmt)
        wq, ws = Q.quantize_weight(w, fmt)
        out = Q.w8a8_gemm(xq, xs, wq, ws, b, torch.float32)
        ref = Q.w8a8_matmul_reference(xq, xs, wq, ws, b, torch.float32)
        assert out.shape == (m, n) and rel_l2(out, ref) < GEMM_TOL, (n, rel_l2(out, ref))
        out_bf16 = Q.w8a8_gemm(xq, xs, wq, ws, None, torch.bfloat16)
        assert out_bf16.dtype == torch.bfloat16
        assert rel_l2(out_bf16, Q.w8a8_matmul_reference(xq, xs, wq, ws, None)) < 4e-3   # bf16 rounding of the output


@pytest.mark.parametrize("fmt", FMTS)
def test_gemm_per_channel_weights_and_tiles(fmt):
    x, w, b = data(33, 200, 130, seed=5)
    xq, xs = Q.quantize_act_reference(x, fmt)
    wq, ws = Q.quantize_weight(w, fmt, block_n=1)
    assert ws.shape == (130, 2)
    ref = Q.w8a8_matmul_reference(xq, xs, wq, ws, b)
    for config in ({"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 1}, {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 4}):
        assert rel_l2(Q.w8a8_gemm(xq, xs, wq, ws, b, torch.float32, config=config), ref) < GEMM_TOL


def test_negative_control_wrong_k_block_scale():
    """The comparison must catch a kernel that applies the scale of the wrong K block: the same kernel fed
    activation scales of block 0 for every block (stride 0), or weight scales shifted by one block."""
    x, w, b = data(33, 384, 130, seed=3)
    x = x * torch.tensor([1.0, 4.0, 0.25]).repeat_interleave(128)   # groups of different loudness
    for fmt in FMTS:
        xq, xs = Q.quantize_act_reference(x, fmt)
        wq, ws = Q.quantize_weight(w * torch.tensor([0.3, 1.0, 3.0]).repeat_interleave(128), fmt)
        ref = Q.w8a8_matmul_reference(xq, xs, wq, ws, b)
        assert rel_l2(Q.w8a8_gemm(xq, xs, wq, ws, b, torch.float32), ref) < GEMM_TOL
        wrong_x = Q.w8a8_gemm(xq, xs[:, :1].expand_as(xs), wq, ws, b, torch.float32)
        wrong_w = Q.w8a8_gemm(xq, xs, wq, ws.roll(1, dims=1).contiguous(), b, torch.float32)
        assert rel_l2(wrong_x, ref) > 1000 * GEMM_TOL and rel_l2(wrong_w, ref) > 1000 * GEMM_TOL


def test_quantization_error_on_gaussian_data():
    """Reference vs float32 matmul, full 128 x 128 weight blocks. int8: a block's amax is ~4 sigma of its 16384
    weights and ~2.9 sigma of a token's 128 channels, so the rounding noise is ~0.009 and ~0.007 of sigma:
    ~0.011 in all; fp8 (3 mantissa bits) ~0.035."""
    x, w, b = data(64, 384, 256, seed=1)
    exact = x @ w.t() + b
    errs = {}
    for fmt in FMTS:
        wq, ws = Q.quantize_weight(w, fmt)
        errs[fmt] = rel_l2(Q.w8a8_linear_reference(x, wq, ws, b, fmt), exact)
        assert rel_l2(Q.w8a8_linear(x, wq, ws, b, fmt), exact) == pytest.approx(errs[fmt], rel=1e-3)
    assert 1e-3 < errs["int8"] < 1.5e-2, errs
    assert 1e-2 < errs["fp8"] < 5e-2, errs


def per_tensor_reference(x, w, fmt):
    """The negative control: one scale for all of x and one for all of W."""
    qmax = Q.FORMATS[fmt][1]
    sx, sw = x.abs().max() / qmax, w.abs().max() / qmax
    return (Q._round_to(x / sx, fmt).float() * sx) @ (Q._round_to(w / sw, fmt).float() * sw).t()


def outlier_errors(fmt, channel, token, block):
    """Outlier channels (x`channel` in three channels of the first group), outlier tokens (x`token`) and one loud
    weight block (x`block`) -> (error of per-token/group + per-block scales, error of per-tensor scales), each the
    mean over tokens of the token's relative L2 (every token's output counts alike)."""
    x, w, _ = data(48, 384, 256, seed=2)
    x[:, [3, 40, 77]] *= channel
    x[[5, 17]] *= token
    w[128:256, 256:384] *= block
    exact = x @ w.t()
    per_token = lambda out: ((out - exact).norm(dim=1) / exact.norm(dim=1)).mean().item()  # noqa: E731
    wq, ws = Q.quantize_weight(w, fmt)
    return per_token(Q.w8a8_linear(x, wq, ws, None, fmt)), per_token(per_tensor_reference(x, w, fmt))


def test_per_block_scales_beat_per_tensor_with_outliers():
    """int8 (a uniform grid): one per-tensor scale coarsens every value to the outliers' step (~0.8 error vs
    ~0.015). fp8 is a float: a single scale only shifts exponents, so moderate outliers cost it nothing; only once
    they push ordinary values below its range (2**-9..448: outliers ~1000x) does per-tensor fall apart."""
    blocked, tensor = outlier_errors("int8", 30, 20, 10)
    assert blocked < 0.02 and tensor > 20 * blocked, (blocked, tensor)
    blocked, tensor = outlier_errors("fp8", 30, 20, 10)
    assert blocked < 0.05 and tensor > 0.95 * blocked, (blocked, tensor)
    blocked, tensor = outlier_errors("fp8", 1000, 300, 100)
    assert blocked < 0.05 and tensor > 5 * blocked, (blocked, tensor)


def test_weight_quantization():
    w = torch.randn(130, 200, generator=torch.Generator().manual_seed(4))
    w[:128, :128] = 0                                            # an all-zero block: finite scale, zero codes
    for fmt in FMTS:
        wq, ws = Q.quantize_weight(w, fmt)
        assert wq.shape == w.shape and wq.dtype == Q.FORMATS[fmt][0] and ws.shape == (2, 2)
        assert torch.isfinite(ws).all() and (wq[:128, :128].float() == 0).all()
        assert wq.float().abs().max() == Q.FORMATS[fmt][1]
        assert rel_l2(Q.dequantize_weight(wq, ws), w) < (0.012 if fmt == "int8" else 0.04)
        wq1, ws1 = Q.quantize_weight(w, fmt, block_n=1)
        assert ws1.shape == (130, 2) and rel_l2(Q.dequantize_weight(wq1, ws1), w) < rel_l2(
            Q.dequantize_weight(wq, ws), w)
    with pytest.raises(ValueError):
        Q.dequantize_weight(wq, ws[:, :1])
    with pytest.raises(ValueError):
        Q.w8a8_gemm(wq, ws, wq, ws)


def test_w8a8_linear_module():
    torch.manual_seed(0)
    lin = nn.Linear(200, 130)
    x = torch.randn(2, 5, 200)
    for fmt in FMTS:
        mod = Q.W8A8Linear.from_linear(lin, fmt)
        assert mod.weight_q.dtype == Q.FORMATS[fmt][0] and mod.weight.dtype == torch.float32
        assert set(mod.state_dict()) == {"weight_q", "weight_scales", "bias"}
        out = mod(x)
        ref = Q.w8a8_linear_reference(x, mod.weight_q, mod.weight_scales, mod.bias, fmt)
        assert out.shape == (2, 5, 130) and rel_l2(out, ref) < GEMM_TOL
        assert rel_l2(out, lin(x)) < (0.015 if fmt == "int8" else 0.05)
        wq = mod.weight_q.clone()
        mod.to(torch.bfloat16)                                   # the compute dtype only
        assert mod.weight.dtype == torch.bfloat16 and mod.bias.dtype == torch.bfloat16
        assert torch.equal(bits(mod.weight_q), bits(wq)) and mod.weight_scales.dtype == torch.float32
        out16 = mod(x.bfloat16())
        assert out16.dtype == torch.bfloat16 and rel_l2(out16, lin(x)) < (0.02 if fmt == "int8" else 0.05)
    no_bias = Q.W8A8Linear.from_linear(nn.Linear(128, 96, bias=False), "int8", per_channel=True)
    assert no_bias.bias is None and no_bias.weight_scales.shape == (96, 1)
    assert no_bias(torch.randn(3, 128)).shape == (3, 96)


def test_quantize_linears_on_dit_names():
    """dit_block_linears picks exactly the blocks' attention projections and FFNs of the real DiT (names kept in
    step with models/dit.py); the swapped block computes what its references do."""
    dit = DiT(PRESETS["tiny"].dit)
    linears = {n for n, m in dit.named_modules() if isinstance(m, nn.Linear)}
    picked = {n for n in linears if Q.dit_block_linears(n, None)}
    assert picked and all(n.startswith("blocks.") for n in picked)
    assert {n.rsplit(".", 1)[1] for n in picked} == {"q", "k", "v", "o", "0", "2"}
    assert all(n in picked for n in linears if n.startswith("blocks.") and ".ffn." in n)
    assert "head.head" not in picked and not any(n.startswith(("text_", "time_")) for n in picked)

    block = dit.blocks[0]
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(1, 9, dit.cfg.dim)
    want = block.ffn(x)
    swapped = Q.quantize_linears(block, "fp8", lambda n, m: n.startswith(("ffn.", "self_attn.")))
    assert set(swapped) == {"ffn.0", "ffn.2", "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"}
    assert isinstance(block.ffn[0], Q.W8A8Linear) and isinstance(block.cross_attn.q, nn.Linear)
    assert block.self_attn.q.weight.dtype == torch.float32            # what Attention.qkv casts its input to
    assert rel_l2(block.ffn(x), want) < 0.06


def test_fallback_when_triton_cannot_run(monkeypatch):
    """runs_triton false (a CPU without the interpreter): the launchers run their references, no kernel."""
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched")
    monkeypatch.setattr(Q, "runs_triton", lambda *t: False)
    monkeypatch.setattr(Q, "_quant_act_kernel", NoLaunch())
    monkeypatch.setattr(Q, "_w8a8_gemm_kernel", NoLaunch())
    x, w, b = data(7, 200, 130)
    for fmt in FMTS:
        wq, ws = Q.quantize_weight(w, fmt)
        xq, xs = Q.quantize_act(x, fmt)
        rq, rs = Q.quantize_act_reference(x, fmt)
        assert torch.equal(bits(xq), bits(rq)) and torch.equal(xs, rs)
        assert torch.equal(Q.w8a8_gemm(xq, xs, wq, ws, b, torch.float32),
                           Q.w8a8_matmul_reference(xq, xs, wq, ws, b))
        assert torch.equal(Q.w8a8_linear(x, wq, ws, b, fmt), Q.w8a8_linear_reference(x, wq, ws, b, fmt))
        mod = Q.W8A8Linear.from_linear(nn.Linear(200, 130), fmt)
        assert torch.equal(mod(x), Q.w8a8_linear_reference(x, mod.weight_q, mod.weight_scales, mod.bias, fmt))


def _compiled(fn, graphs: list):
    """fn under torch.compile with a backend that keeps dynamo's graph (then runs it as it is)."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return torch.compile(fn, backend=backend, fullgraph=True)


def _ops(graphs: list) -> list:
    return [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]


def _w8a8_linear_traced(self, x):
    """The module's forward before the custom op: traced, the launcher becomes its torch reference."""
    return Q.w8a8_linear(x, self.weight_q, self.weight_scales, self.bias, self.fmt, self.block)


@pytest.mark.parametrize("fmt", FMTS)
def test_compiled_linear_is_one_op_that_runs_the_kernel(fmt, monkeypatch):
    """Under torch.compile (dynamo's graph, and aot_eager: AOT autograd's functionalised graph) a W8A8Linear is one
    node, torch.ops.vidu.w8a8_linear, which at run time launches the Triton GEMM: the compiled module gives exactly
    the uncompiled one's output. Negative control: the forward without the op (the launcher traced) has no such node,
    never launches the kernel and gives the reference's numbers instead, which the exact comparison tells apart."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    mod = Q.W8A8Linear.from_linear(nn.Linear(200, 130), fmt)
    x = torch.randn(2, 9, 200)
    calls = []
    gemm = Q._gemm_launch                   # the GEMM's launch (w8a8_linear calls it after its one check)
    monkeypatch.setattr(Q, "_gemm_launch", lambda *a, **k: calls.append(1) or gemm(*a, **k))
    with torch.no_grad():
        eager = mod(x)
        assert len(calls) == 1
        graphs = []
        got = _compiled(mod, graphs)(x)
        assert _ops(graphs).count(torch.ops.vidu.w8a8_linear.default) == 1 and len(calls) == 2
        assert torch.equal(got, eager)
        got_aot = torch.compile(mod, backend="aot_eager", fullgraph=True)(x)
        assert len(calls) == 3 and torch.equal(got_aot, eager)
        dynamic = torch.compile(mod, backend="aot_eager", fullgraph=True, dynamic=True)   # symbolic token counts
        for m in (3, 17):                    # (DiT.compile_blocks' streams: the context grows, lengths go symbolic)
            xm = torch.randn(1, m, 200)
            assert torch.equal(dynamic(xm), mod(xm))
        assert len(calls) == 3 + 4
        assert rel_l2(eager, Q.w8a8_linear_reference(x, mod.weight_q, mod.weight_scales, mod.bias, fmt)) < GEMM_TOL

        torch._dynamo.reset()
        monkeypatch.setattr(Q.W8A8Linear, "forward", _w8a8_linear_traced)
        graphs = []
        traced = _compiled(mod, graphs)(x)
        assert torch.ops.vidu.w8a8_linear.default not in _ops(graphs) and len(calls) == 7
        assert not torch.equal(traced, eager)
    torch._dynamo.reset()


def test_compiled_quantized_block_keeps_every_linear_an_op():
    """A tiny DiT block with W8A8 linears, compiled (aot_eager, as DiT.compile_blocks compiles blocks): each of its
    14 quantized linears is one vidu.w8a8_linear node and the block's output is the uncompiled block's, exactly."""
    from tests.test_kernel_backends import forward_args
    from tests.test_stream_engine import scrambled
    torch._dynamo.reset()
    cfg = PRESETS["tiny"].dit
    model = scrambled(cfg)
    model.quantize("int8")
    x, args, g = forward_args(1, 5)
    text, t = torch.randn(1, 5, cfg.text_dim, generator=g), torch.tensor([300.0])
    captured = {}
    block = model.blocks[0]
    hook = block.register_forward_hook(lambda m, a, out: captured.update(args=a))
    with torch.no_grad():
        model(x, t, text, **args)
    hook.remove()
    a = captured["args"]
    graphs = []
    with torch.no_grad():
        eager = block(*a)
        got = _compiled(block, graphs)(*a)
        aot = torch.compile(block, backend="aot_eager")(*a)
    n_quantized = sum(isinstance(m, Q.W8A8Linear) for m in block.modules())
    assert n_quantized == 14 and _ops(graphs).count(torch.ops.vidu.w8a8_linear.default) == n_quantized
    for out in (got, aot):
        assert all(torch.equal(o, e) for o, e in zip(out, eager))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------- the GPU build

COMPILE = textwrap.dedent("""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vidu_kernels import w8a8 as Q
fn = Q._w8a8_gemm_kernel
# Wan 1.3B's qkvo / FFN-up K (1536) in both formats, three of the autotuner's tiles
for qt, (bm, bn, warps, stages) in [(q, c) for q in ("fp8e4nv", "i8") for c in [(128, 128, 8, 3), (64, 256, 8, 3),
                                                                                    (64, 128, 4, 4)]]:
    sig = dict(x_ptr=f"*{qt}", xs_ptr="*fp32", w_ptr=f"*{qt}", ws_ptr="*fp32", b_ptr="*bf16", out_ptr="*bf16",
               M="i32", N="i32", K="constexpr", stride_xm="i32", stride_xk="constexpr", stride_xsm="i32",
               stride_xsk="constexpr", stride_wn="i32", stride_wk="constexpr", stride_wsn="i32", stride_wsk="constexpr",
               stride_om="i32", stride_on="constexpr", M_BUCKET="i32", W_ROWS="constexpr", IS_INT8="constexpr",
               HAS_BIAS="constexpr", EVEN_K="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr",
               BLOCK_K="constexpr", GROUP_M="constexpr")
    consts = dict(K=1536, stride_xk=1, stride_xsk=1, stride_wk=1, stride_wsk=1, stride_on=1, W_ROWS=128,
                  IS_INT8=qt == "i8", HAS_BIAS=True, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8)
    # what the JIT specialises at the real shapes: 16-byte aligned pointers, row strides and sizes divisible by 16
    div16 = [n for n, t in sig.items() if t.startswith("*")] + "M N stride_xm stride_wn stride_om".split()
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    info = ptxas_info(ptx)
    spills = [int(n) for n in re.findall(r"(\\d+) bytes spill", info)]
    regs = re.findall(r"Used (\\d+) registers", info)
    kind = ".s32.s8.s8" if qt == "i8" else ".e4m3.e4m3"
    print("CASE", qt, bm, bn, warps, stages, "WGMMA", sum(1 for l in ptx.splitlines() if "wgmma.mma_async" in l and kind in l),
          "ASYNC", ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy_global_to_local"),
          "SPILL_LINES", len(spills), "SPILLS", sum(spills), "REGS", regs[0] if regs else -1)
""")


def test_gemm_compiles_for_hopper():
    """Without a GPU: the block-scaled GEMM (fp8 e4m3 and int8) compiles for sm_90 through ptxas at three of the
    autotuner's tiles, with wgmma instructions of its format and pipelined (async) loads of both operands. 64 x 256 /
    8 warps and 64 x 128 / 4 warps spill no registers; 128 x 128 / 8 warps reaches 255 registers and spills (measured:
    128 bytes; 128 x 256, 256 x 128 and 128 x 128 / 4 warps spill 0.7-1.8 KB: the float32 accumulator and each K
    block's partial product are both live), which the autotuner weighs on the GPU."""
    cases = [line.split() for line in compile_for_hopper(COMPILE).splitlines() if line.startswith("CASE")]
    assert len(cases) == 6
    for c in cases:
        out = dict(zip(c[6::2], map(int, c[7::2])))
        assert out["WGMMA"] > 0 and out["ASYNC"] > 0 and out["SPILL_LINES"] > 0, c
        if (c[2], c[3]) != ("128", "128"):
            assert out["SPILLS"] == 0, c


@pytest.mark.parametrize("fmt", FMTS)
def test_linear_is_two_launches_close_to_bf16(fmt, monkeypatch):
    """w8a8_linear is two launches, the activation quantization (absmax per token and group -> 8-bit values and
    scales) and the GEMM, with nothing else on the way; its float32 output equals the reference's on the same
    operands (GEMM_TOL: float32 summation order), and in bf16 it stays within the quantization's error of bf16
    F.linear (int8 < 1.5e-2, fp8 < 5e-2 relative L2 on Gaussian data; measured 0.011 / 0.035 in
    test_quantization_error_on_gaussian_data). Negative control: the weight scales rolled by one K block (the
    right values on the wrong blocks; the middle block is 8x louder) break the bound."""
    launches = count_launches(monkeypatch, Q, {"_quant_act_kernel": "quant", "_w8a8_gemm_kernel": "gemm"})
    x, w, b = data(2 * 9, 384, 130, seed=5)
    x = x.view(2, 9, 384)                                           # [..., K] inputs, as the DiT's [B, L, dim]
    w[:, 128:256] *= 8                                              # one loud K block: its scales differ
    wq, ws = Q.quantize_weight(w, fmt)
    out = Q.w8a8_linear(x, wq, ws, b, fmt)
    assert launches == ["quant", "gemm"] and out.shape == (2, 9, 130)
    assert rel_l2(out, Q.w8a8_linear_reference(x, wq, ws, b, fmt)) < GEMM_TOL
    bound = {"int8": 1.5e-2, "fp8": 5e-2}[fmt]
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    wq, ws = Q.quantize_weight(wb, fmt)
    exact = torch.nn.functional.linear(xb.float(), wb.float(), bb.float())
    got = Q.w8a8_linear(xb, wq, ws, bb, fmt)
    assert got.dtype == torch.bfloat16
    err = rel_l2(got, exact)
    assert err < bound and rel_l2(torch.nn.functional.linear(xb, wb, bb), exact) < 5e-3, err
    assert rel_l2(Q.w8a8_linear(xb, wq, ws.roll(1, 1), bb, fmt), exact) > 3 * bound
