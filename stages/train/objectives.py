"""Training objectives of the two teacher stages (flow matching, x_t = (1 - s) x_0 + s eps, the
model predicts v = eps - x_0 and x_0 = x_t - s v).

- `bidirectional_loss` (stage 1, eq. 3): one noise level per sample over the whole clip, full
  attention, loss on every frame (video and joint audio).
- `causal_loss` (stage 2, eq. 5), in the streaming regime: one current chunk i per batch, drawn
  uniformly from a clip of `clip_frames` latent frames (longer than the stream's context, so the
  window wraps); the sequence is [ref | the chunks `context_chunks(i, slots, sink)` gives (the
  engine's layout, stages/stream/engine.py) | chunk i] at frame positions ref 0, then 1..m in that
  order, under the block-causal mask by chunks: the positions and history the engine gives chunk i.
  Loss on chunk i only. History noise follows TwinCache: per sample, Bernoulli(p_teacher_forcing)
  picks teacher forcing, all history clean (what the engine's last step reads, the clean cache),
  else diffusion forcing, the ring chunks at one noise level tau ~ tau_dist up to tau_max and the
  sink clean (what its intermediate steps read: the noisy cache holds the ring at step `noisy_step`'s
  level, the ref and sink clean). Window and sink are the checkpoint's record (stages/train/sample.py
  `sampling_record`), filled in by the Trainer.

Video loss: stages/train/losses.py (loss weighting by noise level, mouth-region weight).
A batch is a dict: video [B, C, F, h, w], ref [B, C, 1, h, w], text [B, L, D] or per frame
[B, F, L, D], audio [B, before + F + after, K, A] (or None), audio_latent [B, F, Na, Ca] (or None),
mouth [B, F, h, w] (or absent: the mouth region's coverage, for the loss weight).
Both objectives first drop conditions (text, speech, reference: each row independently, nulled to
zeros) so that the samplers can guide (classifier-free guidance).
All randomness comes from a `Draw`: numbers for the whole global batch from one generator seeded per
step, of which each rank keeps its rows, so N ranks x B/N samples draw exactly what one process with
B samples draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.dit import DiT, null_condition
from models.flow import add_noise, shift_sigma, timestep, x0_from_velocity
from stages.run import ranged
from stages.stream.engine import context_chunks
from stages.train.losses import LOSS_WEIGHTS, video_loss


@dataclass(frozen=True)
class ObjectiveSettings:
    # noise-level shift, loss weight by noise level (losses.py) and mouth-region weight: chosen by
    # benchmarks/noise_schedule.py for the `small` latent (RESULTS.md 2026-12-01): a half-open mouth is
    # decided at noise 0.24-0.55, where Wan's shift 5 with the x0 loss puts 6 % of the gradient (and the
    # mouth is 1.6 % of the latent); shift 2 with the v loss and the mouth x10 puts 30 % there (43x the
    # mouth's share) and keeps 40 % in the identity band. The checkpoint records the shift it streams with.
    shift: float = ranged(2.0, gt=0)
    loss_weight: str = ranged("v", choices=LOSS_WEIGHTS)
    mouth_weight: float = ranged(10.0, min=0)  # latent pixels of the mouth region (world clips with masks)
    # ... of the eyes region (lids, whites, brows): session 59 found the students' nods and look-ups failing on a
    # blink read off eyes that smear while the head moves, and half the humans' told blinks not drawn
    eyes_weight: float = ranged(1.0, min=0)
    # the sync loss (losses.py): a trained lip-sync discriminator's file (stages/train/lipsync.py) and its
    # weight; world clips then carry their mouth boxes
    sync_weight: float = ranged(0.0, min=0)
    lipsync: str | None = None
    audio_weight: float = ranged(1.0, min=0)  # weight of the joint audio loss
    p_teacher_forcing: float = ranged(0.5, min=0, max=1)  # stage 2: Bernoulli(p) teacher forcing, else diffusion forcing
    chunk_frames: int | None = ranged(None, min=1)  # stage 2: latent frames per causal block (None: the preset's)
    tau_dist: str = ranged("uniform", choices=("uniform", "shifted"))  # stage 2: history noise tau ~ U(0, tau_max] | Wan shift
    tau_max: float = ranged(0.5, min=0, max=1)
    # stage 2: latent frames of a training clip (51: 201 video frames, 8.04 s at 25 fps), longer than
    # ref + sink + window + chunk so that the window wraps, as in a long stream
    clip_frames: int = ranged(51, min=2)
    window: int | None = ranged(None, min=1)  # stage 2: history latent frames (None: sampling_record's)
    sink: bool | None = None                  # stage 2: keep chunk 0 in the context (None: sampling_record's)
    # condition dropout (each row independently): what classifier-free guidance needs
    p_drop_text: float = ranged(0.1, min=0, max=1)
    p_drop_audio: float = ranged(0.1, min=0, max=1)
    p_drop_ref: float = ranged(0.1, min=0, max=1)
    # the share of world clips whose reference frame shows the identity in a random pose and expression
    # (stages/train/data.py `reference_state`), against copying the reference's geometry
    ref_pose: float = ranged(0.0, min=0, max=1)

    @property
    def needs_masks(self) -> bool:
        """World clips must carry their region masks: a region weight or the sync loss's mouth boxes."""
        return self.mouth_weight != 1 or self.eyes_weight != 1 or self.sync_weight > 0


