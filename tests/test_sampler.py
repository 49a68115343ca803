"""The teachers' sampler: Euler steps of the flow ODE against a model whose velocity is known in
closed form, classifier-free guidance against separate conditional / unconditional forwards, and
LongLive's recache against a fresh cache pass of the same clean latents under the new text."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from models.dit import DiTOutput, KV, null_condition
from models.flow import sigmas
from stages.stream import engine as engine_mod
from stages.stream.engine import ChunkInputs, StreamSettings, context_chunks, denoise_chunk
from tests.test_stream_engine import TINY, conditions, rel, run_engine, scrambled


class GaussianFlow(nn.Module):
    """The exact velocity of x_s = (1 - s) x0 + s eps for x0 ~ N(mu, sigma^2 I), mu = the mean of the
    row's text features (a null text: mu = 0): v(x, s) = E[eps - x0 | x_s = x]
    = (s - (1 - s) sigma^2) / var_s (x - (1 - s) mu) - mu, var_s = (1 - s)^2 sigma^2 + s^2.
    Called like the DiT (the engine's free functions only call it)."""

    def __init__(self, sigma: float = 0.5):
        super().__init__()
        self.sigma = sigma
        self.unused = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def mean(self, text: torch.Tensor) -> torch.Tensor:
        return text.flatten(1).mean(1).reshape(-1, 1, 1, 1, 1)

    def forward(self, x, t, context, *, audio=None, audio_latent=None, ref=None, mask="full", chunk_frames=1,
                kv=None, frame_pos=None, return_kv=False):
        s = (t / 1000.0).reshape(-1, 1, 1, 1, 1).to(x.dtype)
        mu, a, sig2 = self.mean(context), 1 - s, self.sigma ** 2
        v = (s - a * sig2) / (a * a * sig2 + s * s) * (x - a * mu) - mu
        return DiTOutput(v, None, None)

    def exact(self, x1: torch.Tensor, text: torch.Tensor, s0: float) -> torch.Tensor:
        """The ODE's x at s = 0 from x at s0: x_s = (1 - s) mu + sqrt(var_s / var_s0) (x_s0 - (1 - s0) mu)."""
        mu = self.mean(text)
        var0 = (1 - s0) ** 2 * self.sigma ** 2 + s0 ** 2
        return mu + math.sqrt(self.sigma ** 2 / var0) * (x1 - (1 - s0) * mu)


def euler_chunk(model, x, text, steps, shift=1.0, guidance=1.0, renoise=None):
    sig = sigmas(steps, shift)
    none = KV([], [], torch.zeros(0, 3, dtype=torch.long))                  # the stub reads no context
    return denoise_chunk(model, x, None, sig, ChunkInputs(text), none, none, torch.arange(1), None, renoise,
                         guidance)[0]


def gaussian_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 1, 4, 4, generator=g, dtype=torch.float64)
    text = torch.randn(2, 5, 7, generator=g, dtype=torch.float64) + 1.0
    return GaussianFlow(), x, text


def test_euler_is_the_hand_recursion_and_converges_to_the_ode_solution():
    model, x, text = gaussian_case()
    sig = sigmas(8, 5.0)
    want = x.clone()
    for s, s_next in zip(sig, sig[1:] + [0.0]):
        t = torch.full((2,), s * 1000.0)                                    # as the engine: float32
        want = want + (s_next - s) * model(want, t, text).video
    assert torch.equal(euler_chunk(model, x, text, 8, 5.0).video, want)          # bit for bit
    exact = model.exact(x, text, 1.0)
    errors = [rel(euler_chunk(model, x, text, n).video, exact) for n in (4, 16, 64, 256)]
    assert all(b < a / 3.5 for a, b in zip(errors, errors[1:])), errors      # first order: 4x the steps, ~1/4 the error
    assert errors[-1] < 4e-3, errors                                          # measured 3.0e-3
    # control: the x0-and-renoise sampler (fresh noise each step) lands elsewhere
    g = torch.Generator().manual_seed(1)
    renoised = euler_chunk(model, x, text, 256, renoise=lambda x0, xa0, s: (
        (1 - s) * x0 + s * torch.randn(x0.shape, generator=g, dtype=x0.dtype), None)).video
    assert rel(renoised, exact) > 50 * errors[-1]


