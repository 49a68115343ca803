"""Distribution matching distillation (DMD, eq. 6 of the paper; Yin et al. 2024, DMD2's normalisation)
of a causal teacher into the few-step student, per chunk in the streaming regime.

The student's rollout (rollout.py) gives a clip; one chunk i is scored per step, in the sequence
stage 2 trains on (objectives.training_frames: ref | the engine's context of chunk i | chunk i),
its history clean (teacher forcing: the generated chunks, detached) and chunk i at one noise level s:

    real x0: the frozen causal teacher with classifier-free guidance g (v = v_u + g (v_c - v_u))
    fake x0: the critic (initialised from the teacher), trained online on the student's clips
             with the teacher's own flow loss (objectives.causal_loss)
    grad    = (fake x0 - real x0) / mean |x - real x0|          (per sample, DMD's normaliser)
    loss    = 0.5 mean (x - sg(x - grad))^2                      (d loss / d x = grad / numel)

so gradient descent moves the chunk toward the teacher's denoising of it and away from the critic's,
the score difference of KL(p_student(x_i | history) || p_teacher(x_i | history)) at level s.
Video and the joint audio latent alike.

With a bidirectional teacher (stage 1; `whole`: the asymmetric distillation of CausVid and Self-Forcing,
which skips stage 2) real and fake scores read a window of the student's clip as long as the clips the
teacher was trained on (`whole` latent frames, at a random start; the whole clip when shorter), at one
noise level s per sample, every frame attending to every other, and the gradient reaches every frame of
the window; the critic learns such windows of the student's clips with stage 1's flow loss.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from models.dit import GUIDES, DiT, guided, guided_conditions
from models.flow import shift_sigma
from stages.run import ranged
from stages.train.losses import REGIONS
from stages.train.objectives import (Draw, ObjectiveSettings, bidirectional_loss, causal_forward, causal_loss, levels,
                                     noised, stream_sequence, training_frames, whole_forward, x0_from_v)
from stages.train.sample import TEACHER_GUIDANCE


@dataclass(frozen=True)
class DMDSettings:
    guidance: float = ranged(TEACHER_GUIDANCE, min=0, max=100)   # the real score's guidance scale
    guide: str = ranged("all", choices=GUIDES)   # what its unconditional pass nulls: text and speech | text alone
    min_level: float = ranged(0.02, min=0, max=1)   # the band of noise levels s the scores are taken at
    max_level: float = ranged(0.98, min=0, max=1)
    # the real score is guided only at levels in this band (unguided elsewhere): guidance at low noise
    # sharpens details the speech decides (DMD tends to erode lip sync)
    guidance_min_level: float = ranged(0.0, min=0, max=1)
    guidance_max_level: float = ranged(1.0, min=0, max=1)

    def __post_init__(self):
        if not 0 <= self.guidance_min_level <= self.guidance_max_level <= 1:
            raise ValueError("need 0 <= guidance_min_level <= guidance_max_level <= 1")
        if not 0 <= self.min_level < self.max_level <= 1:
            raise ValueError(f"need 0 <= min_level < max_level <= 1, not {self.min_level:g}, {self.max_level:g}")
        if self.guide not in GUIDES:
            raise ValueError(f"guide is one of: {', '.join(GUIDES)}, not {self.guide!r}")


def dmd_gradient(x: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """(fake - real) / mean |x - real| per sample (the mean over all but the batch dim); finite."""
    norm = (x.float() - real_x0.float()).abs().flatten(1).mean(1)
    grad = (fake_x0.float() - real_x0.float()) / norm.reshape(-1, *[1] * (x.ndim - 1))
    return torch.nan_to_num(grad)


def _matching(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x.double() - (x.double() - grad.double()).detach()).square().mean()


def score_v(model, seq: dict, x_t: torch.Tensor, xa_t: torch.Tensor | None, sigma: torch.Tensor,
            chunk_frames: int | None, guidance: float | torch.Tensor = 1.0, guide: str = "all",
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A model's velocity (video, joint audio) on a stream sequence, block-causal by `chunk_frames`
    (None: whole clips at levels sigma [B], bidirectional), guided when guidance != 1 (a scale,
    or one per row [B]): one forward of 2B rows, the unconditional ones with what `guide` nulls (the
    reference kept). `model`: a DiT, or anything called like one (pcm.py: the student with its EMA)."""
    def forward(seq, x_t, xa_t, sigma):
        if chunk_frames is None:
            return whole_forward(model, seq, x_t, xa_t, sigma)
        return causal_forward(model, seq, x_t, xa_t, sigma, chunk_frames)

    if not torch.is_tensor(guidance) and guidance == 1.0:
        out = forward(seq, x_t, xa_t, sigma)
        return out.video, out.audio
    B = x_t.shape[0]
    text, audio = guided_conditions(seq["text"], seq["audio"], guide)
    voice = seq.get("voice")
    two = {"text": text, "audio": audio, "ref": torch.cat([seq["ref"], seq["ref"]]),
           "voice": None if voice is None else torch.cat([voice, voice])}     # the voice is the character's, kept
    out = forward(two, torch.cat([x_t, x_t]), None if xa_t is None else torch.cat([xa_t, xa_t]),
                  torch.cat([sigma, sigma]))
    g = guidance.to(x_t.device) if torch.is_tensor(guidance) else torch.full((B,), guidance, device=x_t.device)
    return guided(out.video, levels(g, x_t)), guided(out.audio, None if xa_t is None else levels(g, xa_t))


