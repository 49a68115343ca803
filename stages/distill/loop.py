"""The distillation loop (stage 3, issue 17): a few-step student and its critic, both initialised from the
frozen causal teacher, trained by DMD (dmd.py) on the student's self-rollouts (rollout.py), with the
training stages' machinery (stages/train/machinery.py: AdamW with warmup-cosine, EMA, per-step
randomness, the checkpoint folder layout and resume).

One step: the student rolls out a clip of `chunks` chunks (exit steps and the engine's seed drawn from
the step's generator), the generator loss is backpropagated through the exit steps and the student
updated (its EMA too); then the critic takes `critic_updates` flow-loss steps on the clip. Every random
number is a function of (seed, step), so a resumed run repeats the uninterrupted one exactly
(tests/test_distill.py). Checkpoints (out/step-NNNNNN/): the student (model.safetensors, ema.safetensors,
whose "sampling" record streams it at its few steps with no flags), critic.safetensors, and state.pt
with both optimizers and schedules, step and loss history.

Not yet here (issue 17): the data and the `vidu distill` command, FSDP2, mixed precision, PCM.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from models.checkpoint import read_state_dict, save_model
from models.config import ModelConfig
from models.dit import DiT
from stages.distill.dmd import DMDSettings, critic_loss, generator_loss
from stages.distill.rollout import STUDENT_STEPS, exit_steps, self_rollout, student_settings
from stages.run import ranged
from stages.train.machinery import (adamw, checkpoint_dir, ema_decay, ema_update, latest_state, step_generator,
                                    write_checkpoint)
from stages.train.objectives import Draw, ObjectiveSettings


@dataclass(frozen=True)
class DistillSettings:
    steps: int = ranged(200, min=1)
    batch: int = ranged(2, min=1)
    lr: float = ranged(2e-5, gt=0)           # the student's peak learning rate
    critic_lr: float = ranged(4e-5, gt=0)
    warmup: int = ranged(10, min=0)
    min_lr_ratio: float = ranged(0.1, min=0, max=1)
    weight_decay: float = ranged(0.0, min=0)
    grad_clip: float = ranged(1.0, gt=0)
    ema: float = ranged(0.99, min=0, max=1)
    save_every: int = ranged(100, min=1)
    seed: int = ranged(0, min=0)
    student_steps: int = ranged(STUDENT_STEPS, min=1, max=1000)   # denoising steps per chunk of the student
    critic_updates: int = ranged(1, min=1)   # critic steps per generator step
    chunks: int = ranged(5, min=1)           # chunks per rollout
    dmd: DMDSettings = field(default_factory=DMDSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Distiller:
    """Student, critic and their optimizers around a frozen `teacher` whose checkpoint recorded
    `record` (its "sampling" metadata); `batches(step) -> dict` gives a step's conditions
    (ref [B, C, 1, h, w], text, audio)."""

    def __init__(self, teacher: DiT, cfg: ModelConfig, record: dict, st: DistillSettings, out: Path,
                 batches: Callable[[int], dict], device=torch.device("cpu")):
        self.st, self.cfg, self.out, self.batches = st, cfg, Path(out), batches
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.student = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.critic = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.stream = student_settings(cfg, record, st.student_steps)
        self.record = {**record, "stage": "distill", "steps": st.student_steps, "sampler": "renoise",
                       "guidance": 1.0, "twin": self.stream.twin, "noisy_step": self.stream.noisy_step}
        self.obj = ObjectiveSettings(shift=record["shift"], chunk_frames=record["chunk_frames"],
                                     window=record["window"], sink=record["sink"])
        self.ema = {k: p.detach().clone().float() for k, p in self.student.named_parameters()}
        self.opt, self.sched = adamw(self.student, st, device)
        self.critic_opt, self.critic_sched = adamw(self.critic, dataclasses.replace(st, lr=st.critic_lr), device)
        self.step, self.history = 0, []

    def train_step(self) -> dict:
        st = self.st
        batch = self.batches(self.step)
        draw = Draw(step_generator(st.seed, self.step), 0, st.batch, st.batch)
        exits = exit_steps(draw, st.chunks, st.student_steps)
        seed = draw.randint(2 ** 62)
        video, audio = self_rollout(self.student, self.cfg, self.stream, batch["ref"], batch["text"], batch.get("audio"),
                                    st.chunks, exits, seed)
        loss, parts = generator_loss(self.teacher, self.critic, batch, video, audio, self.obj, st.dmd, draw)
        loss.backward()
        gnorm = _update(self.student, self.opt, self.sched, st.grad_clip)
        ema_update(self.ema, self.student, ema_decay(self.step, st.ema))
        critic = []
        for _ in range(st.critic_updates):
            c_loss, _ = critic_loss(self.critic, batch, video, audio, self.obj, draw)
            c_loss.backward()
            _update(self.critic, self.critic_opt, None, st.grad_clip)
            critic.append(float(c_loss.detach()))
        self.critic_sched.step()
        logged = {"step": self.step, "loss": float(loss.detach()), "loss_critic": sum(critic) / len(critic),
                  "grad_norm": float(gnorm), "lr": self.sched.get_last_lr()[0],
                  **{k: float(v) for k, v in parts.items()}}
        self.history.append(logged)
        self.step += 1
        return logged

    def save(self) -> Path:
        lineage = [{"stage": "distill", "steps": self.step, "preset": self.cfg.name, "batch": self.st.batch}]
        meta = {"sampling": self.record}

        def write(tmp: Path) -> None:
            save_model(tmp / "model.safetensors", self.student.state_dict(), self.cfg, lineage,
                       {"kind": "raw", "step": self.step, **meta})
            save_model(tmp / "ema.safetensors", self.ema, self.cfg, lineage, {"kind": "ema", "step": self.step, **meta})
            save_model(tmp / "critic.safetensors", self.critic.state_dict(), self.cfg, lineage,
                       {"kind": "critic", "step": self.step})
            torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                        "critic_optimizer": self.critic_opt.state_dict(),
                        "critic_scheduler": self.critic_sched.state_dict(), "step": self.step,
                        "history": self.history, "settings": self.st.to_dict()}, tmp / "state.pt")
        return write_checkpoint(self.out, self.step, write, self.history, f"distill ({self.cfg.name})")

    def resume(self) -> bool:
        found = latest_state(self.out, self.st.to_dict())
        if found is None:
            return False
        path, state = found
        self.student.load_state_dict(read_state_dict(path / "model.safetensors"))
        self.critic.load_state_dict(read_state_dict(path / "critic.safetensors"))
        ema = read_state_dict(path / "ema.safetensors")
        for k, v in self.ema.items():
            v.copy_(ema[k])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.critic_opt.load_state_dict(state["critic_optimizer"])
        self.critic_sched.load_state_dict(state["critic_scheduler"])
        self.step, self.history = state["step"], state["history"]
        return True

    def checkpoint_dir(self, step: int) -> Path:
        return checkpoint_dir(self.out, step)


def _update(model: DiT, opt, sched, clip: float) -> torch.Tensor:
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)
    return gnorm


def distill(dst: Distiller, progress=None) -> dict:
    """Run (or resume, from out/latest) `dst` to its settings' steps, checkpointing every save_every."""
    dst.out.mkdir(parents=True, exist_ok=True)
    resumed = dst.resume()
    n0 = dst.step
    while dst.step < dst.st.steps:
        logged = dst.train_step()
        if progress:
            progress(logged)
        if dst.step % dst.st.save_every == 0 or dst.step == dst.st.steps:
            dst.save()
    return {"out": str(dst.out), "resumed_from": n0 if resumed else None, "steps": dst.step,
            "final_loss": dst.history[-1]["loss"] if dst.history else None,
            "checkpoint": str(dst.checkpoint_dir(dst.step))}
