"""The ODE-regression warm-up of distillation (CausVid, Self-Forcing and LiveTalk start their few-step
students this way before DMD): for its first `ode_warmup` steps the student learns to jump from each of
its own levels straight to where the teacher's ODE lands, per chunk in the streaming regime.

One chunk i is drawn per step (the sequence of objectives.training_frames, its history the student's own
rollout, detached and clean, as in dmd.py and pcm.py). The chunk starts as noise at the student's first
level s_0 (the engine's start) and the teacher's flow ODE is solved from there to 0 with `substeps`
Euler steps per phase of the student's schedule (pcm.phase_edges), guided as the real score is
(DMDSettings: guidance, guide, band). The states it passes at the student's levels s_0 > .. > s_{K-1}
are the student's inputs, its endpoint x^_0 the target of each:

    loss = mean over m of  mean((x0_student(x_{s_m}, s_m) - x^_0)^2)    over the chunk's latents

(+ audio_weight x the same for the joint audio latent). The teacher runs without gradients; the
gradient reaches the student through its K predictions only. A step costs K x substeps guided teacher
passes (one teacher sample of the chunk) and K student passes.
"""
from __future__ import annotations

from itertools import pairwise

import torch

from models.dit import DiT
from stages.distill.dmd import DMDSettings, real_guidance, score_v, score_x0
from stages.distill.pcm import detached_chunk
from stages.train.objectives import Draw, ObjectiveSettings, levels, noised


def teacher_ode(teacher: DiT, seq: dict, x: torch.Tensor, xa: torch.Tensor | None, at, edges: list[float],
                substeps: int, c: int, st: DMDSettings) -> tuple[list, torch.Tensor, torch.Tensor | None]:
    """The teacher's Euler solution from `x` (and `xa`) at level edges[0] to 0: ([(level, x, xa) at each
    of edges[:-1]], x^_0, xa^_0). `at(t)`: the sequence's levels [B, L] with the chunk at t."""
    states = []
    B = x.shape[0]
    for hi, lo in pairwise(edges):
        states.append((hi, x, xa))
        for n in range(substeps):
            t0, t1 = hi + (lo - hi) * n / substeps, hi + (lo - hi) * (n + 1) / substeps
            g, _ = real_guidance(torch.full((B,), t0), st)
            v, va = score_v(teacher, seq, x, xa, at(t0), c, g, st.guide)
            x = x + levels(at(t1) - at(t0), x) * v
            xa = None if xa is None else xa + levels(at(t1) - at(t0), xa) * va
    return states, x, xa


def ode_loss(student: DiT, teacher: DiT, batch: dict, video: torch.Tensor, audio_latent: torch.Tensor | None,
             obj: ObjectiveSettings, edges: list[float], st: DMDSettings, substeps: int,
             draw: Draw) -> tuple[torch.Tensor, dict]:
    """The ODE-regression loss on one chunk of the student's rollout `video` [B, C, F, h, w] (used
    detached, for its history) with `batch`'s conditions; `edges`: pcm.phase_edges of the student."""
    c = obj.chunk_frames
    i, seq, p, at = detached_chunk(teacher, batch, video, audio_latent, obj, draw)
    x0, xa0 = seq["video"], seq["audio_latent"]
    cur = slice(p, p + c)
    with torch.no_grad():
        start = at(edges[0])
        states, target, target_a = teacher_ode(teacher, seq, noised(x0, start, draw), noised(xa0, start, draw),
                                               at, edges, substeps, c, st)
    loss = torch.zeros((), device=x0.device)
    loss_a = torch.zeros((), device=x0.device)
    for t, x, xa in states:
        pred, pred_a = score_x0(student, seq, x, xa, at(t), c)
        loss = loss + (pred[:, :, cur].float() - target[:, :, cur].float()).square().mean() / len(states)
        if pred_a is not None:
            loss_a = loss_a + (pred_a[:, cur].float() - target_a[:, cur].float()).square().mean() / len(states)
    parts = {"loss_ode_video": loss.detach(), "chunk": torch.tensor(float(i))}
    if xa0 is not None:
        loss = loss + obj.audio_weight * loss_a
        parts["loss_ode_audio"] = loss_a.detach()
    parts["loss_ode"] = loss.detach()
    return loss, parts
