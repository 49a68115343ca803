"""The streaming engine: autoregressive chunk generation over a bounded attention context.

Per chunk (`chunk_frames` latent frames), `denoise_chunk` runs the flow sampler (`sampler`): "renoise",
the distilled student's few steps (predict x0, renoise it to the next level), or "euler", the teacher's
flow ODE (x <- x + (s' - s) v, the last step landing on x0); with `guidance` g != 1 each step also runs
an unconditional pass (text and speech nulled as condition dropout nulls them, or with `guide="text"`
the text alone; the reference is kept: it is the identity, not a condition to guide away from) and uses
v_u + g (v_c - v_u). Every step
attends to

    [ reference frame | sink: first generated chunk | history ring (window) ] + current chunk
      built once        built once, clean            noisy or clean cache

Keys are cached rotated (RoPE applied) at their frames' absolute positions: a history chunk's once, when
it is written; only the reference and sink, whose offsets to the newest chunks stay those of the window
layout, are re-rotated as the window slides (`ContextBuffers`). The offsets between positions, all that
RoPE attention reads, are the window layout's (ref 0, sink, ring chunks by age, the chunk: never more than
1 + sink + window + chunk frames apart) however long the stream runs; angles in float64 keep a position
10^6 frames in as exact as one at the start.
TwinCache: each history chunk keeps a noisy cache (its keys/values at denoising step
`noisy_step`) and a clean cache (one extra pass over the final state at t = 0); intermediate steps
attend to the noisy cache, the final step to the clean one. `twin=False` is the single clean cache.
Recache (LongLive, `recache=True`): the engine keeps each cached chunk's clean latent, noisy-step
state and speech features, and `StreamEngine.recache(text)` recomputes the sink's and ring's keys/values
under a new text at their current positions (the session calls it when an instruction changes the text).

All cache memory is allocated once (`ContextBuffers`); per-chunk work and memory do not depend on
how many chunks came before. `denoise_chunk` and `cache_pass` are free functions over the model, so
that they can become the torch.compile / CUDA-graph boundary; nothing compiles them yet (the engine
runs eagerly; benchmarks/stream_fps.py measures that).

Several streams in one forward: stages/stream/batch.py runs engines with equal `batch_key()`s as one
batch (`begin_chunk` per engine, the forwards over their rows stacked, `store_chunk` per engine).

One session on N ranks: a model sharded over a process group (`DiT.shard_sequence`, Ulysses,
models/ulysses.py) streams with every rank stepping its own engine with the same inputs and seed; each
gets the same chunks, and its buffers hold its num_heads / N heads of every cached token.

`StreamSettings.resolve(cfg, trained, **given)` picks a stream's settings: the ones a checkpoint was
trained for (its "sampling" metadata, stages/train/sample.py), else the defaults with the model's
chunk size, with the given ones on top; a setting training never saw is refused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from models.config import ModelConfig
from models.dit import GUIDES, KV, DiT, DiTOutput, TextCache, guided, guided_conditions, tensor_version
from models.flow import SHIFT, add_noise, sigmas as flow_sigmas, step_at_level, timestep, x0_from_velocity
from models.rope import grid_tables
from stages.run import ranged
from stages.stream.events import StreamError

SAMPLERS = ("renoise", "euler")


@dataclass(frozen=True)
class StreamSettings:
    chunk_frames: int = ranged(1, min=1, max=64)   # latent frames per chunk (resolve(): ModelConfig.chunk_frames)
    steps: int = ranged(3, min=1, max=1000)        # denoising steps per chunk
    shift: float = ranged(SHIFT, gt=0, max=1000)   # flow schedule shift (the checkpoint's)
    window: int = ranged(8, min=1, max=4096)       # latent frames of history kept in the sliding window
    sink: bool = True          # keep the first generated chunk as persistent context
    twin: bool = True          # TwinCache (noisy + clean history); False: clean cache only
    noisy_step: int = ranged(1, min=0, max=999)    # denoising step whose keys/values form the noisy cache
    sampler: str = ranged("renoise", choices=SAMPLERS)   # x0-and-renoise (distilled student) | euler (teachers' ODE)
    guidance: float = ranged(1.0, min=0, max=100)  # classifier-free guidance scale (1: off, one pass per step)
    guide: str = ranged("all", choices=GUIDES)     # what the unconditional pass nulls: text and speech | text alone
    recache: bool = False      # recompute the history's keys/values when the text changes (LongLive)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"the sampler is one of: {', '.join(SAMPLERS)}, not {self.sampler!r}")
        if self.guide not in GUIDES:
            raise ValueError(f"guide is one of: {', '.join(GUIDES)}, not {self.guide!r}")
        if not 0 <= self.guidance <= 100:
            raise ValueError(f"guidance must be in 0..100, not {self.guidance:g}")
        if self.chunk_frames < 1 or self.steps < 1:
            raise ValueError("chunk_frames and steps must be >= 1")
        if self.window < self.chunk_frames or self.window % self.chunk_frames:
            raise ValueError(f"window ({self.window}) must be a positive multiple of chunk_frames ({self.chunk_frames})")
        if self.twin and not 0 <= self.noisy_step < self.steps - 1:
            raise ValueError(f"noisy_step must be an intermediate step, 0..{self.steps - 2} (or use --no-twin)")

    @property
    def slots(self) -> int:
        return self.window // self.chunk_frames

    @property
    def positions(self) -> int:
        """Latent frames one step attends over: ref + sink + window + the chunk (RoPE positions used)."""
        return 1 + (self.chunk_frames if self.sink else 0) + self.window + self.chunk_frames

    @classmethod
    def resolve(cls, cfg: ModelConfig, trained: dict | None = None, **given) -> "StreamSettings":
        """A stream's settings: `given` (None = not given) over those of `trained` (a checkpoint's
        "sampling" metadata), else over the defaults with chunk_frames = cfg.chunk_frames. Raises
        StreamError (one line) for a value the model never saw in training."""
        names = {f.name for f in dataclasses.fields(cls)}
        base = {k: trained[k] for k in names if trained and k in trained}
        if not trained:
            base["chunk_frames"] = cfg.chunk_frames
            window = next(f.default for f in dataclasses.fields(cls) if f.name == "window")
            base["window"] = max(window, cfg.chunk_frames) // cfg.chunk_frames * cfg.chunk_frames
        given = {k: v for k, v in given.items() if v is not None}
        unknown = set(given) - names
        if unknown:
            raise TypeError(f"unknown stream settings: {', '.join(sorted(unknown))}")
        if trained and given.get("chunk_frames", trained["chunk_frames"]) != trained["chunk_frames"]:
            raise StreamError(_never_saw(f"--chunk-frames {given['chunk_frames']}: it was trained with chunks "
                                         f"of {trained['chunk_frames']} latent frames"))
        if trained and {"steps", "shift"} & set(given) and "noisy_step" not in given:   # another schedule
            k = step_at_level(trained.get("noisy_level"), given.get("steps", base["steps"]),
                              given.get("shift", base["shift"]))
            base["noisy_step"] = k or 0
            base["twin"] = k is not None
        try:
            st = cls(**{**base, **given})
        except ValueError as e:
            raise StreamError(str(e)) from None
        if trained:
            st.check_trained(trained)
        return st

    def check_trained(self, trained: dict) -> None:
        """StreamError when these settings go beyond what the checkpoint's training saw."""
        cf = trained["chunk_frames"]
        if self.chunk_frames != cf:
            raise StreamError(_never_saw(f"--chunk-frames {self.chunk_frames}: it was trained with chunks "
                                                  f"of {cf} latent frames"))
        seen = StreamSettings(chunk_frames=cf, window=trained["window"], sink=trained["sink"], twin=False).positions
        if self.positions > seen:
            raise StreamError(_never_saw(f"--window {self.window}{' with --sink' if self.sink else ''}: "
                                                  f"ref + sink + window + chunk span {self.positions} latent frames, "
                                                  f"training saw {seen} (window <= {trained['window']})"))
        if self.twin:
            level = trained.get("noisy_level")
            noisy = flow_sigmas(self.steps, self.shift)[self.noisy_step]
            if level is None or noisy > level + 1e-9:
                seen_noise = "clean history only" if level is None else f"history noise up to {level:g}"
                raise StreamError(_never_saw(f"a noisy cache at noise {noisy:.3f} (step {self.noisy_step}): "
                                                      f"it saw {seen_noise}; use --no-twin or a later --noisy-step"))