def test_guidance_extrapolates_conditional_from_unconditional_velocity():
    model, x, text = gaussian_case()
    cond, uncond = euler_chunk(model, x, text, 1).video, euler_chunk(model, x, null_condition(text), 1).video
    assert torch.equal(euler_chunk(model, x, text, 1, guidance=1.0).video, cond)
    assert torch.equal(euler_chunk(model, x, text, 1, guidance=0.0).video, uncond)
    assert torch.allclose(euler_chunk(model, x, text, 1, guidance=2.0).video, uncond + 2 * (cond - uncond),
                          rtol=0, atol=1e-12)
    assert rel(cond, uncond) > 0.1                          # the condition matters to this model


def tiny_context(cfg=TINY, n=3):
    """A real tiny DiT, a stream's rotated clean context after n chunks, and a chunk's conditions."""
    model = scrambled(cfg.dit)
    st = StreamSettings(chunk_frames=1, steps=3, window=4, twin=False)
    eng, _ = run_engine(model, st, n, cfg=cfg)
    ctx, pos = eng.buffers.context("clean")
    text, audio, _ = conditions(n + 1, 1, seed=5, cfg=cfg)
    ctx_n = sum(cfg.dit.audio_context)
    g = torch.Generator().manual_seed(9)
    x, xa = torch.randn(eng.noise_shape()[0], generator=g), torch.randn(eng.noise_shape()[1], generator=g)
    return model, model.rotate(ctx), pos, ChunkInputs(text, audio[:, n:n + 1 + ctx_n]), x, xa


def guided_reference(model, ctx, pos, inputs, x, xa, sig, g, guide="all"):
    """Euler with v = v_u + g (v_c - v_u) from two separate forwards, the unconditional one with text
    nulled (null_condition), speech too unless guide == "text", and the same context."""
    for k, s in enumerate(sig):
        t = torch.full((1,), s * 1000.0)
        c = model(x, t, inputs.text, audio=inputs.audio, audio_latent=xa, kv=ctx, frame_pos=pos)
        u_audio = inputs.audio if guide == "text" else null_condition(inputs.audio)
        u = model(x, t, null_condition(inputs.text), audio=u_audio, audio_latent=xa, kv=ctx, frame_pos=pos)
        v, va = u.video + g * (c.video - u.video), u.audio + g * (c.audio - u.audio)
        s_next = sig[k + 1] if k + 1 < len(sig) else 0.0
        x, xa = x + (s_next - s) * v, xa + (s_next - s) * va
    return x, xa


@torch.no_grad()
def guided_error(g: float, mutant: bool = False, guide: str = "all", reference_guide: str | None = None
                 ) -> tuple[float, float]:
    model, ctx, pos, inputs, x, xa = tiny_context()
    sig = sigmas(3)
    patches = pytest.MonkeyPatch()
    if mutant:                                                 # guidance toward the wrong pass
        patches.setattr(engine_mod, "guided_conditions",
                        lambda t, a, guide: (torch.cat([null_condition(t), t]), torch.cat([null_condition(a), a])))
    try:
        got = denoise_chunk(model, x, xa, sig, inputs, ctx, ctx, pos, None, None, g, guide)[0]
    finally:
        patches.undo()
    want = guided_reference(model, ctx, pos, inputs, x, xa, sig, g, reference_guide or guide)
    return rel(got.video, want[0]), rel(got.audio, want[1])


@pytest.mark.parametrize("g, guide", [(0.0, "all"), (2.0, "all"), (3.0, "text")])
def test_guidance_in_one_batch_equals_separate_forwards(g, guide):
    assert max(guided_error(g, guide=guide)) < 1e-5          # float32 floor of a batched forward


