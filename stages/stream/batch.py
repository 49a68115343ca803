"""Several streams' next chunks in one batched forward of the DiT (`vidu serve`'s sessions on one device).

    results = step_batch([eng_a, eng_b], [inputs_a, inputs_b])   # == [eng_a.step(inputs_a), eng_b.step(inputs_b)]
    outcomes = next_chunks([session_a, session_b])                # == [s.next_chunk() for s in (session_a, ...)]

Each engine keeps its own state (caches, reference, noise generator, chunk count) and its own inputs
(text, speech). `StreamEngine.begin_chunk` draws each engine's noise and hands its context (keys rotated to
the engine's own absolute positions); the B engines' latents, contexts (each moved to the first engine's
positions: one more rotation of the engines at other chunk counts), prepared texts and speech features are
then stacked along the batch dimension, so every denoising step and the cache pass is one forward for all B;
each engine renoises its rows from its own generator (the draws a lone step makes, in the same order)
and stores its rows of the keys/values in its own buffers. A stream still filling its window batches with
full ones: its shorter context is padded to the longest and the padding masked out of every query's keys
(KV.valid). Engines whose `batch_key()`s differ (other steps or settings, size) cannot share a batch:
ValueError; the caller groups them. The results equal the engines stepped one by one up to the float
summation order of a larger matmul (tests/test_stream_batch.py).

Cost: the stacked contexts are one more copy of the B contexts per chunk (rotated on the way where an
engine's positions differ from the first's); a batch with a padded row attends through a masked SDPA call
(the fast attention backends take no mask) over the longest context for every row.
"""
from __future__ import annotations

import time

import torch

from models.dit import KV, TextCache
from models.rope import frame_shift_angles
from stages.stream.engine import ChunkInputs, ChunkResult, StreamEngine, cache_pass, denoise_chunk


def step_batch(engines: list[StreamEngine], inputs: list[ChunkInputs]) -> list[ChunkResult]:
    """Engine i's next chunk from inputs[i], all in one batch: ValueError when they cannot share one."""
    if not engines or len(engines) != len(inputs):
        raise ValueError(f"{len(engines)} engines and {len(inputs)} inputs: one input per engine")
    if len(engines) == 1:
        return [engines[0].step(inputs[0])]
    if len({id(e) for e in engines}) != len(engines):
        raise ValueError("an engine appears twice in the batch: one chunk per engine")
    keys = [e.batch_key() for e in engines]
    odd = next((i for i, k in enumerate(keys) if k != keys[0]), None)
    if odd is not None:
        raise ValueError(f"engine {odd} cannot share a batch with engine 0: another model, settings or size")
    if any((i.audio is None) != (inputs[0].audio is None) or not torch.is_tensor(i.text) for i in inputs):
        raise ValueError("batched chunks need text features as tensors and speech for all or none")
    with torch.no_grad():
        return _step(engines, inputs)


def _step(engines: list[StreamEngine], inputs: list[ChunkInputs]) -> list[ChunkResult]:
    e0, st = engines[0], engines[0].st
    starts = [e.begin_chunk(i) for e, i in zip(engines, inputs)]
    rows, lo = [], 0
    for e in engines:
        rows.append(slice(lo, lo + e.batch))
        lo += e.batch
    x = torch.cat([c.x for c in starts])                           # [B, C, F, h, w]
    xa = None if starts[0].xa is None else torch.cat([c.xa for c in starts])
    frame_pos, guided = starts[0].frame_pos, st.guidance != 1.0
    moves = [int(frame_pos[0] - c.frame_pos[0]) for c in starts]     # each engine's layout to engine 0's positions
    ctx_clean = _stack([c.ctx_clean for c in starts], moves, e0.model)
    ctx_noisy = _stack([c.ctx_noisy for c in starts], moves, e0.model) if st.twin else ctx_clean
    audio = None if inputs[0].audio is None else torch.cat([i.audio for i in inputs])
    both = ChunkInputs(_cat_padded([i.text for i in inputs]), audio)
    plain = _stack_text([c.plain for c in starts], False)
    steps = _stack_text([c.steps for c in starts], guided)
    del starts                                                     # the per-engine contexts: stacked now

    def renoise(x0, xa0, s):                                       # each engine's rows from its own generator
        drawn = [e._renoise(x0[r], None if xa0 is None else xa0[r], s) for e, r in zip(engines, rows)]
        return torch.cat([d[0] for d in drawn]), None if xa0 is None else torch.cat([d[1] for d in drawn])

    result, noisy_kv = denoise_chunk(e0.model, x, xa, e0.sig, both, ctx_noisy, ctx_clean, frame_pos,
                                     st.noisy_step if st.twin else None,
                                     renoise if st.sampler == "renoise" else None, st.guidance, st.guide, None, steps)
    clean_kv = cache_pass(e0.model, result.video, result.audio, both if plain is None else ChunkInputs(plain, audio),
                          ctx_clean, frame_pos)
    out = []
    for e, r, i in zip(engines, rows, inputs):
        mine = ChunkResult(result.video[r], _rows(result.audio, r), [s[r] for s in result.states],
                           [_rows(a, r) for a in result.audio_states])
        noisy = (mine.states[st.noisy_step], mine.audio_states[st.noisy_step]) if st.twin else (None, None)
        e.store_chunk(mine, noisy, None if noisy_kv is None else _kv_rows(noisy_kv, r), _kv_rows(clean_kv, r), i)
        e.chunks += 1
        out.append(mine)
    return out