def _never_saw(what: str) -> str:
    return f"the checkpoint never saw {what}"


def context_chunks(chunk: int, slots: int, sink: bool) -> list[int]:
    """The chunks generated before chunk `chunk` (0-based) that it attends to, in RoPE order: the sink
    (chunk 0) when kept, then the newest `slots` others, oldest first. Its context is laid out at frame
    positions ref 0, these chunks' frames 1, 2, ... in this order, then its own frames; the engine's
    buffers and stage 2 training (stages/train/objectives.py) both place frames by this function."""
    first_ring = 1 if sink else 0
    return ([0] if sink and chunk > 0 else []) + list(range(max(first_ring, chunk - slots), chunk))


class ContextBuffers:
    """Preallocated keys/values for [ref | sink | ring] per block: one clean set, and a noisy set
    under TwinCache (ref and sink are written to both). Tokens are frame-major, S per frame; `heads`:
    the model's local_heads.

    Keys are kept rotated (RoPE applied), each at its frame's absolute position: the window layout of
    `frame_positions` (ref 0, sink, ring chunks by age, then the next chunk) moved up by `shift()`, the
    frames the window has slid past. A ring chunk's keys are rotated once, when written: its absolute
    position never changes, and only the offsets between positions enter attention (RoPE's relative
    property), so the chunk attending to it sees the offsets of the window layout. The ref and sink
    stay at their window positions, which move in absolute terms every chunk once the ring is full: their
    keys are also kept before RoPE (`fixed_k`) and re-rotated to the new shift by `context` (ref + sink
    frames, not the whole window: the per-chunk rotation of every cached key cost 8 % of a compiled
    960x544 chunk, RESULTS.md session 46). Angles are float64 (models.rope), so a stream 10^6 frames in
    attends as one at its start.

    Room (issue 18): each k/v buffer holds `capacity` tokens and a chunk's (cf * S) more. The valid context is
    always the buffer's first n tokens (ref, then the sink, then the ring slots in order; the sink is written
    before any ring chunk), and what follows it is free: the next ring slot, or once the ring is full the extra
    room. `context` hands the buffers with the KV (KV.room), and a forward without gradients writes the chunk's
    keys/values there and attends to the buffer's first n + L tokens instead of concatenating the whole window
    in every block of every forward; the next write (write_ring, write_fixed + _place_fixed) overwrites them.
    The forwards write through aliases of the buffers' memory with version counters of their own, so those
    scratch writes leave the context views' version (vidu_kernels.prefix_cache) unchanged; every real write
    goes through the buffers. `room=False` (or setting `.room` on a live engine's buffers) concatenates, as
    before: the switch benchmarks measure it by. state() / load_state() cover the first `capacity` tokens."""

    def __init__(self, cfg: ModelConfig, st: StreamSettings, batch: int, device, dtype, heads: int, rotate,
                 room: bool = True):
        """`rotate`: KV -> KV with its keys rotated to its positions (the model's DiT.rotate)."""
        d = cfg.dit
        self.rotate = rotate
        self.S = cfg.tokens_per_frame()
        self.h, self.w = cfg.height // 8 // d.patch_size[1], cfg.width // 8 // d.patch_size[2]
        self.cf, self.slots = st.chunk_frames, st.slots
        self.n_fixed = 1 + (st.chunk_frames if st.sink else 0)          # frames: ref (+ sink)
        frames = self.n_fixed + st.window
        self.capacity = frames * self.S             # tokens of ref + sink + ring (what state() covers)
        self.room = room                            # the forwards write the chunk after the context (see above)
        shape = (batch, self.capacity + (self.cf * self.S if room else 0), heads, d.head_dim)
        sets = ("clean", "noisy") if st.twin else ("clean",)
        self.k = {s: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(d.num_layers)] for s in sets}
        self.v = {s: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(d.num_layers)] for s in sets}
        self._room = {s: ([_alias(k) for k in self.k[s]], [_alias(v) for v in self.v[s]]) for s in sets}
        fixed = (batch, self.n_fixed * self.S, heads, d.head_dim)
        self.fixed_k = [torch.zeros(fixed, device=device, dtype=dtype) for _ in range(d.num_layers)]  # before RoPE
        self.fixed_shift: int | None = None   # the shift the ref and sink keys are rotated to (None: not yet)
        self.fixed_frames = 0          # ref and sink frames written so far
        self.chunks_in_ring = 0        # ring chunks written so far (all time)
        self.slot_chunk = [0] * self.slots  # which ring chunk each slot holds
        self.audio_tokens, self.head_dim = d.audio_latent_tokens, d.head_dim

    def _tables(self, frames) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return grid_tables(tuple(int(f) for f in frames), self.h, self.w, self.audio_tokens, self.head_dim,
                           self.k["clean"][0].device)

    def write(self, which: tuple[str, ...], kv: KV, frame_start: int, rows: torch.Tensor | None = None) -> None:
        """Keys/values before RoPE of whole frames into buffer frames frame_start.. of the sets `which`:
        ref and sink frames kept as they are (and rotated by `context`), ring frames rotated to their
        absolute positions (the frames' bookkeeping must already place them: write_ring, recache).
        `rows` (bool [B]): only those rows are written (a batch's recache of the streams that switched)."""
        a, b = frame_start * self.S, frame_start * self.S + len(kv)
        fixed = frame_start < self.n_fixed

        def put(buf: torch.Tensor, x: torch.Tensor) -> None:
            if rows is None:
                buf[:, a:b].copy_(x)
            else:
                buf[:, a:b][rows] = x[rows]
        if fixed:
            for i, k in enumerate(kv.k):
                put(self.fixed_k[i], k)
            self.fixed_shift = None
        else:
            frames = self.frame_positions()[0][frame_start:frame_start + len(kv) // self.S] + self.shift()
            pos, cos, sin = self._tables(frames.tolist())
            keys = self.rotate(KV(kv.k, kv.v, pos, angles=(cos, sin))).k
        for s in which:
            for i in range(len(kv.k)):
                if not fixed:
                    put(self.k[s][i], keys[i])
                put(self.v[s][i], kv.v[i])

    def write_fixed(self, kv: KV) -> int:
        """Ref or sink keys/values into both sets, the keys rotated at once (what `context` would do next: a
        forward's writes after the ref alone, KV.room, fall where the sink goes, and the buffers are never left
        holding them); returns the frame they start at."""
        start, frames = self.fixed_frames, len(kv) // self.S
        self.fixed_frames += frames
        self.write(tuple(self.k), kv, start)
        self._place_fixed(self.shift())
        return start

    def write_ring(self, clean: KV, noisy: KV | None) -> int:
        """A history chunk into the next ring slot; returns the frame it starts at."""
        slot = self.chunks_in_ring % self.slots
        self.slot_chunk[slot] = self.chunks_in_ring
        self.chunks_in_ring += 1
        start = self.n_fixed + slot * self.cf
        self.write(("clean",), clean, start)
        if "noisy" in self.k:
            self.write(("noisy",), noisy, start)
        return start

    def _done(self) -> int:
        """Chunks generated and stored so far (the sink counts)."""
        return (1 if self.n_fixed > 1 and self.fixed_frames > 1 else 0) + self.chunks_in_ring

    def frame_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE frame positions, in the window layout, of the buffer's valid frames (in buffer order) and of the
        next chunk, as `context_chunks` lays them out: ref 0, sink next, ring chunks by age, the current chunk
        last (the absolute positions are these + shift())."""
        sink = self.n_fixed > 1
        rank = {c: r for r, c in enumerate(context_chunks(self._done(), self.slots, sink))}
        first_ring = 1 if sink else 0
        parts = [torch.arange(min(self.fixed_frames, 1))]
        if self.fixed_frames > 1:
            parts.append(1 + torch.arange(self.cf))
        parts += [1 + (rank[c + first_ring]) * self.cf + torch.arange(self.cf)
                  for c in self.slot_chunk[: min(self.chunks_in_ring, self.slots)]]
        return torch.cat(parts), 1 + len(rank) * self.cf + torch.arange(self.cf)

    def shift(self) -> int:
        """Frames the window layout has slid past: the next chunk (chunk n) is at absolute frame 1 + n * cf."""
        done = self._done()
        return (done - len(context_chunks(done, self.slots, self.n_fixed > 1))) * self.cf

    def _place_fixed(self, shift: int) -> None:
        """The ref and sink keys of both sets rotated to their window positions + shift."""
        if self.fixed_shift == shift or self.fixed_frames == 0:
            return
        n = self.fixed_frames * self.S
        pos, cos, sin = self._tables(range(shift, shift + self.fixed_frames))
        keys = self.rotate(KV([k[:, :n] for k in self.fixed_k], [], pos, angles=(cos, sin))).k
        for i, k in enumerate(keys):
            for s in self.k:
                self.k[s][i][:, :n].copy_(k)
        self.fixed_shift = shift

    def context(self, which: str) -> tuple[KV, torch.Tensor]:
        """The valid context (views, no copy; keys rotated, the ref and sink to the current shift) with token
        positions, and the next chunk's frame positions (absolute)."""
        frames, nxt = self.frame_positions()
        shift = self.shift()
        self._place_fixed(shift)
        n = frames.numel() * self.S
        pos = grid_tables(tuple(frames.tolist()), self.h, self.w, self.audio_tokens, self.head_dim,
                          self.k["clean"][0].device)[0]
        if shift:
            pos = pos.clone()
            pos[:, 0] += shift
        kv = KV([k[:, :n] for k in self.k[which]], [v[:, :n] for v in self.v[which]], pos, rotated=True,
                room=self._room[which] if self.room else None)
        return kv, nxt + shift

    def state(self) -> dict:
        """The buffers and their bookkeeping, as tensors (views of the live buffers) and numbers."""
        out = {"fixed_frames": self.fixed_frames, "chunks_in_ring": self.chunks_in_ring,
               "slot_chunk": list(self.slot_chunk)}
        c = self.capacity
        for s in self.k:
            for i, (k, v) in enumerate(zip(self.k[s], self.v[s])):
                out[f"k.{s}.{i}"], out[f"v.{s}.{i}"] = k[:, :c], v[:, :c]
        out.update({f"k.fixed.{i}": k for i, k in enumerate(self.fixed_k)})
        return out

    def load_state(self, state: dict) -> None:
        c = self.capacity
        for s in self.k:
            for i in range(len(self.k[s])):
                self.k[s][i][:, :c].copy_(state[f"k.{s}.{i}"])
                self.v[s][i][:, :c].copy_(state[f"v.{s}.{i}"])
        for i, k in enumerate(self.fixed_k):
            k.copy_(state[f"k.fixed.{i}"])
        self.fixed_frames, self.chunks_in_ring = state["fixed_frames"], state["chunks_in_ring"]
        self.slot_chunk = list(state["slot_chunk"])
        self.fixed_shift = None


def _alias(t: torch.Tensor) -> torch.Tensor:
    """t's memory as a tensor of its own (no view of t): in-place writes through it do not bump t's version counter."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.shape,
                                                               t.stride())


@dataclass
class ChunkInputs:
    """Conditioning of one chunk (batch B, chunk frames F)."""
    text: torch.Tensor | TextCache              # [B, L, text_dim], or prepared (DiT.prepare_text)
    audio: torch.Tensor | None = None           # [B, before + F + after, K, audio_dim] speech features
    noise: torch.Tensor | None = None           # [B, C, F, h, w] initial noise (drawn when None)
    audio_noise: torch.Tensor | None = None     # [B, F, Na, Ca]


@dataclass
class ChunkStart:
    """A chunk's inputs to its forwards, as `StreamEngine.begin_chunk` makes them (batch B)."""
    x: torch.Tensor                             # [B, C, F, h, w] initial noise
    xa: torch.Tensor | None                     # [B, F, Na, Ca] joint audio noise
    ctx_noisy: KV                               # context of the steps before the last (keys rotated)
    ctx_clean: KV                               # context of the last step and the cache pass
    frame_pos: torch.Tensor                     # [F] RoPE frame positions of the chunk
    plain: TextCache | None                     # the text prepared for the cache pass (None: not kept)
    steps: TextCache | None                     # ... for the steps (under guidance its 2B rows)


@dataclass
class ChunkResult:
    video: torch.Tensor                         # [B, C, F, h, w] clean latent
    audio: torch.Tensor | None                  # [B, F, Na, Ca] clean joint audio latent
    states: list[torch.Tensor] = field(default_factory=list)         # x_t fed to each step
    audio_states: list[torch.Tensor | None] = field(default_factory=list)


def denoise_chunk(model: DiT, x: torch.Tensor, xa: torch.Tensor | None, sig: list[float], inputs: ChunkInputs,
                  ctx_noisy: KV, ctx_clean: KV, frame_pos: torch.Tensor, noisy_step: int | None,
                  renoise: "callable | None", guidance: float = 1.0, guide: str = "all",
                  exit_step: int | None = None, text: TextCache | None = None) -> tuple[ChunkResult, KV | None]:
    """Sampling of one chunk over the levels `sig`. `renoise(x0, xa0, s)` draws the next state from
    the predicted x0 (the x0-and-renoise sampler); None takes Euler steps of the flow ODE,
    x <- x + (s_next - s) v with s_next = 0 after the last level. `guidance` != 1: classifier-free
    guidance, v = v_u + g (v_c - v_u), both passes in one forward of batch 2B, the unconditional one with
    what `guide` nulls (models.dit.guided_conditions). Steps before the last
    attend to `ctx_noisy`, the last to `ctx_clean`; returns the clean chunk and, if `noisy_step` is
    set, the keys/values of that step (the conditional pass's). `exit_step` k (the distillation
    rollout, Self-Forcing): the chunk is step k's x0 and, with gradients on, only step k records them
    (the steps before it run under no_grad); the context each step reads is the one it reads with
    all steps. `text`: the steps' text prepared (DiT.prepare_text; under guidance its 2B rows,
    guided_conditions'), e.g. once per instruction, or None."""
    B = x.shape[0]
    two = guidance != 1.0
    if two:
        text2, audio2 = guided_conditions(inputs.text, inputs.audio, guide)
        inputs = ChunkInputs(text if text is not None else text2, audio2)
        same = ctx_noisy is ctx_clean
        ctx_clean = _twice(ctx_clean)
        ctx_noisy = ctx_clean if same else _twice(ctx_noisy)
    elif text is not None:
        inputs = ChunkInputs(text, inputs.audio)
    captured, states, audio_states = None, [], []
    x0 = xa0 = None
    stop = len(sig) - 1 if exit_step is None else exit_step
    for k, s in enumerate(sig[:stop + 1]):
        states.append(x)
        audio_states.append(xa)
        last = k == len(sig) - 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and _records_grad(k, exit_step)):
            out = _velocity(model, x, xa, s, inputs, ctx_clean if last else ctx_noisy, frame_pos,
                            k == noisy_step, guidance)
        if k == noisy_step:
            captured = _first_rows(out.kv, B) if two else out.kv
        v = out.video.to(x.dtype)
        va = None if xa is None else out.audio.to(xa.dtype)
        x0 = x0_from_velocity(x, v, s)
        xa0 = None if xa is None else x0_from_velocity(xa, va, s)
        if k == stop:
            break
        if renoise is not None:
            x, xa = renoise(x0, xa0, sig[k + 1])
        else:
            x = x + (sig[k + 1] - s) * v
            xa = None if xa is None else xa + (sig[k + 1] - s) * va
    return ChunkResult(x0, xa0, states, audio_states), captured