def score_x0(model: DiT, seq: dict, x_t: torch.Tensor, xa_t: torch.Tensor | None, sigma: torch.Tensor,
             chunk_frames: int | None, guidance: float | torch.Tensor = 1.0, guide: str = "all",
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A model's x0 prediction (video, joint audio) on a stream sequence (`score_v`'s velocity)."""
    v, va = score_v(model, seq, x_t, xa_t, sigma, chunk_frames, guidance, guide)
    return x0_from_v(v, x_t, sigma), (None if va is None else x0_from_v(va, xa_t, sigma))


def real_guidance(s: torch.Tensor, st: DMDSettings) -> tuple[torch.Tensor | float, torch.Tensor]:
    """(the real score's guidance at noise levels s [B]: st.guidance inside the band, 1 outside, or the
    number 1.0 when unguided; which rows are guided [B] bool)."""
    band = (s >= st.guidance_min_level) & (s <= st.guidance_max_level)
    g = torch.where(band, torch.full_like(s, st.guidance), torch.ones_like(s))
    return (g if st.guidance != 1.0 else 1.0), band


def _level(draw: Draw, obj: ObjectiveSettings, st: DMDSettings) -> torch.Tensor:
    """[B] noise levels: the teacher's shifted distribution mapped into [min_level, max_level]."""
    s = shift_sigma(draw.rand(torch.float64), obj.shift).float()
    return st.min_level + (st.max_level - st.min_level) * s