def next_chunks(sessions: list, timing: dict | None = None) -> list:
    """Each Session's (stages/stream/session.py) next chunk, generated in one batch: per session what
    `next_chunk()` returns, or the exception its chunk raised (its inputs, its decoding); an error of the
    batched forward is every session's in it. The sessions' engines must share a `batch_key`. `timing` (a
    dict): filled with the seconds of "prepare" (events, speech features, texts), "forward" (the batched
    chunk, a newcomer's reference pass included) and "finish" (decoding, audio out), the device synchronized
    at each boundary (`vidu serve --trace`: a GPU's queued work counted where it was asked for)."""
    out: list = [None] * len(sessions)
    prepared = []
    lap = _Laps(timing, sessions[0].p.engine.device if sessions else None)
    for i, s in enumerate(sessions):
        try:
            prepared.append((i, *s.prepare_chunk()))
        except Exception as e:                     # noqa: BLE001 (a session's error is its own)
            out[i] = e
    lap("prepare")
    if not prepared:
        return out
    try:
        results = step_batch([sessions[i].p.engine for i, _, _ in prepared], [inp for _, inp, _ in prepared])
    except Exception as e:                         # noqa: BLE001
        for i, _, _ in prepared:
            out[i] = e
        return out
    lap("forward")
    for (i, _, pending), result in zip(prepared, results):
        try:
            out[i] = sessions[i].finish_chunk(result, pending)
        except Exception as e:                     # noqa: BLE001
            out[i] = e
    lap("finish")
    return out


class _Laps:
    """next_chunks' `timing`: each call records the seconds since the last (the device synchronized first);
    nothing when timing is None."""

    def __init__(self, timing: dict | None, device):
        self.timing, self.device = timing, torch.device(device) if device is not None else None
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.timing is None:
            return
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        self.timing[name] = t - self.t
        self.t = t


def _rows(t: torch.Tensor | None, r: slice) -> torch.Tensor | None:
    return None if t is None else t[r]


def _kv_rows(kv: KV, r: slice) -> KV:
    return KV([k[r] for k in kv.k], [v[r] for v in kv.v], kv.pos, kv.rotated)


def _stack(kvs: list[KV], moves: list[int], model) -> KV:
    """Rotated contexts -> one of their rows stacked, engine i's keys moved by moves[i] frames to engine 0's
    absolute positions (the engines are at other chunk counts: other absolute positions; RoPE rotations
    compose), so every row's chunk attends from engine 0's positions; by the model's rotation (DiT.rotate: the
    fused kernel under use_kernels). Contexts shorter than the longest (a stream still filling its window) are
    padded after their tokens with zeros that KV.valid marks and the forward masks out."""
    assert all(kv.rotated for kv in kvs)
    dev, D = kvs[0].k[0].device, kvs[0].k[0].shape[-1]
    turns = {m: frame_shift_angles(m, D, dev) for m in set(moves) if m}
    longest = max(kvs, key=len)
    L = len(longest)

    def moved(k: torch.Tensor, m: int) -> torch.Tensor:
        return model.rotate(KV([k], [], longest.pos[:k.shape[1]], angles=turns[m])).k[0] if m else k

    def padded(t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[1] == L else torch.nn.functional.pad(t, (0, 0, 0, 0, 0, L - t.shape[1]))

    valid = None
    if any(len(kv) != L for kv in kvs):
        valid = torch.cat([torch.arange(L, device=dev).expand(kv.k[0].shape[0], L) < len(kv) for kv in kvs])
    return KV([torch.cat([padded(moved(k, m)) for k, m in zip(ks, moves)]) for ks in zip(*(kv.k for kv in kvs))],
              [torch.cat([padded(v) for v in vs]) for vs in zip(*(kv.v for kv in kvs))], longest.pos, rotated=True,
              valid=valid)


def _stack_text(caches: list[TextCache | None], guided: bool) -> TextCache | None:
    """Prepared texts -> one of all their rows; under guidance each holds [conditional; unconditional]
    rows and the stack all conditional rows first, as denoise_chunk's doubled batch is laid out."""
    if any(c is None for c in caches):
        return None
    if any(c.frames for c in caches):
        raise ValueError("batched chunks take one text per stream, not a text per frame")

    def cat(ts: list[torch.Tensor]) -> torch.Tensor:
        if not guided:
            return torch.cat(ts)
        halves = [t.chunk(2) for t in ts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])

    kv = [(cat([c.kv[b][0] for c in caches]), cat([c.kv[b][1] for c in caches])) for b in range(len(caches[0].kv))]
    pooled = None if caches[0].pooled is None else cat([c.pooled for c in caches])
    return TextCache(kv, pooled, sum(c.rows for c in caches), 0, 0)


def _cat_padded(texts: list[torch.Tensor]) -> torch.Tensor:
    """Text features [b, L_i, D] -> [sum b, max L, D], zero-padded (the model pads a text with zeros)."""
    L = max(t.shape[1] for t in texts)
    return torch.cat([torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[1])) for t in texts])