class Draw:
    """Random numbers for rows [lo, hi) of a global batch of `total` samples."""

    def __init__(self, gen: torch.Generator, lo: int, hi: int, total: int):
        self.gen, self.lo, self.hi, self.total = gen, lo, hi, total

    def rand(self, dtype=torch.float32) -> torch.Tensor:
        return torch.rand(self.total, generator=self.gen, dtype=dtype)[self.lo:self.hi]

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Normal noise shaped like rows [lo, hi) of x's global batch, drawn on x's device (a generator
        there, seeded from this Draw's: the same numbers on every rank of one device type, and no host
        work per element: drawn on the host, a batch of `small` latents' noise costs tens of ms a step)."""
        seed = int(torch.randint(2 ** 62, (1,), generator=self.gen))
        g = torch.Generator(device=x.device).manual_seed(seed)
        full = torch.randn((self.total, *x.shape[1:]), generator=g, dtype=torch.float32, device=x.device)
        return full[self.lo:self.hi].to(x.dtype)

    def randint(self, n: int) -> int:
        """One integer shared by every row (the same on every rank)."""
        return int(torch.randint(n, (1,), generator=self.gen))


CONDITIONS = ("text", "audio", "ref")


def drop_conditions(batch: dict, st: ObjectiveSettings, draw: Draw) -> tuple[dict, dict]:
    """Condition dropout: each row loses its text, speech and reference independently with
    probabilities p_drop_text / p_drop_audio / p_drop_ref. One number per row and condition is drawn
    whether or not the condition is present (the draws do not depend on the batch's contents).
    Returns the batch with the dropped rows nulled and {"drop_<name>": share of rows dropped}."""
    out, parts = dict(batch), {}
    for name in CONDITIONS:
        p = getattr(st, f"p_drop_{name}")
        drop = draw.rand() < p
        parts[f"drop_{name}"] = drop.float().mean()
        x = batch.get(name)
        if x is None or not bool(drop.any()):
            continue
        keep = (~drop).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
        out[name] = torch.where(keep, x, null_condition(x))
        if name == "ref" and batch.get("voice") is not None:      # the voice is the character's, as the ref is
            out["voice"] = torch.where(drop.to(x.device), -1, batch["voice"])
    return out, parts


def _sigma(draw: Draw, st: ObjectiveSettings, device) -> torch.Tensor:
    return shift_sigma(draw.rand(torch.float64), st.shift).float().clamp(1e-3, 1.0).to(device)


def levels(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] or [B, F] noise levels -> broadcastable to a [B, C, F, h, w] or [B, F, Na, Ca] tensor."""
    if like.ndim == 5:                                   # video: frames on dim 2
        return s.reshape(s.shape[0], 1, -1, 1, 1) if s.ndim == 2 else s.reshape(-1, 1, 1, 1, 1)
    return s.reshape(s.shape[0], -1, 1, 1) if s.ndim == 2 else s.reshape(-1, 1, 1, 1)


def x0_from_v(model_out, x_t, sig) -> torch.Tensor:
    return x0_from_velocity(x_t, model_out, levels(sig, x_t))


def noised(x0: torch.Tensor | None, sig: torch.Tensor, draw: "Draw") -> torch.Tensor | None:
    """x0 at noise levels `sig` ([B] or [B, F]): (1 - s) x0 + s eps, eps from `draw`; None stays None."""
    if x0 is None:
        return None
    return add_noise(x0, draw.randn_like(x0), levels(sig, x0))


def _audio_loss(model_out, xa_t, sig, xa0, frames: slice | None = None) -> torch.Tensor:
    xa0_hat = x0_from_v(model_out, xa_t, sig)
    if frames is not None:
        xa0_hat, xa0 = xa0_hat[:, frames], xa0[:, frames]
    return (xa0_hat.float() - xa0.float()).square().mean()


def bidirectional_loss(model: DiT, batch: dict, st: ObjectiveSettings, draw: Draw) -> tuple[torch.Tensor, dict]:
    batch, dropped = drop_conditions(batch, st, draw)
    x0, xa0 = batch["video"], batch.get("audio_latent")
    s = _sigma(draw, st, x0.device)
    x_t, xa_t = noised(x0, s, draw), noised(xa0, s, draw)
    out = whole_forward(model, batch, x_t, xa_t, s)
    F = x0.shape[2]
    loss, vparts = video_loss(x0_from_v(out.video, x_t, s), x0, s[:, None].expand(-1, F), batch, torch.arange(F), st)
    parts = {**vparts, **dropped}
    if xa0 is not None:
        loss_a = _audio_loss(out.audio, xa_t, s, xa0)
        loss = loss + st.audio_weight * loss_a
        parts["loss_audio"] = loss_a.detach()
    return loss, parts


def whole_forward(model: DiT, clip: dict, x_t: torch.Tensor, xa_t: torch.Tensor | None, sigma: torch.Tensor):
    """The model on whole clips (noisy x_t [B, C, F, h, w] at noise levels [B]) with their conditions (text,
    speech with its context, ref, voice), every frame attending to every other: stage 1's forward."""
    return model(x_t, timestep(sigma), clip["text"], audio=clip.get("audio"), audio_latent=xa_t, ref=clip["ref"],
                 mask="full", voice=clip.get("voice"))


def stream_frames(chunk: int, chunk_frames: int, slots: int, sink: bool) -> torch.Tensor:
    """Clip frame indices [m] of chunk `chunk`'s training sequence in RoPE order (frame positions 1..m,
    the ref at 0): the context `context_chunks` gives the engine, then the chunk itself."""
    chunks = context_chunks(chunk, slots, sink) + [chunk]
    return torch.cat([torch.arange(k * chunk_frames, (k + 1) * chunk_frames) for k in chunks])


def training_frames(chunk: int, chunk_frames: int, slots: int, sink: bool, F: int) -> tuple[torch.Tensor, int]:
    """(clip frame indices [m] of chunk `chunk`'s stage-2 sequence, index of the chunk's first frame in
    them). The sequence is `stream_frames`; for a chunk whose context has not yet filled the window
    (the stream's first chunks, whose frames are the consecutive 0 .. chunk), it is extended by the
    clip's next frames to the full window's length when the clip has them, so that every step has one
    shape (torch.compile's static shapes). Block-causal attention keeps the chunk's output what the
    short sequence gives: the frames after it are never attended to by it."""
    frames = stream_frames(chunk, chunk_frames, slots, sink)
    full = chunk_frames * (slots + 1 + int(sink))
    if len(frames) < full <= F:
        return torch.arange(full), chunk * chunk_frames
    return frames, len(frames) - chunk_frames


def gather_audio(audio: torch.Tensor, frames: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Speech features [B, before + F + after, K, A] of a clip -> those of its frames `frames` as one
    sequence [B, before + m + after]: each frame's own step exactly; its neighbours' where the frames are
    consecutive (the chunk and the ring before it), the spliced other side where they are not (the
    sink's lookahead, the oldest ring frames' look-back)."""
    f0, f1 = int(frames[0]), int(frames[-1])
    idx = torch.cat([torch.arange(f0, f0 + before), before + frames,
                     torch.arange(before + f1 + 1, before + f1 + 1 + after)])
    return audio[:, idx.to(audio.device)]


def stream_sequence(batch: dict, frames: torch.Tensor, before: int, after: int) -> dict:
    """The batch's clips cut to the clip frames `frames` (video, text per frame, speech, joint audio,
    in sequence order); ref as is."""
    f = frames.to(batch["video"].device)
    text = batch["text"]
    return {"video": batch["video"][:, :, f], "ref": batch["ref"],
            "text": text[:, f] if text.ndim == 4 else text,
            "audio": None if batch.get("audio") is None else gather_audio(batch["audio"], frames, before, after),
            "audio_latent": None if batch.get("audio_latent") is None else batch["audio_latent"][:, f],
            "voice": batch.get("voice")}


def causal_forward(model: DiT, seq: dict, x_t: torch.Tensor, xa_t: torch.Tensor | None, sigma: torch.Tensor,
                   chunk_frames: int):
    """The model on a stream sequence (noisy x_t [B, C, m, h, w], noise levels [B, m]): frame positions
    1..m after the ref, block-causal by chunks."""
    m = x_t.shape[2]
    return model(x_t, timestep(sigma), seq["text"], audio=seq["audio"], audio_latent=xa_t, ref=seq["ref"],
                 mask="causal", chunk_frames=chunk_frames, frame_pos=torch.arange(1, m + 1), voice=seq.get("voice"))


def _history_tau(draw: Draw, st: ObjectiveSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher forcing [B] bool, history noise level [B]: 0 under teacher forcing)."""
    teacher = draw.rand() < st.p_teacher_forcing
    if st.tau_dist == "uniform":
        tau = draw.rand() * st.tau_max
    elif st.tau_dist == "shifted":
        tau = shift_sigma(draw.rand(torch.float64), st.shift).float() * st.tau_max
    else:
        raise ValueError(f"tau_dist is 'uniform' or 'shifted', not {st.tau_dist!r}")
    return teacher, torch.where(teacher, torch.zeros_like(tau), tau.clamp_min(1e-3))


def causal_loss(model: DiT, batch: dict, st: ObjectiveSettings, draw: Draw) -> tuple[torch.Tensor, dict]:
    batch, dropped = drop_conditions(batch, st, draw)
    B, F, c = batch["video"].shape[0], batch["video"].shape[2], st.chunk_frames
    if c is None or st.window is None or st.sink is None:
        raise ValueError("causal_loss needs chunk_frames, window and sink (the Trainer fills in the record's)")
    if st.window % c:
        raise ValueError(f"window {st.window} is not a multiple of chunk_frames {c}")
    if F < c:
        raise ValueError(f"{F} latent frames hold no chunk of {c}")
    i = draw.randint(F // c)                             # the current chunk
    frames, p = training_frames(i, c, st.window // c, st.sink, F)
    m, n_sink = len(frames), c if st.sink and i > 0 else 0
    seq = stream_sequence(batch, frames, *model.cfg.audio_context)
    x0, xa0 = seq["video"], seq["audio_latent"]
    teacher, tau = _history_tau(draw, st)
    s = _sigma(draw, st, "cpu")
    sigma = torch.cat([torch.zeros(B, n_sink), tau[:, None].expand(B, p - n_sink), s[:, None].expand(B, m - p)],
                      1).to(x0.device)                   # [B, m]: sink clean, ring at tau, the chunk (and after) at s
    x_t, xa_t = noised(x0, sigma, draw), noised(xa0, sigma, draw)
    out = causal_forward(model, seq, x_t, xa_t, sigma, c)
    cur = slice(p, p + c)
    x0_hat = x0_from_v(out.video, x_t, sigma)
    loss, vparts = video_loss(x0_hat[:, :, cur], x0[:, :, cur], sigma[:, cur], batch, frames[cur], st)
    parts = {**vparts, "chunk": torch.tensor(float(i)), "context_frames": torch.tensor(float(p)),
             "teacher_forcing": teacher.float().mean(), **dropped}
    if xa0 is not None:
        loss_a = _audio_loss(out.audio, xa_t, sigma, xa0, cur)
        loss = loss + st.audio_weight * loss_a
        parts["loss_audio"] = loss_a.detach()
    return loss, parts


OBJECTIVES = {"bidirectional": bidirectional_loss, "causal": causal_loss}
