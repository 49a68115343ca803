"""The PCM regularizer of distillation (eq. 7 of the paper; Wang et al. 2024, Phased Consistency Models),
per chunk in the streaming regime, beside DMD (dmd.py): `--pcm-weight 0` is pure DMD.

The student's few-step schedule cuts the flow ODE into phases: its levels s_0 > .. > s_{K-1} (the
engine's, models.flow.sigmas) and 0 are the phase edges, phase m = (e, h] with h = s_m, e = s_{m+1}
(0 after the last). Within a phase the consistency function of a model with velocity v maps a state to
the phase's edge along its own flow (an Euler jump, exact for a straight trajectory):

    f(x_t, t) = x_t + (e - t) v(x_t, t)           (f(x_e, e) = x_e: the boundary condition)

One chunk i and one phase m are drawn per step; the phase is cut into `substeps` equal ODE steps,
t_{n+1} one of its grid points above the edge and t_n the next one down:

    x_{t_{n+1}}  = the student's own rollout (detached) noised to t_{n+1}: its chunk i, its history clean
                   (the sequence of objectives.training_frames, as in dmd.py)
    x^_{t_n}     = x_{t_{n+1}} + (t_n - t_{n+1}) v_teacher(x_{t_{n+1}})   one step of the teacher's ODE,
                   guided as the real score is (DMDSettings: guidance, guide, band)
    loss         = lambda(t_n) d(f_student(x_{t_{n+1}}, t_{n+1}), sg f_EMA(x^_{t_n}, t_n))

so the student's jumps to the phase edge agree with the teacher's ODE, which keeps it on the teacher's
trajectories where DMD alone drifts (mode collapse). lambda(t_n) = 1 (the consistency models' choice,
which PCM keeps). The distance d of the video chunk is `distance` (perceptual.py; DistillSettings
pcm_distance): the mean squared difference in latent space ("latent"), or a perceptual distance of the
frames the run's autoencoder (TAEHV) decodes of both chunks: its encoder's feature maps compared
LPIPS-style ("codec", the default of a run with its codec) or LPIPS with the user's weights ("lpips",
`--lpips PATH`); the joint audio latent's d stays the mean squared difference (x audio_weight). The
EMA student is the student's module with the EMA's weights (torch.func.functional_call), no second copy.

The student streams with x0-and-renoise steps, not Euler jumps: at the last phase (edge 0) f is exactly
its x0 prediction; at the others PCM regularizes the velocity its x0 comes from.
"""
from __future__ import annotations

import torch

from models.dit import DiT
from models.flow import sigmas
from stages.distill.dmd import DMDSettings, real_guidance, score_v
from stages.distill.perceptual import Distance, latent_distance
from stages.train.objectives import Draw, ObjectiveSettings, levels, noised, stream_sequence, training_frames


class WithWeights:
    """`model` called with other weights (a dict of its parameter names, e.g. its EMA); no gradients
    to those weights."""

    def __init__(self, model: DiT, weights: dict[str, torch.Tensor]):
        self.model, self.weights, self.cfg = model, weights, model.cfg

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.weights, args, kwargs)


def phase_edges(steps: int, shift: float) -> list[float]:
    """The student's levels and 0: [s_0, .., s_{K-1}, 0] (phase m is (edges[m + 1], edges[m]])."""
    return [*sigmas(steps, shift), 0.0]


def consistency(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    """f(x_t, t) = x_t + (e - t) v: the jump to the phase edge e along velocity v (levels [B, m])."""
    return x_t + levels(edge - sigma, x_t) * v


def detached_chunk(teacher: DiT, batch: dict, video: torch.Tensor, audio_latent: torch.Tensor | None,
                   obj: ObjectiveSettings, draw: Draw) -> tuple:
    """A chunk i drawn from the student's rollout `video` (and joint `audio_latent`, both detached: used
    as samples), its stream sequence (objectives.training_frames: the history clean), the chunk's first
    position p and at(t): the sequence's levels [B, L], the history 0 and the chunk (and after) t."""
    B, F, c = video.shape[0], video.shape[2], obj.chunk_frames
    i = draw.randint(F // c)
    frames, p = training_frames(i, c, obj.window // c, obj.sink, F)
    seq = stream_sequence({**batch, "video": video.detach(),
                           "audio_latent": None if audio_latent is None else audio_latent.detach()},
                          frames, *teacher.cfg.audio_context)
    L, dev = seq["video"].shape[2], seq["video"].device

    def at(t: float) -> torch.Tensor:
        return torch.cat([torch.zeros(B, p), torch.full((B, L - p), t)], 1).to(dev)
    return i, seq, p, at


def pcm_loss(student: DiT, ema: WithWeights, teacher: DiT, batch: dict, video: torch.Tensor,
             audio_latent: torch.Tensor | None, obj: ObjectiveSettings, edges: list[float], st: DMDSettings,
             substeps: int, draw: Draw, distance: Distance = latent_distance) -> tuple[torch.Tensor, dict]:
    """The PCM term of the student's rollout `video` [B, C, F, h, w] (and joint `audio_latent`; both used
    detached, as samples), with `batch`'s conditions; the gradient reaches the student's weights through
    its prediction at x_{t_{n+1}} only. `ema`: the EMA student (WithWeights: the student's module with the
    EMA weights; under FSDP2 an unsharded copy with the gathered EMA); `edges`: `phase_edges`;
    `distance`: d of the video chunks (perceptual.py)."""
    B, c = video.shape[0], obj.chunk_frames
    _, seq, p, at = detached_chunk(teacher, batch, video, audio_latent, obj, draw)
    m = draw.randint(len(edges) - 1)
    n = 1 + draw.randint(substeps)
    hi, lo = edges[m], edges[m + 1]
    t_next, t_n = lo + (hi - lo) * n / substeps, lo + (hi - lo) * (n - 1) / substeps
    x0, xa0 = seq["video"], seq["audio_latent"]
    s_next, s_n, edge = at(t_next), at(t_n), at(lo)
    cur = slice(p, p + c)
    with torch.no_grad():
        x, xa = noised(x0, s_next, draw), noised(xa0, s_next, draw)
        g, _ = real_guidance(torch.full((B,), t_next), st)
        v, va = score_v(teacher, seq, x, xa, s_next, c, g, st.guide)          # one step of the teacher's ODE
        x_hat = x + levels(s_n - s_next, x) * v
        xa_hat = None if xa is None else xa + levels(s_n - s_next, xa) * va
        ve, vae = score_v(ema, seq, x_hat, xa_hat, s_n, c)
        target = consistency(x_hat, ve, s_n, edge)
        target_a = None if xa is None else consistency(xa_hat, vae, s_n, edge)
    vs, vas = score_v(student, seq, x, xa, s_next, c)
    pred = consistency(x, vs, s_next, edge)
    loss = distance(pred[:, :, cur], target[:, :, cur])
    parts = {"loss_pcm_video": loss.detach(), "pcm_phase": torch.tensor(float(m)), "pcm_level": torch.tensor(t_next)}
    if xa is not None:
        pred_a = consistency(xa, vas, s_next, edge)
        loss_a = latent_distance(pred_a[:, cur], target_a[:, cur])
        loss = loss + obj.audio_weight * loss_a
        parts["loss_pcm_audio"] = loss_a.detach()
    parts["loss_pcm"] = loss.detach()
    return loss, parts
