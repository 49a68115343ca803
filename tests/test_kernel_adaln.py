"""vidu_kernels/adaln.py: the LayerNorm + adaLN modulation and gated residual kernels, run in Triton's interpreter
(conftest sets TRITON_INTERPRET=1), against their references on awkward shapes; the references against
the model with and without them (DiT.use_kernels); the fallback; and negative controls showing the comparison catches a wrong frame's
modulation or a scale without its +1."""
from __future__ import annotations

import pytest
import torch

from vidu_kernels import adaln as A
from vidu_kernels._triton import runs_triton
from vidu_kernels.adaln import gated_residual_norm_modulate_reference as fused_reference
from vidu_kernels.adaln import gated_residual_reference, norm_modulate_reference

B, F = 2, 3


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The comparison every test uses. float32: 1e-5 relative (of the tensor's scale; the LayerNorm's float32
    sums in another order). bf16/fp16 output: each element within one rounding step (2^-7 relative) and at most
    0.5% of the elements rounded the other way at all (an fp32 value on a rounding boundary)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    g, w = got.double(), want.double()
    if want.dtype == torch.float32:
        return bool(((g - w).abs() <= 1e-5 * w.abs().max() + 1e-5 * w.abs()).all())
    within = ((g - w).abs() <= 2 ** -7 * w.abs() + 1e-6).all()
    return bool(within and (g != w).double().mean() <= 0.005)


def rand(*shape, dtype=torch.float32, g=None):
    return torch.randn(*shape, generator=g).to(dtype)


def inputs(S: int, D: int, seed: int = 0, mod_shape=None):
    """x, y, and per-frame gate/shift/scale [B, F, 1, D] that differ clearly from frame to frame."""
    g = torch.Generator().manual_seed(seed)
    mod_shape = mod_shape or (B, F, 1, D)
    frame = torch.arange(mod_shape[1], dtype=torch.float32).view(1, -1, 1, 1)
    mods = [rand(*mod_shape, g=g) * 0.5 + frame * (0.7 + 0.3 * i) for i in range(3)]
    x = rand(B, F, S, D, g=g) * 3 + 1.5          # a mean and a spread for the norm to remove
    return x, rand(B, F, S, D, g=g), *mods


@pytest.fixture
def kernels_only(monkeypatch):
    """Every launcher call of the test runs the kernel: the launchers' choice (`_kernel_can_run`) may not fall back
    to the reference, and the kernel launches count."""
    assert runs_triton(torch.zeros(1)), "the tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1)"
    can_run, launch, launches = A._kernel_can_run, A._launch, []

    def kernel_only(*a, **k):
        assert can_run(*a, **k), "the launcher would run the torch reference instead of the kernel"
        return True

    def counted(*a, **k):
        launches.append(1)
        return launch(*a, **k)
    monkeypatch.setattr(A, "_kernel_can_run", kernel_only)
    monkeypatch.setattr(A, "_launch", counted)
    yield
    assert launches


SHAPES = [(S, D) for D in (48, 96, 200) for S in (1, 7, 33)] + [(2, 1536)]


@pytest.mark.parametrize("S,D", SHAPES)
def test_kernels_match_references(S, D, kernels_only):
    x, y, gate, shift, scale = inputs(S, D, seed=S * 1000 + D)
    y16 = y.bfloat16()
    want_h = norm_modulate_reference(x, shift, scale)
    want_h16 = norm_modulate_reference(x, shift, scale, out_dtype=torch.bfloat16)
    want_r = gated_residual_reference(x, y16, gate)
    want_fr, want_fh = fused_reference(x, y16, gate, shift, scale, out_dtype=torch.bfloat16)

    assert close(A.norm_modulate(x, shift, scale), want_h)
    h16 = A.norm_modulate(x, shift, scale, out_dtype=torch.bfloat16)
    assert h16.dtype == torch.bfloat16 and close(h16, want_h16)
    r = A.gated_residual(x, y16, gate)
    assert r.dtype == torch.float32 and close(r, want_r)
    fr, fh = A.gated_residual_norm_modulate(x, y16, gate, shift, scale, out_dtype=torch.bfloat16)
    assert close(fr, want_fr) and close(fh, want_fh)


