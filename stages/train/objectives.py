"""Training objectives of the two teacher stages (flow matching, x_t = (1 - s) x_0 + s eps, the
model predicts v = eps - x_0 and x_0 = x_t - s v).

- `bidirectional_loss` (stage 1, eq. 3): one noise level per sample over the whole clip, full
  attention, loss || x0_hat - x_0 ||^2 on every frame (video and joint audio).
- `causal_loss` (stage 2, eq. 5): block-causal mask by chunks; one current chunk i per batch; per
  sample, Bernoulli(p) picks teacher forcing (history x_0^{<i} at tau = 0) or diffusion forcing
  (history x_tau^{<i}, tau > 0); loss on the current chunk only. Frames after chunk i cannot affect
  it under the causal mask, so the sequence is cut after it.

A batch is a dict: video [B, C, F, h, w], ref [B, C, 1, h, w], text [B, L, D] or per frame
[B, F, L, D], audio [B, before + F + after, K, A] (or None), audio_latent [B, F, Na, Ca] (or None).
Both objectives first drop conditions (text, speech, reference: each row independently, nulled to
zeros) so that the samplers can guide (classifier-free guidance).
All randomness comes from a `Draw`: numbers for the whole global batch from one generator seeded per
step, of which each rank keeps its rows, so N ranks x B/N samples draw exactly what one process with
B samples draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.dit import DiT
from models.flow import SHIFT, shift_sigma
from stages.run import ranged
from stages.train.losses import video_loss


@dataclass(frozen=True)
class ObjectiveSettings:
    shift: float = ranged(SHIFT, gt=0)  # noise-level shift of the training distribution
    audio_weight: float = ranged(1.0, min=0)  # weight of the joint audio loss
    p_teacher_forcing: float = ranged(0.5, min=0, max=1)  # stage 2: Bernoulli(p) teacher forcing, else diffusion forcing
    chunk_frames: int | None = ranged(None, min=1)  # stage 2: latent frames per causal block (None: the preset's)
    tau_dist: str = ranged("uniform", choices=("uniform", "shifted"))  # stage 2: history noise tau ~ U(0, tau_max] | Wan shift
    tau_max: float = ranged(0.5, min=0, max=1)
    # condition dropout (each row independently): what classifier-free guidance needs
    p_drop_text: float = ranged(0.1, min=0, max=1)
    p_drop_audio: float = ranged(0.1, min=0, max=1)
    p_drop_ref: float = ranged(0.1, min=0, max=1)


class Draw:
    """Random numbers for rows [lo, hi) of a global batch of `total` samples."""

    def __init__(self, gen: torch.Generator, lo: int, hi: int, total: int):
        self.gen, self.lo, self.hi, self.total = gen, lo, hi, total

    def rand(self, dtype=torch.float32) -> torch.Tensor:
        return torch.rand(self.total, generator=self.gen, dtype=dtype)[self.lo:self.hi]

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        full = torch.randn((self.total, *x.shape[1:]), generator=self.gen, dtype=torch.float32)
        return full[self.lo:self.hi].to(x.device, x.dtype)

    def randint(self, n: int) -> int:
        """One integer shared by every row (the same on every rank)."""
        return int(torch.randint(n, (1,), generator=self.gen))


CONDITIONS = ("text", "audio", "ref")


def null_condition(x: torch.Tensor) -> torch.Tensor:
    """What a dropped condition becomes, in training and in the samplers' unconditional pass: zeros
    (text features, speech features, the reference latent)."""
    return torch.zeros_like(x)


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
    return out, parts


def _sigma(draw: Draw, st: ObjectiveSettings, device) -> torch.Tensor:
    return shift_sigma(draw.rand(torch.float64), st.shift).float().clamp(1e-3, 1.0).to(device)


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] or [B, F] noise levels -> broadcastable to a [B, C, F, h, w] or [B, F, Na, Ca] tensor."""
    if like.ndim == 5:                                   # video: frames on dim 2
        return s.reshape(s.shape[0], 1, -1, 1, 1) if s.ndim == 2 else s.reshape(-1, 1, 1, 1, 1)
    return s.reshape(s.shape[0], -1, 1, 1) if s.ndim == 2 else s.reshape(-1, 1, 1, 1)


def _x0(model_out, x_t, sig) -> torch.Tensor:
    return x_t - _bcast(sig, x_t) * model_out          # v = eps - x0