def _records_grad(k: int, exit_step: int | None) -> bool:
    """Whether step k of a chunk records gradients (when they are on): all steps, or the exit step alone."""
    return exit_step is None or k == exit_step


def _twice(kv: KV) -> KV:
    """The context repeated for a batch of 2B (conditional and unconditional passes share it)."""
    return KV([torch.cat([k, k]) for k in kv.k], [torch.cat([v, v]) for v in kv.v], kv.pos, kv.rotated,
              valid=None if kv.valid is None else torch.cat([kv.valid, kv.valid]))


def _first_rows(kv: KV, B: int) -> KV:
    return KV([k[:B] for k in kv.k], [v[:B] for v in kv.v], kv.pos, kv.rotated)


def _velocity(model: DiT, x, xa, s: float, inputs: ChunkInputs, ctx: KV, frame_pos, return_kv: bool,
              guidance: float):
    """The model's velocity at level s, guided when guidance != 1 (`inputs` and `ctx` then hold 2B rows:
    conditional first). Returns a DiTOutput of B rows (kv: all rows)."""
    B = x.shape[0]
    rows = 2 * B if guidance != 1.0 else B
    x2 = x if rows == B else torch.cat([x, x])
    xa2 = xa if xa is None or rows == B else torch.cat([xa, xa])
    t = torch.full((rows,), timestep(s), device=x.device)
    out = model(x2, t, inputs.text, audio=inputs.audio, audio_latent=xa2, kv=ctx, frame_pos=frame_pos,
                return_kv=return_kv)
    if rows == B:
        return out
    return DiTOutput(guided(out.video, guidance), guided(out.audio, guidance), out.kv)


