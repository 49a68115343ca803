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


@dataclass(frozen=True)
class ObjectiveSettings:
    shift: float = ranged(SHIFT, gt=0)  # noise-level shift of the training distribution
    audio_weight: float = ranged(1.0, min=0)  # weight of the joint audio loss
    p_teacher_forcing: float = ranged(0.5, min=0, max=1)  # stage 2: Bernoulli(p) teacher forcing, else diffusion forcing
    chunk_frames: int | None = ranged(None, min=1)  # stage 2: latent frames per causal block (None: the preset's)
    tau_dist: str = ranged("uniform", choices=("uniform", "shifted"))  # stage 2: history noise tau ~ U(0, tau_max] | Wan shift
    tau_max: float = ranged(0.5, min=0, max=1)


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


def _sigma(draw: Draw, st: ObjectiveSettings, device) -> torch.Tensor:
    return shift_sigma(draw.rand(torch.float64), st.shift).float().clamp(1e-3, 1.0).to(device)


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] or [B, F] noise levels -> broadcastable to a [B, C, F, h, w] or [B, F, Na, Ca] tensor."""
    if like.ndim == 5:                                   # video: frames on dim 2
        return s.reshape(s.shape[0], 1, -1, 1, 1) if s.ndim == 2 else s.reshape(-1, 1, 1, 1, 1)
    return s.reshape(s.shape[0], -1, 1, 1) if s.ndim == 2 else s.reshape(-1, 1, 1, 1)


def _x0_loss(model_out, x_t, sig, x0, frames: slice | None = None) -> torch.Tensor:
    x0_hat = x_t - _bcast(sig, x_t) * model_out
    if frames is not None:
        x0_hat, x0 = (x0_hat[:, :, frames], x0[:, :, frames]) if x0.ndim == 5 else (x0_hat[:, frames], x0[:, frames])
    return (x0_hat.float() - x0.float()).square().mean()


def bidirectional_loss(model: DiT, batch: dict, st: ObjectiveSettings, draw: Draw) -> tuple[torch.Tensor, dict]:
    x0, xa0 = batch["video"], batch.get("audio_latent")
    s = _sigma(draw, st, x0.device)
    x_t = (1 - _bcast(s, x0)) * x0 + _bcast(s, x0) * draw.randn_like(x0)
    xa_t = None if xa0 is None else (1 - _bcast(s, xa0)) * xa0 + _bcast(s, xa0) * draw.randn_like(xa0)
    out = model(x_t, s * 1000.0, batch["text"], audio=batch.get("audio"), audio_latent=xa_t, ref=batch["ref"],
                mask="full")
    loss_v = _x0_loss(out.video, x_t, s, x0)
    loss = loss_v
    parts = {"loss_video": loss_v.detach()}
    if xa0 is not None:
        loss_a = _x0_loss(out.audio, xa_t, s, xa0)
        loss = loss + st.audio_weight * loss_a
        parts["loss_audio"] = loss_a.detach()
    return loss, parts


def causal_loss(model: DiT, batch: dict, st: ObjectiveSettings, draw: Draw) -> tuple[torch.Tensor, dict]:
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
    loss_v = _x0_loss(out.video, x_t, per_frame, x0, cur)
    loss = loss_v
    parts = {"loss_video": loss_v.detach(), "chunk": torch.tensor(float(i)),
             "teacher_forcing": teacher.float().mean()}
    if xa0 is not None:
        loss_a = _x0_loss(out.audio, xa_t, per_frame, xa0, cur)
        loss = loss + st.audio_weight * loss_a
        parts["loss_audio"] = loss_a.detach()
    return loss, parts


OBJECTIVES = {"bidirectional": bidirectional_loss, "causal": causal_loss}
