"""Several streams' chunks in one batched forward (stages/stream/batch.py) against the oracle: the same
engines, with the same seeds and inputs, stepped one by one. Streams at different places in their
windows (ring slots in another order, windows still filling beside full ones), with different references, texts, speech and noise, an
instruction switch mid-batch, TwinCache, guidance, recache; a swap of two streams' inputs must break
the match (negative control), and engines that cannot share a batch are refused."""
from __future__ import annotations

import pytest
import torch

from stages.stream.batch import step_batch
from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings
from tests.test_stream_engine import TINY, scrambled

TOL = 1e-5          # max |batched - alone| on latents of unit scale: float32 summation order of a larger matmul


def stream_inputs(n: int, chunks: int, cf: int, seed: int = 11):
    """Per stream: a reference latent, two texts (the second an instruction switch) and its speech."""
    g, d = torch.Generator().manual_seed(seed), TINY.dit
    out = []
    for _ in range(n):
        ref = torch.randn(1, d.in_dim, 1, TINY.height // 8, TINY.width // 8, generator=g)
        texts = [torch.randn(1, 5, d.text_dim, generator=g), torch.randn(1, 7, d.text_dim, generator=g)]
        audio = torch.randn(1, chunks * cf + sum(d.audio_context), 16, d.audio_dim, generator=g)
        out.append((ref, texts, audio))
    return out


class Streams:
    """n engines over one model, engine i seeded 100 + i, each with its own inputs; `inputs(i)` is its
    next chunk's (its text switches at chunk `switch`)."""

    def __init__(self, model, st: StreamSettings, given, switch: int):
        self.given, self.switch, self.cf = given, switch, st.chunk_frames
        self.engines = []
        for i, (ref, _, _) in enumerate(given):
            e = StreamEngine(model, TINY, st, seed=100 + i, keep_text=True)
            e.start(ref)
            self.engines.append(e)

    def inputs(self, i: int) -> ChunkInputs:
        e, (_, texts, audio) = self.engines[i], self.given[i]
        j, d = e.chunks, TINY.dit
        text = texts[int(j >= self.switch)]
        if e.st.recache and j == self.switch:
            e.recache(text)
        return ChunkInputs(text, audio[:, j * self.cf:(j + 1) * self.cf + sum(d.audio_context)])


def run_both(st: StreamSettings, lead: list[int], rounds: int, n_chunks: int = 16, swap: bool = False):
    """Two copies of the same streams: stream i first steps lead[i] chunks alone (both copies), then each
    round steps every stream once, alone in copy A and all in one batch in copy B. Returns the largest
    |B - A| per round (video and joint audio latents) and the copies."""
    model = scrambled(TINY.dit)
    given = stream_inputs(len(lead), n_chunks, st.chunk_frames)
    a, b = Streams(model, st, given, switch=6), Streams(model, st, given, switch=6)
    with torch.no_grad():
        for i, k in enumerate(lead):
            for _ in range(k):
                a.engines[i].step(a.inputs(i))
                b.engines[i].step(b.inputs(i))
        diffs = []
        for _ in range(rounds):
            alone = [e.step(a.inputs(i)) for i, e in enumerate(a.engines)]
            inputs = [b.inputs(i) for i in range(len(lead))]
            if swap:
                inputs[0], inputs[1] = inputs[1], inputs[0]
            batched = step_batch(b.engines, inputs)
            diffs.append(max(max(float((x.video - y.video).abs().max()), float((x.audio - y.audio).abs().max()))
                             for x, y in zip(alone, batched)))
    return diffs, a, b


SETTINGS = {
    "twin-renoise": StreamSettings(chunk_frames=1, steps=3, window=3),
    "guided-euler-recache": StreamSettings(chunk_frames=2, steps=3, window=4, twin=False, sampler="euler",
                                           guidance=2.0, recache=True),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_batched_streams_equal_the_streams_stepped_alone(name):
    st = SETTINGS[name]
    full = 1 + st.slots                       # chunks until the window is full: from then on any two can batch
    lead = [full, full + 1, full + 4]         # ring slots in three different orders; stream 0 switches text mid-run
    diffs, a, b = run_both(st, lead, rounds=4)
    assert max(diffs) <= TOL, diffs
    for ea, eb in zip(a.engines, b.engines):  # the caches each engine keeps for its next chunks, too
        sa, sb = ea.state(), eb.state()
        assert ea.chunks == eb.chunks and sa["slot_chunk"] == sb["slot_chunk"]
        assert torch.equal(sa["gen"], sb["gen"])
        for k in sa:
            if torch.is_tensor(sa[k]) and sa[k].is_floating_point():
                assert float((sa[k] - sb[k]).abs().max()) <= TOL, k


def test_streams_batched_from_their_first_chunk():
    st = SETTINGS["twin-renoise"]
    diffs, _, _ = run_both(st, [0, 0, 0], rounds=6)      # the reference context built, the window filling, all batched
    assert max(diffs) <= TOL, diffs


@pytest.mark.parametrize("name", SETTINGS)
def test_streams_filling_their_windows_batch_with_full_ones(name):
    # a newcomer (chunk 0: the reference alone), one half-way and two with full rings at other slot orders: four
    # context lengths in one forward, the shorter ones padded and masked, each stepped as if alone
    st = SETTINGS[name]
    full = 1 + st.slots
    diffs, a, b = run_both(st, [0, 1, full, full + 2], rounds=full + 1)
    assert max(diffs) <= TOL, diffs
    for ea, eb in zip(a.engines, b.engines):
        assert ea.chunks == eb.chunks and torch.equal(ea.state()["gen"], eb.state()["gen"])


def test_a_padded_context_unmasked_breaks_the_match(monkeypatch):
    # negative control: the same batch with the padding left visible to the queries
    import models.dit as dit
    monkeypatch.setattr(dit, "_key_mask", lambda tok, valid, Lq: tok)
    st = SETTINGS["twin-renoise"]
    diffs, _, _ = run_both(st, [0, 1 + st.slots], rounds=1)
    assert diffs[0] > 1e-3, diffs


def test_swapped_inputs_break_the_match():
    st = SETTINGS["twin-renoise"]
    diffs, _, _ = run_both(st, [4, 5, 6], rounds=2, swap=True)
    assert min(diffs) > 1e-2, diffs


def test_engines_that_cannot_share_a_batch_are_refused():
    model = scrambled(TINY.dit)
    st = SETTINGS["twin-renoise"]
    given = stream_inputs(2, 8, 1)
    s = Streams(model, st, given, switch=99)
    with torch.no_grad():
        s.engines[1].switch_steps(StreamSettings(chunk_frames=1, steps=4, window=3, noisy_step=1))
        with pytest.raises(ValueError, match="cannot share a batch"):     # another step count
            step_batch(s.engines, [s.inputs(0), s.inputs(1)])
        with pytest.raises(ValueError, match="appears twice"):
            step_batch([s.engines[0], s.engines[0]], [s.inputs(0), s.inputs(0)])