def cache_pass(model: DiT, x0: torch.Tensor, xa0: torch.Tensor | None, inputs: ChunkInputs, ctx_clean: KV,
               frame_pos: torch.Tensor, ref: torch.Tensor | None = None, voice: torch.Tensor | None = None) -> KV:
    """Keys/values of the clean chunk at t = 0 (the clean cache; with `ref`, the ref frame's too, and
    `voice` [B] the character voice its audio tokens carry, DiT.forward)."""
    t = torch.zeros(x0.shape[0], device=x0.device)
    return model(x0, t, inputs.text, audio=inputs.audio, audio_latent=xa0, ref=ref,
                 kv=ctx_clean if ref is None else None, frame_pos=frame_pos, return_kv=True,
                 **({} if voice is None else {"voice": voice})).kv


class KeptChunks:
    """What recache needs of each cached chunk (sink and ring), by its place in the buffers (place i
    starts at buffer frame 1 + i * chunk_frames): its clean latent, its state at the noisy step, their
    joint audio latents and its speech features. Each tensor [places, ...] is allocated at its first
    write and never again."""

    def __init__(self, places: int):
        self.places = places
        self.t: dict[str, torch.Tensor] = {}

    def put(self, place: int, **parts: torch.Tensor | None) -> None:
        for name, x in parts.items():
            if x is None:
                continue
            if name not in self.t:
                self.t[name] = x.new_zeros((self.places, *x.shape))
            self.t[name][place].copy_(x)

    def get(self, name: str, place: int) -> torch.Tensor | None:
        return self.t[name][place] if name in self.t else None


