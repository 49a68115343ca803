"""The text prepared once (DiT.prepare_text, a TextCache): a forward given it computes exactly what it computes from
the features, and the streaming engine prepares a stream's text once per instruction, not in every forward."""
from __future__ import annotations

import pytest
import torch

from models.dit import DiT, TextCache
from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings
from tests.test_stream_engine import TINY, conditions, scrambled


def inputs(B=2, F=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = TINY.dit
    x = torch.randn(B, d.in_dim, F, TINY.height // 8, TINY.width // 8, generator=g)
    ref = torch.randn(B, d.in_dim, 1, TINY.height // 8, TINY.width // 8, generator=g)
    audio = torch.randn(B, F + sum(d.audio_context), 16, d.audio_dim, generator=g)
    one = torch.randn(B, 5, d.text_dim, generator=g)
    per_frame = torch.randn(B, F, 5, d.text_dim, generator=g)
    latent = torch.randn(B, F, d.audio_latent_tokens, d.audio_latent_dim, generator=g)
    return x, ref, audio, one, per_frame, latent


@pytest.mark.parametrize("per_frame", [False, True])
def test_a_prepared_text_is_the_features_exactly(per_frame):
    model = scrambled(TINY.dit)
    x, ref, audio, one, frames, latent = inputs()
    text = frames if per_frame else one
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        want = model(x, t, text, audio=audio, audio_latent=latent, ref=ref, return_kv=True)
        got = model(x, t, model.prepare_text(text, n_ref=1), audio=audio, audio_latent=latent, ref=ref, return_kv=True)
        other = model(x, t, model.prepare_text(torch.randn_like(text), n_ref=1), audio=audio, audio_latent=latent, ref=ref)
    assert torch.equal(got.video, want.video) and torch.equal(got.audio, want.audio)
    assert all(torch.equal(a, b) for a, b in zip(got.kv.k + got.kv.v, want.kv.k + want.kv.v))
    assert (other.video - want.video).abs().max() > 1e-3          # negative control: another text's cache


def test_a_prepared_text_for_another_forward_is_refused():
    model = scrambled(TINY.dit)
    x, ref, audio, one, frames, latent = inputs()
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad(), pytest.raises(ValueError, match="prepared text is for 1 rows"):
        model(x, t, model.prepare_text(one[:1]), audio=audio, audio_latent=latent, ref=ref)
    with torch.no_grad(), pytest.raises(ValueError, match="2 frames and 0 ref"):
        model(x, t, model.prepare_text(frames), audio=audio, audio_latent=latent, ref=ref)    # built without the ref


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_the_engine_prepares_a_streams_text_once_per_instruction(monkeypatch, guidance):
    st = StreamSettings(chunk_frames=1, steps=3, window=2, guidance=guidance)
    model = scrambled(TINY.dit)
    text, audio, ref = conditions(9, 1)

    def stream(n):
        eng = StreamEngine(model, TINY, st, keep_text=True)
        eng.start(ref)
        step = lambda j, t: eng.step(ChunkInputs(t, audio[:, j:j + 1 + sum(TINY.dit.audio_context)]))  # noqa: E731
        return step, [step(j, text).video for j in range(n)]

    with monkeypatch.context() as m:
        m.setattr(StreamEngine, "_texts", lambda self, t: (None, None))     # every chunk prepares its own
        want = stream(6)[1]
    calls = []
    prepare = DiT.prepare_text
    monkeypatch.setattr(DiT, "prepare_text", lambda self, c, n_ref=0: calls.append(c.shape[0]) or prepare(self, c, n_ref))
    step, got = stream(6)
    assert [torch.equal(a, b) for a, b in zip(got, want)] == [True] * 6      # the same chunks, bit for bit
    # the text and, guided, its 2 rows: once for the 6 chunks (the ref's context, built once, reads the features)
    assert calls == [1] + ([2] if guidance != 1.0 else [])
    calls.clear()
    step(6, text)
    assert calls == []                                     # the same instruction: nothing prepared
    new = text + 1.0
    step(7, new)
    step(8, new)
    assert calls == [1] + ([2] if guidance != 1.0 else [])  # a new instruction: prepared once
    calls.clear()
    new.mul_(2.0)                                          # the same tensor changed in place
    step(8, new)
    with torch.no_grad():
        model.blocks[0].cross_attn.k.weight.add_(0.1)      # the weights changed
    step(8, new)
    assert calls == ([1, 2] * 2 if guidance != 1.0 else [1, 1])


def test_with_gradients_or_without_keep_text_nothing_is_kept():
    """Training's engines (distillation, sampling under FSDP) never prepare: every forward computes the text."""
    st = StreamSettings(chunk_frames=1, steps=3, window=2)
    eng = StreamEngine(scrambled(TINY.dit), TINY, st, keep_text=True)
    text = conditions(1, 1)[0]
    with torch.no_grad():
        assert StreamEngine(eng.model, TINY, st)._texts(text) == (None, None)
    with torch.enable_grad():
        assert eng._texts(text) == (None, None)
    with torch.no_grad():
        plain, steps = eng._texts(text)
        again = eng._texts(text)[0]
    assert isinstance(plain, TextCache) and steps is plain and again is plain


def test_an_inference_mode_text_streams():
    """A text made under torch.inference_mode (no version counter) is prepared once like any other."""
    st = StreamSettings(chunk_frames=1, steps=3, window=2)
    eng = StreamEngine(scrambled(TINY.dit), TINY, st, keep_text=True)
    with torch.inference_mode():
        text = conditions(1, 1)[0].clone()
    with torch.no_grad():
        first = eng._texts(text)[0]
        assert eng._texts(text)[0] is first


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_a_chunks_speech_is_embedded_once_for_its_forwards(monkeypatch, guidance):
    """DiT.keep_speech (a stream's engine sets it): the speech windows' keys/values of every block are computed
    once per chunk, not in each of its forwards (3 steps + the cache pass), and the chunks are bit for bit those
    of a model that computes them every time. Kept only while the same tensor comes back unmodified under
    unmodified weights; a mutant that ignores in-place changes streams other chunks (the control)."""
    st = StreamSettings(chunk_frames=1, steps=3, window=2, guidance=guidance)
    model = scrambled(TINY.dit)
    text, audio, ref = conditions(9, 1)
    W = 1 + sum(TINY.dit.audio_context)

    def stream(n, keep=True):
        eng = StreamEngine(model, TINY, st, keep_text=True)
        model.keep_speech = keep
        eng.start(ref)
        return [eng.step(ChunkInputs(text, audio[:, j:j + W])).video for j in range(n)]

    want = stream(5, keep=False)
    calls = []
    embed = DiT.embed_audio
    monkeypatch.setattr(DiT, "embed_audio", lambda self, a, F, d: calls.append(a.shape[0]) or embed(self, a, F, d))
    got = stream(5)
    assert [torch.equal(a, b) for a, b in zip(got, want)] == [True] * 5
    # per chunk: once (unguided: steps and cache pass hear one tensor) or twice (guided: the steps' 2 rows, then
    # the cache pass's 1); the reference's pass, before the first chunk, hears the first chunk's speech
    assert calls == ([1] + [2, 1] * 5 if guidance != 1.0 else [1] * 5)
    # the same tensor, changed in place or under changed weights: computed again; a new tensor: again
    x, ref2, speech, one, _, latent = inputs(B=1, F=1)
    t = torch.tensor([500.0])
    model.keep_speech = True

    def run():
        with torch.no_grad():
            return model(x, t, one, audio=speech, audio_latent=latent, ref=ref2).video
    calls.clear()
    a = run()
    assert torch.equal(run(), a) and calls == [1]
    speech.mul_(0.5)
    b = run()
    with torch.no_grad():
        model.blocks[1].audio_attn.v.weight.mul_(1.5)
    c = run()
    assert calls == [1, 1, 1] and (b - a).abs().max() > 1e-4 and (c - b).abs().max() > 1e-4
    model.keep_speech = False
    assert torch.equal(run(), c)                                          # what computing it every time gives
    monkeypatch.setattr("models.dit.tensor_version", lambda t: 0)              # the mutant: blind to in-place changes
    model.keep_speech = True
    run()
    speech.mul_(2.0)
    stale = run()
    model.keep_speech = False
    assert (run() - stale).abs().max() > 1e-4
    with torch.enable_grad():                                             # training: never kept
        model.keep_speech = True
        calls.clear()
        model(x, t, one, audio=speech, audio_latent=latent, ref=ref2)
        model(x, t, one, audio=speech, audio_latent=latent, ref=ref2)
        assert calls == [1, 1]