def test_variants_affine_bf16_input_broadcast_strided_and_single_token(kernels_only):
    g = torch.Generator().manual_seed(5)
    D, S = 96, 7
    x, y, gate, shift, scale = inputs(S, D, seed=3)
    w, b = rand(D, g=g) + 1, rand(D, g=g)
    # affine LayerNorm (norm3 / norm_audio), with and without modulation; bias only; fp16 output
    want = norm_modulate_reference(x, None, None, weight=w, bias=b)
    got = A.norm_modulate(x, None, None, weight=w, bias=b)
    assert got.dtype == torch.float32 and close(got, want)
    assert close(A.norm_modulate(x, shift, scale, weight=w, bias=b), norm_modulate_reference(x, shift, scale,
                                                                                              weight=w, bias=b))
    assert close(A.norm_modulate(x, shift, scale, bias=b, out_dtype=torch.float16),
                 norm_modulate_reference(x, shift, scale, bias=b, out_dtype=torch.float16))
    # a bf16 stream: LayerNorm's result rounds to bf16 before the float32 modulation, as the model's type_as does
    xb = x.bfloat16()
    assert close(A.norm_modulate(xb, shift, scale), norm_modulate_reference(xb, shift, scale))
    assert A.norm_modulate(xb, None, None).dtype == torch.bfloat16
    assert close(A.norm_modulate(xb, None, None), norm_modulate_reference(xb, None, None))
    # one modulation for all frames [B, 1, 1, D], and a bare [D] one; bf16 modulation
    _, _, g1, sh1, sc1 = inputs(S, D, seed=4, mod_shape=(B, 1, 1, D))
    assert close(A.norm_modulate(x, sh1, sc1), norm_modulate_reference(x, sh1, sc1))
    assert close(A.gated_residual(x, y, g1[0, 0, 0]), gated_residual_reference(x, y, g1[0, 0, 0]))
    assert close(A.norm_modulate(x, sh1.bfloat16(), sc1.bfloat16()),
                 norm_modulate_reference(x, sh1.bfloat16(), sc1.bfloat16()))
    # non-contiguous operands: x stored [B, S, F, D] (token stride), y stored [B, F, D, S] (channel stride S),
    # modulations a slice of Block's [B, F, 6, D]
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)
    ys = y.transpose(-1, -2).contiguous().transpose(-1, -2)
    m = torch.stack([shift[:, :, 0], scale[:, :, 0], gate[:, :, 0]], 2).unsqueeze(3).unbind(2)
    assert not xs.is_contiguous() and not ys.is_contiguous() and not m[0].is_contiguous()
    assert close(A.norm_modulate(xs, m[0], m[1]), norm_modulate_reference(x, shift, scale))
    assert close(A.gated_residual(xs, ys, m[2]), gated_residual_reference(x, y, gate))
    fr, fh = A.gated_residual_norm_modulate(xs, ys, m[2], m[0], m[1])
    wr, wh = fused_reference(x, y, gate, shift, scale)
    assert close(fr, wr) and close(fh, wh) and fr.is_contiguous() and fh.is_contiguous()
    # fused without a gate (the residual before norm2) and without modulation (gated residual then norm3)
    assert all(map(close, A.gated_residual_norm_modulate(x, y, None, shift, scale),
                   fused_reference(x, y, None, shift, scale)))
    assert all(map(close, A.gated_residual_norm_modulate(x, y, gate, None, None, weight=w, bias=b),
                   fused_reference(x, y, gate, None, None, weight=w, bias=b)))
    # B*F*S = 1, a 3-dim stream [L, S, D], and an empty one
    x1, y1, g1, sh1, sc1 = (t[:1, :1, :1] for t in (x, y, gate, shift, scale))
    assert close(A.norm_modulate(x1, sh1, sc1), norm_modulate_reference(x1, sh1, sc1))
    assert close(A.gated_residual(x1, y1, g1), gated_residual_reference(x1, y1, g1))
    x3 = x[0]
    assert close(A.norm_modulate(x3, shift[0], scale[0]), norm_modulate_reference(x3, shift[0], scale[0]))
    assert A.norm_modulate(x[:, :, :0], shift, scale).shape == (B, F, 0, D)


def test_launchers_fall_back_to_the_references(monkeypatch):
    x, y, gate, shift, scale = inputs(7, 48, seed=9)

    def no_kernel(*a, **k):
        raise AssertionError("the kernel ran")
    monkeypatch.setattr(A, "_launch", no_kernel)
    # autograd recording through an input: the reference, whose gradient flows
    xg = x.clone().requires_grad_(True)
    A.norm_modulate(xg, shift, scale).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    # float64, and more than 4 dims
    assert A.gated_residual(x.double(), y, gate).dtype == torch.float64
    assert A.norm_modulate(x[None], shift, scale).shape == (1, B, F, 7, 48)
    # off the GPU without the interpreter
    monkeypatch.setattr(A, "runs_triton", lambda *t: False)
    assert torch.equal(A.norm_modulate(x, shift, scale, out_dtype=torch.bfloat16),
                       norm_modulate_reference(x, shift, scale, out_dtype=torch.bfloat16))
    assert torch.equal(A.gated_residual(x, y, gate), gated_residual_reference(x, y, gate))
    for got, want in zip(A.gated_residual_norm_modulate(x, y, gate, shift, scale),
                         fused_reference(x, y, gate, shift, scale)):
        assert torch.equal(got, want)