class StreamEngine:
    """Holds the caches and the random state; `step(inputs)` generates the next chunk; with
    `settings.recache`, `recache(text)` rebuilds the history's keys/values under a new text.
    `advance(inputs, exit_step)` is `step` in the distillation's training mode (stages/distill/rollout.py)."""

    def __init__(self, model: DiT, cfg: ModelConfig, settings: StreamSettings = StreamSettings(),
                 batch: int = 1, seed: int = 0, rows: tuple[int, int] | None = None, keep_text: bool = False):
        """`rows` (lo, total): this engine's `batch` streams are rows lo.. of a batch of `total` drawn from
        `seed` (a distillation rank's share: its noise is the single-process run's rows). `keep_text`: an
        instruction's text is prepared once for the chunks that follow it (`_texts`), and a chunk's speech
        once for its forwards (DiT.keep_speech); a stream's engine, never a training one: the model must not
        be sharded by FSDP (DiT.prepare_text)."""
        p = next(model.parameters())
        self.model, self.cfg, self.st = model, cfg, settings
        self.device, self.dtype, self.batch = p.device, p.dtype, batch
        self.lo, self.total = rows if rows is not None else (0, batch)
        if not 0 <= self.lo <= self.total - batch:
            raise ValueError(f"rows {self.lo}..{self.lo + batch} are not within a batch of {self.total}")
        self.buffers = ContextBuffers(cfg, settings, batch, p.device, p.dtype, model.local_heads, model.rotate)
        self.kept = KeptChunks((1 if settings.sink else 0) + settings.slots) if settings.recache else None
        self.sig = flow_sigmas(settings.steps, settings.shift)
        self.gen = torch.Generator(device=p.device).manual_seed(seed)
        self.chunks = 0
        self.ref: torch.Tensor | None = None
        self.voice: torch.Tensor | None = None
        self.keep_text = keep_text
        if keep_text:
            model.keep_speech = True
        self._text: tuple | None = None       # (text, its version and the weights', prepared, guided prepared)
        self._warm: tuple | None = None       # (text, its version and the weights', the reference's KV): warm_reference

    # what sizes the buffers and the ring, or what the cached history was made under: fixed for an engine's life
    FIXED = ("chunk_frames", "window", "sink", "twin", "recache", "guidance", "guide", "sampler")

    def keeps_caches(self, settings: StreamSettings) -> bool:
        """Whether switch_steps can take `settings`: only the step schedule differs from the engine's."""
        return all(getattr(settings, f) == getattr(self.st, f) for f in self.FIXED)

    def switch_steps(self, settings: StreamSettings) -> None:
        """Another step schedule from the next chunk on (a served session under load: fewer steps); the history
        cached so far stays (its noisy cache was filled at the old schedule's noisy level). ValueError when
        `settings` changes anything in FIXED."""
        if not self.keeps_caches(settings):
            changed = [f for f in self.FIXED if getattr(settings, f) != getattr(self.st, f)]
            raise ValueError(f"a running stream cannot change {', '.join(changed)}; only its steps")
        self.st = settings
        self.sig = flow_sigmas(settings.steps, settings.shift)

    def start(self, ref_latent: torch.Tensor, voice: int | torch.Tensor | None = None) -> None:
        """Set the persistent reference (a clean latent frame [B, C, 1, h, w]); its context is built
        with the first chunk's text. `voice`: the character voice (DiTConfig.voices; < 0: none) the
        reference's audio tokens carry, the voice a joint model speaks in; one per row [B] (a distillation
        rollout's clips) or one for all."""
        self.ref = ref_latent.to(self.device, self.dtype)
        self.voice = (None if voice is None else voice.to(self.device, torch.long) if torch.is_tensor(voice)
                      else torch.full((self.batch,), int(voice), device=self.device))
        self._warm = None

    def _randn(self, shape) -> torch.Tensor:
        full = torch.randn((self.total, *shape[1:]), generator=self.gen, device=self.device, dtype=torch.float32)
        return full[self.lo:self.lo + shape[0]].to(self.dtype)

    def _texts(self, text: torch.Tensor) -> tuple[TextCache | None, TextCache | None]:
        """`text` prepared for the cache pass and for the denoising steps (its guided rows under guidance),
        kept for the next chunks while they pass the same tensor, unmodified, under unmodified weights (a
        stream's instruction: its keys/values are computed once, not in every forward). Without
        `keep_text`, or with gradients on, (None, None): every forward computes them."""
        if not self.keep_text or torch.is_grad_enabled():
            return None, None
        key = (tensor_version(text), self.model.weights_version())
        if self._text is None or self._text[0] is not text or self._text[1] != key:
            plain = self.model.prepare_text(text)
            both = (self.model.prepare_text(guided_conditions(text, None, self.st.guide)[0])
                    if self.st.guidance != 1.0 else plain)
            self._text = (text, key, plain, both)
        return self._text[2], self._text[3]

    def _renoise(self, x0, xa0, s):
        x = add_noise(x0, self._randn(x0.shape), s)
        xa = None if xa0 is None else add_noise(xa0, self._randn(xa0.shape), s)
        return x, xa

    def noise_shape(self) -> tuple[tuple, tuple | None]:
        d, cf = self.cfg.dit, self.st.chunk_frames
        v = (self.batch, d.in_dim, cf, self.cfg.height // 8, self.cfg.width // 8)
        a = (self.batch, cf, d.audio_latent_tokens, d.audio_latent_dim) if d.joint_audio else None
        return v, a

    @torch.no_grad()
    def step(self, inputs: ChunkInputs) -> ChunkResult:
        return self.advance(inputs)

    def advance(self, inputs: ChunkInputs, exit_step: int | None = None) -> ChunkResult:
        """The next chunk. Called with gradients on (distillation), the chunk's x0 carries those of its
        exit step (`denoise_chunk`; None: every step's) and the history does not: the cache passes and
        buffer writes run under no_grad, so the next chunks read the chunk as a constant. With
        `exit_step` before the noisy step (TwinCache), the noisy cache is the chunk's x0 renoised to
        the noisy level, the state the renoise sampler would have fed that step."""
        c = self.begin_chunk(inputs)
        st = self.st
        renoise = self._renoise if st.sampler == "renoise" else None
        result, noisy_kv = denoise_chunk(self.model, c.x, c.xa, self.sig, inputs, c.ctx_noisy, c.ctx_clean,
                                         c.frame_pos, st.noisy_step if st.twin else None, renoise, st.guidance,
                                         st.guide, exit_step, c.steps)
        with torch.no_grad():
            self._write_history(result, noisy_kv, inputs, c.ctx_noisy, c.ctx_clean, c.frame_pos, c.plain, c.steps)
        self.chunks += 1
        return result

    def begin_chunk(self, inputs: ChunkInputs) -> ChunkStart:
        """What the next chunk's forwards read: its initial noise (drawn now), the context (the reference's
        keys/values built first, at the first chunk), keys already rotated (one tensor for all its steps), and the text
        prepared (`_texts`). `advance` runs the chunk from it; stages/stream/batch.py runs several
        engines' in one forward."""
        if self.ref is None:
            raise RuntimeError("call start(ref_latent) before step()")
        vs, as_ = self.noise_shape()
        x = inputs.noise.to(self.device, self.dtype) if inputs.noise is not None else self._randn(vs)
        xa = None
        if as_ is not None:
            xa = inputs.audio_noise.to(self.device, self.dtype) if inputs.audio_noise is not None else self._randn(as_)
        buf, st = self.buffers, self.st
        if buf.fixed_frames == 0:                     # the reference context, built once
            warm, self._warm = self._warmed(inputs.text), None
            with torch.no_grad():
                buf.write_fixed(warm if warm is not None else self._ref_kv(inputs))
        ctx_clean, frame_pos = buf.context("clean")       # keys rotated when written: one tensor for every step
        ctx_noisy = buf.context("noisy")[0] if st.twin else ctx_clean
        plain, steps = self._texts(inputs.text)
        return ChunkStart(x, xa, ctx_noisy, ctx_clean, frame_pos, plain, steps)

    def batch_key(self) -> tuple:
        """Engines with equal keys can run their next chunks as one batch (stages/stream/batch.py): the same
        model and settings (steps, schedule, cache layout, guidance) and latent size. Their contexts may differ
        in length (a stream still filling its window beside full ones: the shorter padded and masked) and in
        layout (keys are rotated per engine, to its own absolute positions)."""
        return (id(self.model), self.st, self.cfg.height, self.cfg.width, self.batch, self.keep_text)

    def _write_history(self, result: ChunkResult, noisy_kv: KV | None, inputs: ChunkInputs, ctx_noisy: KV,
                       ctx_clean: KV, frame_pos: torch.Tensor, plain: TextCache | None = None,
                       steps: TextCache | None = None) -> None:
        st = self.st
        k = st.noisy_step if st.twin else None
        noisy = (None, None) if k is None else (result.states[k], result.audio_states[k]) if noisy_kv is not None else None
        if noisy is None:                             # exited before the noisy step
            noisy = self._renoise(result.video, result.audio, self.sig[k])
            noisy_kv = denoise_chunk(self.model, *noisy, self.sig[k:k + 1], inputs, ctx_noisy, ctx_noisy, frame_pos,
                                     0, None, st.guidance, st.guide, text=steps)[1]
        clean_kv = cache_pass(self.model, result.video, result.audio,
                              inputs if plain is None else ChunkInputs(plain, inputs.audio), ctx_clean, frame_pos)
        self.store_chunk(result, noisy, noisy_kv, clean_kv, inputs)

    def store_chunk(self, result: ChunkResult, noisy: tuple, noisy_kv: KV | None, clean_kv: KV,
                    inputs: ChunkInputs) -> None:
        """A finished chunk into the history: its clean keys/values (the sink, or the next ring slot) and
        the noisy-step ones (TwinCache), and for recache its latents and speech (`noisy`: its noisy-step
        states, video and audio). The caller counts the chunk (`chunks += 1`)."""
        buf, st = self.buffers, self.st
        if self.chunks == 0 and st.sink:
            start = buf.write_fixed(clean_kv)
        else:
            start = buf.write_ring(clean_kv, noisy_kv)
        if self.kept is not None:
            self.kept.put((start - 1) // st.chunk_frames, video=result.video, audio_latent=result.audio,
                          speech=inputs.audio, noisy=noisy[0], noisy_audio=noisy[1])

    @torch.no_grad()
    def recache(self, text: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Recompute the keys/values of the sink and ring chunks under `text` (LongLive's recache on
        an instruction switch), at the positions they hold now: chunk by chunk in RoPE order, each the
        cache pass of its clean latent over the ref and the chunks before it, and under TwinCache its
        noisy-step state at that level over the noisy context. The ref frame's keys/values stay.
        `rows` (bool [B]): recache those streams of the batch alone (the others keep their caches)."""
        if self.kept is None:
            raise StreamError("recache needs StreamSettings(recache=True) from the stream's start")
        if rows is not None and bool(rows.all()):
            rows = None
        buf, st, cf = self.buffers, self.st, self.st.chunk_frames
        frames, _ = buf.frame_positions()
        frames = frames + buf.shift()                                       # absolute, as the chunks were made
        places = sorted(range((frames.numel() - 1) // cf), key=lambda i: int(frames[1 + i * cf]))   # RoPE order
        done: list[int] = []
        for i in places:
            a = 1 + i * cf
            pos, speech = frames[a:a + cf], self.kept.get("speech", i)
            clean = cache_pass(self.model, self.kept.get("video", i), self.kept.get("audio_latent", i),
                               ChunkInputs(text, speech), self._context_of("clean", done), pos)
            sink = st.sink and i == 0
            buf.write(tuple(buf.k) if sink else ("clean",), clean, a, rows)   # the sink is clean in both sets
            if st.twin and not sink:
                x, s = self.kept.get("noisy", i), self.sig[st.noisy_step]
                t = torch.full((x.shape[0],), timestep(s), device=x.device)
                noisy = self.model(x, t, text, audio=speech, audio_latent=self.kept.get("noisy_audio", i),
                                   kv=self._context_of("noisy", done), frame_pos=pos, return_kv=True).kv
                buf.write(("noisy",), noisy, a, rows)
            done.append(i)

    def _context_of(self, which: str, places: list[int]) -> KV:
        """The ref frame and the chunks at `places` of set `which`, keys rotated."""
        full, S, cf = self.buffers.context(which)[0], self.buffers.S, self.st.chunk_frames
        kv = full.tokens(0, S)
        for j in places:
            kv = kv.cat(full.tokens((1 + j * cf) * S, (1 + (j + 1) * cf) * S))
        return kv

    def state(self) -> dict:
        """What the chunks still to come depend on, as tensors (views of the live buffers) and numbers:
        the caches and which chunk each ring slot holds, the kept chunks (recache), the noise generator
        and the chunk count. The reference frame is not in it: its keys/values are, from the first chunk on."""
        out = {"chunks": self.chunks, "gen": self.gen.get_state(), **self.buffers.state()}
        if self.kept is not None:
            out.update({f"kept.{name}": t for name, t in self.kept.t.items()})
        return out

    def load_state(self, state: dict) -> None:
        """Continue from `state()` of an engine with the same model and settings (after `start`)."""
        self.buffers.load_state(state)
        if self.kept is not None:
            self.kept.t = {k[len("kept."):]: t.to(self.device) for k, t in state.items() if k.startswith("kept.")}
        self.gen.set_state(state["gen"])
        self.chunks = state["chunks"]

    def warm_reference(self, text: torch.Tensor) -> bool:
        """Build the reference frame's keys/values now, under `text`, ahead of the first chunk (a server's idle
        moment: the first chunk's forward, shared with other streams, then does not pass the reference, which on
        an H100 added 250-380 ms to the batch it joined, RESULTS.md session 50). They depend on the text, not on
        the speech; the first chunk takes them when its text is this tensor, unmodified, under unmodified
        weights, and else builds them under its own. Whether it built them (False: started, or already warm)."""
        if self.ref is None or self.buffers.fixed_frames or self._warmed(text) is not None:
            return False
        with torch.no_grad():
            self._warm = (text, self._warm_key(text), self._ref_kv(ChunkInputs(text)))
        return True

    def _warm_key(self, text) -> tuple:
        return (tensor_version(text), self.model.weights_version())

    def _warmed(self, text) -> KV | None:
        """The reference's keys/values warm_reference built under this very `text`, still valid; else None."""
        w = self._warm
        return w[2] if w is not None and w[0] is text and w[1] == self._warm_key(text) else None

    def _ref_kv(self, inputs: ChunkInputs) -> KV:
        """The ref frame's keys/values: it attends only to itself, so a pass over ref + any chunk
        gives them; its first S tokens are kept."""
        vs, as_ = self.noise_shape()
        zeros = torch.zeros(vs, device=self.device, dtype=self.dtype)
        za = None if as_ is None else torch.zeros(as_, device=self.device, dtype=self.dtype)
        kv = cache_pass(self.model, zeros, za, inputs, None, torch.arange(1, 1 + vs[2]), ref=self.ref, voice=self.voice)
        return kv.tokens(0, self.buffers.S)
