"""Issue 18: a chunk's forwards write its keys/values after the context in the engine's buffers (KV.room) and
attend to the buffers' first n + L tokens, instead of concatenating [context, chunk] in every block of every
forward. The chunks are the concatenation's bit for bit (the ring filled and wrapped, TwinCache on and off,
with and without the sink), the in-place path is the one that ran, and a write at a wrong offset is caught."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models.config import PRESETS
from models.dit import KV, Attention, DiT
from stages.stream.engine import ChunkInputs, ContextBuffers, StreamEngine, StreamSettings

TINY = PRESETS["tiny"].replace(height=32, width=32)


@pytest.fixture(scope="module")
def model() -> DiT:
    """The tiny preset, two blocks, weights large enough (std 0.1, a generator of their own) that the context
    changes the frames."""
    cfg = dataclasses.replace(TINY.dit, num_layers=2)
    m = DiT(cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def stream(model, st: StreamSettings, chunks: int, room: bool, batch: int = 1, every=None):
    """The chunks of a stream (video, audio) with the room on or off; `every(engine)` after each chunk."""
    cfg = TINY.replace(dit=model.cfg)
    d, cf = cfg.dit, st.chunk_frames
    g = torch.Generator().manual_seed(3)
    text = torch.randn(batch, 5, d.text_dim, generator=g)
    audio = torch.randn(batch, chunks * cf + sum(d.audio_context), 16, d.audio_dim, generator=g)
    ref = torch.randn(batch, d.in_dim, 1, cfg.height // 8, cfg.width // 8, generator=g)
    eng = StreamEngine(model, cfg, st, batch=batch, seed=11)
    p = next(model.parameters())
    eng.buffers = ContextBuffers(cfg, st, batch, p.device, p.dtype, model.local_heads, model.rotate, room=room)
    eng.start(ref)
    out = []
    for j in range(chunks):
        r = eng.step(ChunkInputs(text, audio[:, j * cf:(j + 1) * cf + sum(d.audio_context)]))
        out.append((r.video, r.audio))
        if every is not None:
            every(eng)
    return eng, out


def forward_args(model, ctx, frame_pos) -> dict:
    """One frame's speech and (joint audio) noisy audio latent over the context `ctx`."""
    d = model.cfg
    return dict(kv=ctx, frame_pos=frame_pos, audio=torch.randn(1, 1 + sum(d.audio_context), 16, d.audio_dim),
                audio_latent=torch.randn(1, 1, d.audio_latent_tokens, d.audio_latent_dim) if d.joint_audio else None)


CASES = [dict(twin=True, sink=True), dict(twin=False, sink=True), dict(twin=True, sink=False),
         dict(twin=False, sink=False), dict(twin=True, sink=True, chunk_frames=2, window=4)]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_in_place_chunks_equal_the_concatenation_s(model, kw):
    """A window of 2 chunks, 7 chunks: the ring fills and wraps twice. Every chunk's latent equals the one with
    the room off bit for bit, and so does the state after every chunk (the writes after the context are
    overwritten by the chunk's own store before a state can be taken; the extra room is not in it)."""
    st = StreamSettings(**{"window": 2, "steps": 3, **kw})
    states = []

    def keep(eng):
        states.append({k: t.clone() for k, t in eng.state().items() if k.startswith(("k.", "v."))})

    on, got = stream(model, st, 7, room=True, every=keep)
    off, want = stream(model, st, 7, room=False, every=keep)
    assert on.buffers.k["clean"][0].shape[1] == on.buffers.capacity + st.chunk_frames * on.buffers.S
    assert off.buffers.k["clean"][0].shape[1] == off.buffers.capacity
    for j, ((v, a), (v0, a0)) in enumerate(zip(got, want)):
        assert torch.equal(v, v0), j
        assert (a is None) == (a0 is None) and (a is None or torch.equal(a, a0)), j
    assert len(set(torch.stack([v for v, _ in want]).flatten(1).sum(1).tolist())) == 7     # the chunks are not all one
    for j, (s_on, s_off) in enumerate(zip(states[:7], states[7:])):      # the state after every chunk: its
        assert s_on.keys() == s_off.keys()                                  # shapes and numbers (no scratch left)
        for k, t in s_on.items():
            assert t.shape == s_off[k].shape and torch.equal(t, s_off[k]), (j, k)


def test_a_batch_of_two_streams_equals_the_concatenation_s(model):
    st = StreamSettings(window=2, steps=3)
    got = stream(model, st, 5, room=True, batch=2)[1]
    want = stream(model, st, 5, room=False, batch=2)[1]
    assert all(torch.equal(v, v0) for (v, _), (v0, _) in zip(got, want))