def _audio_loss(model_out, xa_t, sig, xa0, frames: slice | None = None) -> torch.Tensor:
    xa0_hat = _x0(model_out, xa_t, sig)
    if frames is not None:
        xa0_hat, xa0 = xa0_hat[:, frames], xa0[:, frames]
    return (xa0_hat.float() - xa0.float()).square().mean()


def bidirectional_loss(model: DiT, batch: dict, st: ObjectiveSettings, draw: Draw) -> tuple[torch.Tensor, dict]:
    batch, dropped = drop_conditions(batch, st, draw)
    x0, xa0 = batch["video"], batch.get("audio_latent")
    s = _sigma(draw, st, x0.device)
    x_t = (1 - _bcast(s, x0)) * x0 + _bcast(s, x0) * draw.randn_like(x0)
    xa_t = None if xa0 is None else (1 - _bcast(s, xa0)) * xa0 + _bcast(s, xa0) * draw.randn_like(xa0)
    out = model(x_t, s * 1000.0, batch["text"], audio=batch.get("audio"), audio_latent=xa_t, ref=batch["ref"],
                mask="full")
    F = x0.shape[2]
    loss, vparts = video_loss(_x0(out.video, x_t, s), x0, s[:, None].expand(-1, F), batch, torch.arange(F))
    parts = {**vparts, **dropped}
    if xa0 is not None:
        loss_a = _audio_loss(out.audio, xa_t, s, xa0)
        loss = loss + st.audio_weight * loss_a
        parts["loss_audio"] = loss_a.detach()
    return loss, parts


def causal_loss(model: DiT, batch: dict, st: ObjectiveSettings, draw: Draw) -> tuple[torch.Tensor, dict]:
    batch, dropped = drop_conditions(batch, st, draw)
    x0, xa0 = batch["video"], batch.get("audio_latent")
    B, F, c = x0.shape[0], x0.shape[2], st.chunk_frames
    if c is None:
        raise ValueError("causal_loss needs chunk_frames (the Trainer fills in the preset's)")
    if F % c:
        raise ValueError(f"{F} latent frames do not split into chunks of {c}")
    i = draw.randint(F // c)                             # the current chunk
    n = (i + 1) * c                                      # frames kept: history + current
    x0, xa0 = x0[:, :, :n], None if xa0 is None else xa0[:, :n]
    # speech features: [B, before + F + after, ...] (DiTConfig.audio_context); the kept frames hear up to `after` past n
    before, after = model.cfg.audio_context
    audio = None if batch.get("audio") is None else batch["audio"][:, :before + n + after]
    text = batch["text"][:, :n] if batch["text"].ndim == 4 else batch["text"]    # a text per frame: the kept ones
    teacher = draw.rand() < st.p_teacher_forcing
    if st.tau_dist == "uniform":
        tau = draw.rand() * st.tau_max
    elif st.tau_dist == "shifted":
        tau = shift_sigma(draw.rand(torch.float64), st.shift).float() * st.tau_max
    else:
        raise ValueError(f"tau_dist is 'uniform' or 'shifted', not {st.tau_dist!r}")
    tau = torch.where(teacher, torch.zeros_like(tau), tau.clamp_min(1e-3))
    s = _sigma(draw, st, "cpu")
    per_frame = torch.cat([tau[:, None].expand(B, i * c), s[:, None].expand(B, c)], 1).to(x0.device)   # [B, n]
    x_t = (1 - _bcast(per_frame, x0)) * x0 + _bcast(per_frame, x0) * draw.randn_like(x0)
    xa_t = None
    if xa0 is not None:
        xa_t = (1 - _bcast(per_frame, xa0)) * xa0 + _bcast(per_frame, xa0) * draw.randn_like(xa0)
    out = model(x_t, per_frame * 1000.0, text, audio=audio, audio_latent=xa_t, ref=batch["ref"],
                mask="causal", chunk_frames=c)
    cur = slice(i * c, n)
    x0_hat = _x0(out.video, x_t, per_frame)
    loss, vparts = video_loss(x0_hat[:, :, cur], x0[:, :, cur], per_frame[:, cur], batch, torch.arange(n)[cur])
    parts = {**vparts, "chunk": torch.tensor(float(i)),
             "teacher_forcing": teacher.float().mean(), **dropped}
    if xa0 is not None:
        loss_a = _audio_loss(out.audio, xa_t, per_frame, xa0, cur)
        loss = loss + st.audio_weight * loss_a
        parts["loss_audio"] = loss_a.detach()
    return loss, parts


OBJECTIVES = {"bidirectional": bidirectional_loss, "causal": causal_loss}