def generator_loss(teacher: DiT, critic: DiT, batch: dict, video: torch.Tensor, audio_latent: torch.Tensor | None,
                   obj: ObjectiveSettings, st: DMDSettings, draw: Draw, whole: int = 0) -> tuple[torch.Tensor, dict]:
    """The DMD loss of the student's clip `video` [B, C, F, h, w] (and joint `audio_latent`), which
    carries the rollout's gradients; `batch` gives its conditions (ref, text, audio). Teacher and
    critic are evaluated without gradients. obj: chunk_frames, window, sink and shift of the teacher
    (`whole` > 0: a bidirectional teacher and critic trained on clips of `whole` latent frames, scoring
    windows of that length; the shift alone is read)."""
    clip = {**batch, "video": video, "audio_latent": audio_latent}
    if whole:                                  # a window at one level, every frame scored (c None: bidirectional)
        seq, i = window(clip, whole, draw, teacher.cfg.audio_context)
        s = _level(draw, obj, st)
        sigma, cur, c = s.to(video.device), slice(None), None
    else:                                      # chunk i after its clean history, as stage 2 trains it
        B, F, c = video.shape[0], video.shape[2], obj.chunk_frames
        i = draw.randint(F // c)
        frames, p = training_frames(i, c, obj.window // c, obj.sink, F)
        seq = stream_sequence(clip, frames, *teacher.cfg.audio_context)
        m = seq["video"].shape[2]
        s = _level(draw, obj, st)
        sigma = torch.cat([torch.zeros(B, p), s[:, None].expand(B, m - p)], 1).to(video.device)
        cur = slice(p, p + c)
    x0, xa0 = seq["video"], seq["audio_latent"]
    with torch.no_grad():
        x_t, xa_t = noised(x0, sigma, draw), noised(xa0, sigma, draw)
        g, band = real_guidance(s, st)
        real, real_a = score_x0(teacher, seq, x_t, xa_t, sigma, c, g, st.guide)
        fake, fake_a = score_x0(critic, seq, x_t, xa_t, sigma, c)
        grad = dmd_gradient(x0[:, :, cur], fake[:, :, cur], real[:, :, cur])
    loss = _matching(x0[:, :, cur], grad)
    parts = {"loss_dmd": loss.detach(), "chunk": torch.tensor(float(i)), "level": s.mean(),
             "guided": band.float().mean()}
    if xa0 is not None:
        grad_a = dmd_gradient(xa0[:, cur], fake_a[:, cur], real_a[:, cur])
        loss_a = _matching(xa0[:, cur], grad_a)
        loss = loss + obj.audio_weight * loss_a
        parts["loss_dmd_audio"] = loss_a.detach()
    return loss.float(), parts


def window(clip: dict, frames: int, draw: Draw, audio_context: tuple[int, int]) -> tuple[dict, int]:
    """A window of `frames` consecutive latent frames of a clip (the whole clip when shorter) at a start
    drawn uniformly, with its conditions (objectives.stream_sequence): (the window, its start)."""
    F = clip["video"].shape[2]
    n = min(frames, F)
    a = draw.randint(F - n + 1)
    return stream_sequence(clip, torch.arange(a, a + n), *audio_context), a


def sync_reward(video: torch.Tensor, batch: dict, lipsync: str) -> torch.Tensor:
    """The teachers' sync loss (stages/train/lipsync.py `sync_loss`, the frozen discriminator loaded once
    per run by stages/train/losses.py `discriminator`) on the student's clip `video` [B, C, F, h, w],
    every frame scored against the batch's speech ("audio") at the batch's mouth boxes ("mouth_box"
    [B, F, 2]); its gradient reaches the student through the rollout, as the DMD loss's does."""
    from stages.train.lipsync import sync_loss
    from stages.train.losses import discriminator
    boxes, audio = batch.get("mouth_box"), batch.get("audio")
    if boxes is None or audio is None:
        raise ValueError("the sync reward needs speech features and mouth boxes (world clips rendered with masks)")
    return sync_loss(video, audio, boxes, discriminator(lipsync, str(video.device)))


def check_lipsync(path: str, cfg) -> None:
    """Raise ValueError (one line) unless `path` is a lip-sync discriminator that fits the model `cfg`."""
    from pathlib import Path

    from stages.train.lipsync import LipSyncConfig, check_hears_logmel
    from stages.train.losses import discriminator
    if not Path(path).is_file():
        raise ValueError(f"--lipsync {path}: no such discriminator file (train one with the recipe's lipsync phase)")
    check_hears_logmel(cfg)
    got, want = discriminator(path, "cpu").cfg, LipSyncConfig.for_model(cfg)
    keys = ("crop", "channels", "mel_steps", "n_mels", "context")
    bad = [f"{k} {getattr(got, k)} (model {getattr(want, k)})" for k in keys if getattr(got, k) != getattr(want, k)]
    if bad:
        raise ValueError(f"--lipsync {path} does not fit the model: {', '.join(bad)}")


def critic_loss(critic: DiT, batch: dict, video: torch.Tensor, audio_latent: torch.Tensor | None,
                obj: ObjectiveSettings, draw: Draw, whole: int = 0) -> tuple[torch.Tensor, dict]:
    """The fake score's update: the teacher's stage-2 flow loss (objectives.causal_loss; `whole` > 0: stage
    1's, objectives.bidirectional_loss, on a `window` of that many frames) on the student's clip
    (detached) with the batch's conditions, no condition dropout (the fake score is taken conditional)."""
    fake = {**batch, "video": video.detach(), "audio_latent": None if audio_latent is None else audio_latent.detach()}
    for key in REGIONS:                        # the student's clip is not the batch's: not its regions
        fake.pop(key, None)
    obj = dataclasses.replace(obj, p_drop_text=0.0, p_drop_audio=0.0, p_drop_ref=0.0)
    if whole:
        return bidirectional_loss(critic, window(fake, whole, draw, critic.cfg.audio_context)[0], obj, draw)
    return causal_loss(critic, fake, obj, draw)