def test_the_in_place_path_ran(model):
    """After each chunk, with the ring full before it, the buffers' extra room holds the keys/values the chunk's
    last forwards wrote there: the clean set the cache pass's (its values the ring slot the chunk went to), the
    noisy set the noisy step's (noisy_step = the last step before the clean one). With the room off the region
    is never written (zeros): this fails if the concatenation ran."""
    st = StreamSettings(window=2, steps=3, noisy_step=1)
    seen = []

    def check(eng):
        buf, S = eng.buffers, eng.buffers.S
        c = buf.capacity
        if buf.chunks_in_ring <= buf.slots:                # the ring was not full before this chunk
            return
        slot = (buf.chunks_in_ring - 1) % buf.slots
        a = (buf.n_fixed + slot * buf.cf) * S
        for s in ("clean", "noisy"):
            for i in range(len(buf.v[s])):
                room_v = buf.v[s][i][:, c:]
                assert room_v.abs().sum() > 0
                assert torch.equal(room_v, buf.v[s][i][:, a:a + buf.cf * S]), (s, i)
                torch.testing.assert_close(buf.k[s][i][:, c:], buf.k[s][i][:, a:a + buf.cf * S])
        seen.append(buf.chunks_in_ring)

    stream(model, st, 6, room=True, every=check)
    assert seen == [3, 4, 5]


def test_the_context_s_version_is_unchanged_by_the_forwards(model):
    """The forwards write through aliases of the buffers: the context views' version counter (what a backend's
    PrefixCache checks, vidu_kernels.prefix_cache) does not move, so INT8 attention keeps its quantized context
    keys across a chunk's steps; a real write into the buffers still moves it."""
    st = StreamSettings(window=2, steps=3)
    eng, _ = stream(model, st, 4, room=True)
    ctx, frame_pos = eng.buffers.context("clean")
    assert ctx.room is not None
    before = [k._version for k in ctx.k]
    x = torch.randn(1, model.cfg.in_dim, 1, 4, 4)
    with torch.no_grad():
        model(x, torch.tensor([500.0]), torch.randn(1, 5, model.cfg.text_dim), **forward_args(model, ctx, frame_pos))
    assert [k._version for k in ctx.k] == before
    assert eng.buffers.v["clean"][0][:, eng.buffers.capacity:].abs().sum() > 0     # it did write
    eng.buffers.k["clean"][0][:, -1:].zero_()
    assert ctx.k[0]._version != before[0]


def test_no_room_with_gradients_or_a_derived_kv(model, monkeypatch):
    """With gradients on (the distillation rollout) the forward concatenates: it never writes into the buffers;
    nor does a KV derived from the context (cat, tokens: no room)."""
    st = StreamSettings(window=2, steps=3)
    eng, _ = stream(model, st, 2, room=True)
    ctx, frame_pos = eng.buffers.context("clean")
    assert ctx.tokens(0, 16).room is None and ctx.cat(ctx).room is None
    seen = []
    real = Attention.self_attend
    monkeypatch.setattr(Attention, "self_attend", lambda self, *a: seen.append(len(a[3])) or real(self, *a))
    x = torch.randn(1, model.cfg.in_dim, 1, 4, 4)
    args = forward_args(model, ctx, frame_pos)
    with torch.no_grad():
        model(x, torch.tensor([500.0]), torch.randn(1, 5, model.cfg.text_dim), **args)
    assert seen == [6, 6]
    seen.clear()
    model(x, torch.tensor([500.0]), torch.randn(1, 5, model.cfg.text_dim), **args).video.sum().backward()
    assert seen == [4, 4]
    model.zero_grad(set_to_none=True)
    seen.clear()
    with torch.no_grad():
        model(x, torch.tensor([500.0]), torch.randn(1, 5, model.cfg.text_dim), **{**args, "kv": KV(
            ctx.k, ctx.v, ctx.pos, True, room=([k.clone() for k in ctx.room[0]], ctx.room[1]))})
    assert seen == [4, 4]                                    # buffers that are not the context's memory: refused


def test_a_write_at_a_wrong_offset_changes_the_chunks(model, monkeypatch):
    """Negative control: the buffers handed to the forwards one token off (written at n + 1, attending to tokens
    1..n + L) give other chunks; the comparison above would catch it."""
    st = StreamSettings(window=2, steps=3)
    want = stream(model, st, 4, room=True)[1]
    real = Attention.self_attend

    def off_by_one(self, x, rope, mask, ctx=None, sp=None):
        if ctx is not None and len(ctx) > 4:
            ctx = (*ctx[:4], ctx[4][:, 1:], ctx[5][:, 1:])
        return real(self, x, rope, mask, ctx, sp)

    monkeypatch.setattr(Attention, "self_attend", off_by_one)
    got = stream(model, st, 4, room=True)[1]
    assert not all(torch.equal(v, v0) for (v, _), (v0, _) in zip(got, want))