def test_text_guidance_keeps_the_speech_in_the_unconditional_pass():
    """guide="text" is not guide="all": against the other's reference it is far off."""
    assert min(guided_error(3.0, guide="text", reference_guide="all")) > 1e-3


def test_guidance_toward_the_wrong_pass_fails():
    assert min(guided_error(2.0, mutant=True)) > 1e-3


@torch.no_grad()
def test_guidance_one_is_the_unguided_sampler_bit_for_bit():
    model, ctx, pos, inputs, x, xa = tiny_context()
    sig = sigmas(3)
    plain = denoise_chunk(model, x, xa, sig, inputs, ctx, ctx, pos, None, None)[0]
    one = denoise_chunk(model, x, xa, sig, inputs, ctx, ctx, pos, None, None, 1.0)[0]
    near = denoise_chunk(model, x, xa, sig, inputs, ctx, ctx, pos, None, None, 1.01)[0]
    assert torch.equal(plain.video, one.video) and torch.equal(plain.audio, one.audio)
    assert rel(near.video, plain.video) > 1e-5               # control: guidance is not ignored


# -- recache --
NO_LOOKAHEAD = TINY.replace(dit=dataclasses.replace(TINY.dit, audio_context=(0, 0)))   # a chunk's speech is its own


def recache_stream(recache: bool, n: int, window: int, switch: bool = True):
    model = scrambled(NO_LOOKAHEAD.dit)
    st = StreamSettings(chunk_frames=1, steps=3, window=window, twin=True, noisy_step=1, recache=recache)
    eng, outs = run_engine(model, st, n, cfg=NO_LOOKAHEAD)
    text, audio, _ = conditions(n, 1, cfg=NO_LOOKAHEAD)
    new = torch.randn_like(text)
    if switch:
        eng.recache(new)
    return model, eng, outs, text, new, audio


@torch.no_grad()
def fresh_cache(model, eng, outs, text, audio, chunks: list[int]) -> tuple[KV, KV]:
    """Keys/values of the cached chunks (RoPE order) from one block-causal forward over their clean
    latents (clean set) and over the sink clean + the others' noisy-step states (noisy set), after the
    engine's ref keys/values, at window positions 1, 2, ... + the window's shift; keys rotated there, as the
    buffers keep them."""
    S, shift = eng.buffers.S, eng.buffers.shift()
    ref = eng.buffers.context("clean")[0].tokens(0, S)                      # rotated, at the shift
    s1 = sigmas(3)[1] * 1000.0
    sets = []
    for noisy in (False, True):
        pick = [outs[c] if not noisy or c == 0 else None for c in chunks]
        v = torch.cat([o.video if o is not None else outs[c].states[1] for o, c in zip(pick, chunks)], 2)
        a = torch.cat([o.audio if o is not None else outs[c].audio_states[1] for o, c in zip(pick, chunks)], 1)
        t = torch.tensor([[0.0 if o is not None else s1 for o in pick]])
        sets.append(model.rotate(model(v, t, text, audio=torch.cat([audio[:, c:c + 1] for c in chunks], 1),
                                       audio_latent=a, kv=ref, frame_pos=shift + torch.arange(1, 1 + len(chunks)),
                                       mask="causal", return_kv=True).kv))
    return sets[0], sets[1]