def test_negative_controls_the_comparison_catches_a_wrong_frame_or_a_missing_plus_one(kernels_only):
    """The same `close` that passes the kernels above fails on the mistakes a kernel could make: a token reading
    the modulation of the next frame (row index -> frame wrong), the scale without its +1, the gate of another
    frame, or the LayerNorm's variance off by one token's worth."""
    S, D = 7, 96
    x, y, gate, shift, scale = inputs(S, D, seed=11)
    assert not torch.allclose(shift[:, 0], shift[:, 1]) and not torch.allclose(scale[:, 1], scale[:, 2])
    want = norm_modulate_reference(x, shift, scale)
    got = A.norm_modulate(x, shift, scale)
    assert close(got, want)
    wrong_frame = A.norm_modulate(x, shift.roll(1, dims=1), scale.roll(1, dims=1))
    assert not close(wrong_frame, want)
    only_last_frame_wrong = torch.cat([shift[:, :2], shift[:, 1:2]], 1)
    assert not close(A.norm_modulate(x, only_last_frame_wrong, scale), want)
    no_plus_one = norm_modulate_reference(x, shift, scale - 1)          # LN(x) * scale + shift
    assert not close(got, no_plus_one)
    biased = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
    assert not close(got, (biased * (1 + scale) + shift).float())
    want_r = gated_residual_reference(x, y, gate)
    assert close(A.gated_residual(x, y, gate), want_r)
    assert not close(A.gated_residual(x, y, gate.roll(1, dims=0)), want_r)
    # bf16 outputs too: a wrong frame is far outside one rounding step
    want16 = norm_modulate_reference(x, shift, scale, out_dtype=torch.bfloat16)
    assert close(A.norm_modulate(x, shift, scale, out_dtype=torch.bfloat16), want16)
    assert not close(wrong_frame.bfloat16(), want16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_model_with_the_kernels_computes_what_it_computes_without(kernels_only, dtype):
    """DiT.use_kernels: a tiny DiT's forward (ref frame, per-frame text, speech) with every block's norm/modulation
    and residual adds in the kernels equals the same forward through the references (which is all Block.forward
    computes them with); a kernel that modulates with the wrong frame is caught by the same comparison."""
    from tests.test_kernel_backends import CFG as cfg
    from tests.test_kernel_backends import forward_args, scrambled
    model = scrambled(cfg).to(dtype)
    x, args, g = forward_args(2, 1)
    text, t = torch.randn(1, 2, 5, cfg.text_dim, generator=g), torch.tensor([[250.0, 600.0]])
    with torch.no_grad():
        want = model(x, t, text, **args)
        model.use_kernels()
        got = model(x, t, text, **args)
        rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
        assert rel(got.video, want.video) < (1e-5 if dtype == torch.float32 else 2e-2)
        assert rel(got.audio, want.audio) < (1e-5 if dtype == torch.float32 else 2e-2)
        real = A.norm_modulate
        A.norm_modulate = lambda x, shift, scale, *a, **k: real(x, shift.roll(1, 1), scale, *a, **k)
        try:
            broken = model(x, t, text, **args)
        finally:
            A.norm_modulate = real
        assert rel(broken.video, want.video) > 1e-2


def test_benchmark_cases_are_the_real_shapes_and_run(monkeypatch, kernels_only):
    """benchmarks/kernel_cases/adaln.py: its shapes are Wan 1.3B's 960x544 frame (2040 tokens of 1536) and the
    starter's 256x256 (256 tokens of 320); every case, run at a small shape in the interpreter, gives the same
    outputs as its torch path."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_cases" / "adaln.py"
    spec = importlib.util.spec_from_file_location("kernel_cases_adaln", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert [s[1:] for s in mod.shapes()] == [(1, 1, 2040, 1536), (1, 3, 2040, 1536), (1, 1, 256, 320)]
    monkeypatch.setattr(mod, "shapes", lambda: [("tiny", 2, 3, 5, 48)])
    cases = mod.cases("cpu")
    assert len(cases) == 4 and all(c["bytes"] > 0 for c in cases)
    for case in cases:
        ours, want = case["ours"](), case["torch"]()
        ours, want = (ours, want) if isinstance(ours, tuple) else ((ours,), (want,))
        assert all(map(close, ours, want)), case["name"]