def cache_error(eng, clean: KV, noisy: KV, chunks: list[int]) -> float:
    """Largest relative error of the engine's cached keys/values, place by place, against `clean` /
    `noisy` (rows in RoPE order: chunks[r] at rank r); the sink's noisy set is its clean one."""
    buf, S = eng.buffers, eng.buffers.S
    frames, _ = buf.frame_positions()
    ctx = {which: buf.context(which)[0] for which in ("clean", "noisy")}   # the ref and sink placed at the shift
    worst = 0.0
    for place in range((frames.numel() - 1)):
        r = int(frames[1 + place]) - 1                                       # its rank in RoPE order
        a, b = (1 + place) * S, (2 + place) * S
        for which, want in (("clean", clean), ("noisy", clean if chunks[r] == 0 else noisy)):
            for i in range(len(want.k)):
                worst = max(worst, rel(ctx[which].k[i][:, a:b], want.k[i][:, r * S:(r + 1) * S]),
                            rel(ctx[which].v[i][:, a:b], want.v[i][:, r * S:(r + 1) * S]))
    return worst


@pytest.mark.parametrize("n, window", [(4, 4), (6, 2)])       # the ring holds all / has wrapped
def test_recache_equals_a_fresh_cache_pass_under_the_new_text(n, window):
    model, eng, outs, old, new, audio = recache_stream(True, n, window)
    chunks = context_chunks(n, window, True)                                 # sink + the ring, oldest first
    assert cache_error(eng, *fresh_cache(model, eng, outs, new, audio, chunks), chunks) < 1e-5
    assert cache_error(eng, *fresh_cache(model, eng, outs, old, audio, chunks), chunks) > 1e-3   # control


def test_without_recache_the_history_keeps_the_old_text():
    model, eng, outs, old, new, audio = recache_stream(False, 4, 4, switch=False)
    chunks = [0, 1, 2, 3]
    assert cache_error(eng, *fresh_cache(model, eng, outs, old, audio, chunks), chunks) < 1e-5
    assert cache_error(eng, *fresh_cache(model, eng, outs, new, audio, chunks), chunks) > 1e-3   # control
    with pytest.raises(engine_mod.StreamError, match="recache"):
        eng.recache(new)


def test_a_stream_goes_on_after_a_recache():
    model, eng, outs, old, new, audio = recache_stream(True, 6, 2)
    nxt = eng.step(ChunkInputs(new, audio[:, 5:6]))
    assert nxt.video.shape == outs[0].video.shape and torch.isfinite(nxt.video).all()


# -- the teachers' samplers (stages/train/sample.py) --
def test_bidirectional_sampler_guides_toward_the_extrapolated_target():
    """The Gaussian flow's velocity is affine in mu, so v_u + g (v_c - v_u) is the flow of target mean
    g mu (null text: mu = 0): guided Euler converges to that ODE solution."""
    from stages.train.sample import sample_bidirectional
    cfg = TINY.replace(dit=dataclasses.replace(TINY.dit, audio_latent_dim=0, audio_latent_tokens=0))   # video only
    model, _, text = gaussian_case()
    ref = torch.zeros(2, cfg.dit.in_dim, 1, 4, 4, dtype=torch.float64)
    x1 = torch.randn((2, cfg.dit.in_dim, cfg.latent_frames, 4, 4), generator=torch.Generator().manual_seed(3),
                     dtype=torch.float32).to(torch.float64)
    for g in (0.0, 1.0, 2.0):
        x, _ = sample_bidirectional(model, cfg, ref, text, steps=256, shift=1.0, seed=3, guidance=g)
        assert rel(x, model.exact(x1, g * text, 1.0)) < 1e-2, g             # first order, 256 steps: 6e-3 at worst
    assert rel(x, model.exact(x1, text, 1.0)) > 0.1                          # control: unguided answer


def test_windows_cover_a_long_clip_with_the_overlap():
    from stages.train.sample import windows
    assert windows(5, 5, 2) == [0] and windows(3, 5, 2) == [0]
    assert windows(11, 5, 2) == [0, 3, 6]                                    # ends at 11 exactly
    assert windows(12, 5, 2) == [0, 3, 6, 7]                                 # the last window ends at the clip's end
    assert windows(9, 5, 0) == [0, 4] and windows(10, 5, 0) == [0, 5]
    with pytest.raises(ValueError, match="overlap"):
        windows(9, 5, 5)


def long_case(F, seed=3):
    """The tiny DiT (scrambled, so frames attend to each other) with a text per latent frame and speech for `F`
    latent frames."""
    cfg = TINY.replace(dit=dataclasses.replace(TINY.dit, audio_latent_dim=0, audio_latent_tokens=0))   # video only
    model = scrambled(cfg.dit)
    g = torch.Generator().manual_seed(seed)
    d = cfg.dit
    text = torch.randn(1, F, 5, d.text_dim, generator=g)
    audio = torch.randn(1, F + sum(d.audio_context), 16, d.audio_dim, generator=g)
    ref = torch.randn(1, d.in_dim, 1, cfg.height // 8, cfg.width // 8, generator=g)
    return model, cfg, ref, text, audio


@torch.no_grad()
def test_a_long_clip_is_sampled_in_windows_holding_the_overlap():
    from stages.train.sample import sample_bidirectional
    Fw, F, O = TINY.latent_frames, 2 * TINY.latent_frames, 2          # windows at 0, 3, 5 (overlap 0: 0, 5)
    model, cfg, ref, text, audio = long_case(F)
    b, a = cfg.dit.audio_context
    kw = dict(steps=3, seed=5, guidance=2.0, overlap=O)
    told_done = []
    z, _ = sample_bidirectional(model, cfg, ref, text, audio, frames=F, **kw,
                                progress=lambda done, total: told_done.append((done, total)))
    assert z.shape[2] == F and torch.isfinite(z).all()
    assert told_done == [(1, 3), (2, 3), (3, 3)]                       # each window told as it ends
    # the first window is the model's clip sampled alone, with its frames' texts and speech
    first, _ = sample_bidirectional(model, cfg, ref, text[:, :Fw], audio[:, :b + Fw + a], **kw)
    assert torch.equal(z[:, :, :Fw], first)
    # speech heard only by the second window changes only its new frames
    later = audio.clone()
    later[:, b + Fw + a:] += 1.0
    z2, _ = sample_bidirectional(model, cfg, ref, text, later, frames=F, **kw)
    assert torch.equal(z2[:, :, :Fw], z[:, :, :Fw]) and rel(z2[:, :, Fw:], z[:, :, Fw:]) > 1e-3
    # the held frames carry the first window into the second: a text only the first window reads changes
    # the second's new frames; with no overlap (nothing held) it cannot (the negative control)
    told = text.clone()
    told[:, 0] += 3.0
    for overlap, moves in ((O, True), (0, False)):
        base, _ = sample_bidirectional(model, cfg, ref, text, audio, frames=F, **{**kw, "overlap": overlap})
        other, _ = sample_bidirectional(model, cfg, ref, told, audio, frames=F, **{**kw, "overlap": overlap})
        new = slice(Fw, F)                                                    # frames no window before made
        assert rel(other[:, :, :1], base[:, :, :1]) > 1e-3
        assert (rel(other[:, :, new], base[:, :, new]) > 1e-4) is moves, overlap
    with pytest.raises(ValueError, match="per-frame texts"):
        sample_bidirectional(model, cfg, ref, text, audio, frames=F - 1, **kw)


@torch.no_grad()
def test_causal_sampler_is_the_engine_with_euler_and_guidance():
    from stages.train.sample import sample_causal
    model = scrambled(TINY.dit)
    text, audio, ref = conditions(TINY.latent_frames, 1)
    st = StreamSettings(chunk_frames=1, steps=2, window=TINY.latent_frames, twin=False, sampler="euler", guidance=2.0)
    _, outs = run_engine(model, st, TINY.latent_frames)
    video, _ = sample_causal(model, TINY, ref, text, audio, steps=2, guidance=2.0)
    assert torch.equal(video, torch.cat([o.video for o in outs], 2))
    plain, _ = sample_causal(model, TINY, ref, text, audio, steps=2, guidance=1.0)
    assert rel(plain, video) > 1e-4                                          # control: guidance acts
