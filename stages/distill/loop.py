"""The distillation loop (stage 3, issue 17): a few-step student and its critic, both initialised from the
frozen causal teacher (or the student from a previous distillation's EMA: `init_student`), trained by DMD (dmd.py) on the student's self-rollouts (rollout.py), with the
training stages' machinery (stages/train/machinery.py: AdamW with warmup-cosine, EMA, per-step
randomness, the checkpoint folder layout and resume).

One step: the student rolls out a clip of `chunks` chunks (exit steps and the engine's seed drawn from
the step's generator), the generator loss is backpropagated through the exit steps and the student
updated (its EMA too); then the critic takes `critic_updates` flow-loss steps on the clip. The first
`ode_warmup` steps replace DMD with the ODE regression of ode.py (the student learns the teacher's
few-step trajectories; the critic trains on its samples as usual). The next `critic_warmup` steps train
the critic alone (the generator loss is measured, not applied; the student's
schedule starts after them), so that a student warm-started against another teacher is not driven by a
fake score that still describes the teacher (session 31: without it, such a student broke). Every random
number is a function of (seed, step), so a resumed run repeats the uninterrupted one exactly
(tests/test_distill.py). Checkpoints (out/step-NNNNNN/): the student (model.safetensors, ema.safetensors,
whose "sampling" record streams it at its few steps with no flags), critic.safetensors, and state.pt
with both optimizers and schedules, step and loss history.

`distill_run` (`vidu distill --from causal.ckpt`) distills a teacher checkpoint on the synthetic world
or a manifest (stages/train/data.py, coded with the teacher's autoencoder), one process, bf16 autocast
on GPU, a catalog row per run. A bidirectional teacher (stage 1's checkpoint: `vidu distill --from
bidirectional.ckpt --init-student student.ckpt`) is distilled asymmetrically (dmd.py, `whole`): real and
fake scores read windows of the rollout as long as the teacher's training clips, the student starts from a distilled causal student, whose record gives
the streaming layout (chunk, window, sink) stage 1 never had; ODE warm-up and PCM, which step the
teacher chunk by chunk, are refused there.

With `lipsync` the generator loss adds sync_weight x the teachers' sync loss on the student's rollout
(dmd.py `sync_reward`).

With `pcm_weight` > 0 it adds the PCM regularizer (pcm.py, eq. 7: the student's jumps to its phase
edges against one guided teacher ODE step and the EMA student), its distance `pcm_distance`
(perceptual.py): by default the teacher's autoencoder's encoder features of the decoded chunks (the
Distiller is given the run's codec), or the latents' squared difference, or LPIPS with the user's weights.

Under torchrun (`torchrun --nproc-per-node N vidu distill ...`) student and critic are sharded with FSDP2
(each block a unit, as the training stages shard), the frozen teacher is replicated, and each process
rolls out and scores its rows of the global batch with the single process's random numbers for them
(rollout noise, levels, exit steps), so N processes train what one does (tests/test_distill_fsdp.py).
PCM's EMA student is then the gathered EMA on an unsharded copy of the model.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from models.checkpoint import read_metadata, read_state_dict, save_model
from models.config import ModelConfig
from models.dit import DiT
from stages.distill.dmd import DMDSettings, check_lipsync, critic_loss, generator_loss, sync_reward
from stages.distill.ode import ode_loss
from stages.distill.pcm import WithWeights, pcm_loss, phase_edges
from stages.distill.perceptual import DISTANCES, build as build_distance, load_lpips
from stages.distill.rollout import STUDENT_STEPS, exit_steps, self_rollout, student_settings
from stages.run import ranged
from stages.train.machinery import (Dist, adamw, agreed, batch_rows, checkpoint_dir, ema_decay, ema_update, full_tensor,
                                    init_dist, latest_state, load_like, mean_over_ranks, optimizer_step, shard,
                                    step_generator, write_checkpoint)
from stages.train.objectives import Draw, ObjectiveSettings


@dataclass(frozen=True)
class DistillSettings:
    steps: int = ranged(200, min=1)
    batch: int = ranged(2, min=1)
    lr: float = ranged(2e-5, gt=0)           # the student's peak learning rate
    # the critic must keep up with the student (DMD2's two time scales): 4x its lr and 5 updates a step;
    # with 2x and 1 the GPU students drifted (sessions 30-32), with these one beat them on every score (RESULTS, session 34)
    critic_lr: float = ranged(8e-5, gt=0)
    warmup: int = ranged(10, min=0)
    min_lr_ratio: float = ranged(0.1, min=0, max=1)
    weight_decay: float = ranged(0.0, min=0)
    grad_clip: float = ranged(1.0, gt=0)
    ema: float = ranged(0.99, min=0, max=1)
    save_every: int = ranged(100, min=1)
    minutes: float | None = ranged(None, gt=0)   # stop (with a checkpoint) after this much training time
    seed: int = ranged(0, min=0)
    student_steps: int = ranged(STUDENT_STEPS, min=1, max=1000)   # denoising steps per chunk of the student
    critic_updates: int = ranged(5, min=1)   # critic steps per generator step
    critic_warmup: int = ranged(0, min=0)    # then steps that train the critic alone (see the module doc)
    ode_warmup: int = ranged(0, min=0)       # first steps of ODE regression instead of DMD (ode.py)
    ode_substeps: int = ranged(4, min=1)     # teacher Euler steps per phase of the student's schedule there
    chunks: int = ranged(5, min=1)           # chunks per rollout
    # roll out with LongLive's recache (a row's history re-read under its new text at an instruction switch,
    # rollout.py), and record it: the student then streams with recache by default
    recache: bool = False
    init_from: str | None = None             # the causal teacher (distill_run)
    # warm start: the student and its EMA start from this checkpoint (a previous distilled student's
    # ema.safetensors, of the teacher's config) instead of the teacher; critic and real score stay the
    # teacher. A GPU run is <= 9 minutes and carries no optimizer state, so a second distillation phase
    # starts from the first phase's shipped EMA (with fresh optimizers and schedule).
    init_student: str | None = None
    samples: int = ranged(256, min=1)        # synthetic clips giving the conditions (cycled)
    render_overlap: int = ranged(0, min=0)   # roll out while the clips render (TrainSettings.render_overlap)
    data: str | None = None                  # a manifest to take the conditions from instead
    dmd: DMDSettings = field(default_factory=DMDSettings)
    # the sync reward (DMD tends to erode lip sync): sync_weight x the teachers' sync loss (a trained
    # lip-sync discriminator's file `lipsync`, stages/train/lipsync.py) on the student's whole rollout,
    # added to the generator loss. With `lipsync` given the sync loss is logged (loss_sync) at any weight,
    # 0 included: lip sync measured with and without the reward.
    sync_weight: float = ranged(0.0, min=0)
    lipsync: str | None = None
    # the PCM regularizer (pcm.py, eq. 7): its weight in the generator loss (0: pure DMD) and the teacher
    # ODE steps each phase of the student's schedule is cut into
    pcm_weight: float = ranged(0.0, min=0)
    pcm_substeps: int = ranged(4, min=1)
    # PCM's distance d (perceptual.py): "auto" is "lpips" where `lpips` is given, else "codec" (the teacher's
    # autoencoder's encoder features of the decoded chunks) in a Distiller given the run's codec (distill_run's
    # always is), else "latent" (the latents' squared difference)
    pcm_distance: str = ranged("auto", choices=DISTANCES)
    lpips: str | None = None                 # LPIPS's backbone: a torchvision AlexNet or VGG16 state dict file
    lpips_lin: str | None = None             # LPIPS's linear layers (default: in `lpips`, else the lpips package's)
    # compile the blocks of the teacher, student and critic on CUDA (DiT.compile_blocks, shapes dynamic: the
    # rollout's context grows), as the teachers' `vidu train --compile`; ignored on the CPU
    compile: bool = False

    def __post_init__(self):
        if self.ode_warmup + self.critic_warmup >= self.steps:
            raise ValueError(f"ode_warmup {self.ode_warmup} + critic_warmup {self.critic_warmup} leaves no DMD step "
                             f"of {self.steps}")
        if self.sync_weight > 0 and not self.lipsync:
            raise ValueError("sync_weight > 0 needs a lip-sync discriminator file (--lipsync)")
        if self.pcm_distance == "lpips" and not self.lpips:
            raise ValueError("--pcm-distance lpips needs the backbone's weights: --lpips PATH (a torchvision AlexNet "
                             "or VGG16 state dict)")
        if self.lpips and self.pcm_distance not in ("auto", "lpips"):
            raise ValueError(f"--lpips is read by --pcm-distance lpips, not {self.pcm_distance}")
        if self.lpips_lin and not self.lpips:
            raise ValueError("--lpips-lin goes with --lpips (the backbone's weights)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_world(st: DistillSettings, d: Dist) -> None:
    """Whether `st` can run on d.world processes; raises ValueError (one line) unless."""
    if d.world == 1:
        return
    if st.batch % d.world:
        raise ValueError(f"--batch {st.batch} does not split over {d.world} processes")


def check_student(path: str | Path, cfg: ModelConfig) -> None:
    """Whether a previous distilled student at `path` can start the student; raises ValueError (one line) unless it is a vidu distillation checkpoint of exactly the config `cfg` (the
    teacher's, with its record's chunk size: what `Distiller.save` writes)."""
    from models.checkpoint import checkpoint_config, checkpoint_sampling
    if not Path(path).is_file():
        raise ValueError(f"--init-student {path}: no such checkpoint file")
    got = checkpoint_config(path)
    if got is None:
        raise ValueError(f"--init-student {path} is not a vidu checkpoint (it records no model config)")
    if got != cfg:
        want, have = _flat(cfg.to_dict()), _flat(got.to_dict())
        diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
        shown = ", ".join(f"{k} {have.get(k)!r} (teacher {want.get(k)!r})" for k in diff[:3])
        raise ValueError(f"--init-student {path} has another config than the teacher: {shown}"
                         + (f" and {len(diff) - 3} more" if len(diff) > 3 else ""))
    stage = (checkpoint_sampling(path) or {}).get("stage")
    if stage != "distill":
        raise ValueError(f"--init-student {path} is not a distilled student (its sampling record says stage "
                         f"{stage!r}); give a `vidu distill` checkpoint's ema.safetensors")


def check_whole(st: DistillSettings) -> None:
    """ValueError (one line) for settings a bidirectional teacher cannot serve."""
    if st.ode_warmup or st.pcm_weight > 0:
        raise ValueError("a bidirectional teacher scores whole clips: ODE warm-up and PCM step it chunk by chunk "
                         "(distill a causal teacher for them)")


def student_layout(st: DistillSettings, teacher_record: dict) -> dict:
    """The record a bidirectional teacher's distillation streams by: the warm student's (`--init-student`,
    a distilled student that check_student has accepted: chunk, window, sink, noisy level; stage 1 trained
    none of them) with the teacher's codec, whose latents the run's clips are coded in. ValueError (one
    line) on another schedule."""
    from models.checkpoint import checkpoint_sampling
    student = checkpoint_sampling(st.init_student)
    if student["shift"] != teacher_record["shift"]:
        raise ValueError(f"--init-student {st.init_student} streams with shift {student['shift']:g}, the teacher was "
                         f"trained with {teacher_record['shift']:g}")
    return {**student, "codec": teacher_record["codec"]}


def _flat(d: dict, pre: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{pre}{k}."))
        else:
            out[pre + k] = list(v) if isinstance(v, tuple) else v
    return out


class Distiller:
    """Student, critic and their optimizers around a frozen `teacher` whose checkpoint recorded
    `record` (its "sampling" metadata); `batches(step) -> dict` gives a step's conditions
    (ref [B, C, 1, h, w], text, audio) for this process's rows of the global batch (`rows`); `codec`:
    the teacher's autoencoder (TAEHV, on `device`), which PCM's perceptual distances decode with
    (perceptual.py). `d`: the processes (torchrun): student and critic are sharded over them (FSDP2),
    the teacher is replicated, each process rolls out its rows with the single process's random numbers
    for them, so N processes train what one does with the same global batch."""

    def __init__(self, teacher: DiT, cfg: ModelConfig, record: dict, st: DistillSettings, out: Path,
                 batches: Callable[[int], dict], device=torch.device("cpu"), codec=None, d: Dist | None = None,
                 whole: bool = False):
        if whole:
            check_whole(st)
        # a bidirectional teacher (and so critic) scores windows of the clips it was trained on: dmd.py's `whole`
        self.window = cfg.latent_frames if whole else 0
        self.st, self.cfg, self.out, self.batches, self.device = st, cfg, Path(out), batches, torch.device(device)
        self.d = d or Dist(0, 1, self.device)
        check_world(st, self.d)
        self.rows = batch_rows(st.batch, self.d)
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.student = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.critic = copy.deepcopy(self.teacher).train().requires_grad_(True)
        if st.compile and self.device.type == "cuda":
            for m in (self.teacher, self.student, self.critic):
                m.compile_blocks()
        # provenance: the lineage of what the student starts from (the teacher's, or the warm student's), then this run
        start = st.init_student or st.init_from
        self.lineage = list(read_metadata(start).get("lineage") or []) if start and Path(start).exists() else []
        warm = None
        if st.init_student:                  # warm start: student and EMA from a previous student's EMA
            check_student(st.init_student, cfg)
            warm = read_state_dict(st.init_student)
            self.student.load_state_dict(warm)
        if st.lipsync:
            check_lipsync(st.lipsync, cfg)
        # PCM's d (perceptual.py): its resolved name ("latent" | "codec" | "lpips") and the function
        self.pcm_distance, self.distance = (build_distance(st.pcm_distance, codec, st.lpips, st.lpips_lin)
                                            if st.pcm_weight > 0 else (None, None))
        self.stream = student_settings(cfg, record, st.student_steps, st.recache)
        self.record = {**record, "stage": "distill", "steps": st.student_steps, "sampler": "renoise",
                       "guidance": 1.0, "twin": self.stream.twin, "noisy_step": self.stream.noisy_step,
                       "recache": st.recache}
        self.obj = ObjectiveSettings(shift=record["shift"], chunk_frames=record["chunk_frames"],
                                     window=record["window"], sink=record["sink"])
        # PCM's EMA student on several processes: the gathered EMA on an unsharded copy (pcm.py WithWeights)
        self.ema_copy = (copy.deepcopy(self.teacher) if self.d.world > 1 and st.pcm_weight > 0 else None)
        if self.d.world > 1:
            shard(self.student)
            shard(self.critic)
        self.ema = {k: p.detach().clone().float() for k, p in self.student.named_parameters()}   # warm: its EMA
        self.opt, self.sched = adamw(self.student, dataclasses.replace(st, steps=st.steps - st.critic_warmup, critic_warmup=0),
                                     device)
        self.critic_opt, self.critic_sched = adamw(self.critic, dataclasses.replace(st, lr=st.critic_lr), device)
        self.step, self.history = 0, []

    def train_step(self) -> dict:
        st = self.st
        batch = self.batches(self.step)
        lo, hi = self.rows
        draw = Draw(step_generator(st.seed, self.step), lo, hi, st.batch)
        exits = exit_steps(draw, st.chunks, st.student_steps)
        seed = draw.randint(2 ** 62)
        ode, critic_only = self.step < st.ode_warmup, self._critic_only()
        with torch.set_grad_enabled(not (ode or critic_only)), self._autocast():   # DMD: through the exit steps
            video, audio = self_rollout(self.student, self.cfg, self.stream, batch["ref"], batch["text"],
                                        batch.get("audio"), st.chunks, exits, seed, (lo, st.batch), batch.get("voice"))
        with torch.set_grad_enabled(not critic_only), self._autocast():
            loss, parts = self._generator_loss(batch, video, audio, draw, ode, extras=not critic_only)
        gnorm = 0.0
        if not critic_only:                  # a critic warm-up step measures the generator loss, applies nothing
            loss.backward()
            gnorm = float(full_tensor(optimizer_step(self.student, self.opt, self.sched, st.grad_clip)))
            ema_update(self.ema, self.student, ema_decay(self.step, st.ema))
        critic = self._critic_updates(batch, video, audio, draw)
        return self._log(loss, critic, gnorm, parts)

    def _generator_loss(self, batch: dict, video, audio, draw: Draw, ode: bool, extras: bool) -> tuple:
        """The student's loss on its rollout: the ODE regression (ode.py) during the ODE warm-up, else DMD
        with (`extras`) the sync reward and PCM as the settings ask."""
        st, edges = self.st, phase_edges(self.stream.steps, self.stream.shift)
        if ode:
            return ode_loss(self.student, self.teacher, batch, video, audio, self.obj, edges, st.dmd,
                            st.ode_substeps, draw)
        loss, parts = generator_loss(self.teacher, self.critic, batch, video, audio, self.obj, st.dmd, draw, self.window)
        terms = {"dmd": loss}
        if extras and st.lipsync:            # the sync reward (or, at weight 0, its measurement)
            with torch.set_grad_enabled(st.sync_weight > 0 and torch.is_grad_enabled()):
                sync = sync_reward(video, batch, st.lipsync)
            if st.sync_weight > 0:
                loss, terms["sync"] = loss + st.sync_weight * sync, sync
            parts["loss_sync"] = sync.detach()
        if extras and st.pcm_weight > 0:     # PCM: the student's phase jumps against the teacher's ODE
            ema = (WithWeights(self.student, self.ema) if self.ema_copy is None
                   else WithWeights(self.ema_copy, {k: full_tensor(v) for k, v in self.ema.items()}))
            pcm, pcm_parts = pcm_loss(self.student, ema, self.teacher, batch, video, audio, self.obj, edges,
                                      st.dmd, st.pcm_substeps, draw, self.distance)
            loss, terms["pcm"] = loss + st.pcm_weight * pcm, pcm
            parts.update(pcm_parts)
        parts.update(self._term_norms(terms))
        return loss, parts

    def _term_norms(self, terms: dict) -> dict:
        """With more than one term in the generator loss: each term's gradient norm (unweighted) at the
        student's output layer (Head.head), "gnorm_<term>", the measure of how the weights balance them
        (as VQGAN's adaptive weight measures its losses' gradients there; a few extra backward steps from
        each loss to that layer only). One process only: a sharded layer's per-term gradients would need
        FSDP's reduction, which autograd.grad does not run."""
        if len(terms) < 2 or self.d.world > 1 or not torch.is_grad_enabled():
            return {}
        layer = self.student.head.head
        out = {}
        for name, term in terms.items():
            grads = torch.autograd.grad(term, [layer.weight, layer.bias], retain_graph=True, allow_unused=True)
            out[f"gnorm_{name}"] = torch.stack([g.float().square().sum() for g in grads if g is not None]).sum().sqrt()
        return out

    def _critic_updates(self, batch: dict, video, audio, draw: Draw) -> list[float]:
        critic = []
        for _ in range(self.st.critic_updates):
            with self._autocast():
                c_loss, _ = critic_loss(self.critic, batch, video, audio, self.obj, draw, self.window)
            c_loss.backward()
            optimizer_step(self.critic, self.critic_opt, None, self.st.grad_clip)
            critic.append(mean_over_ranks(c_loss, self.d))
        self.critic_sched.step()
        return critic

    def _critic_only(self) -> bool:
        return self.st.ode_warmup <= self.step < self.st.ode_warmup + self.st.critic_warmup

    def _log(self, loss, critic: list[float], gnorm: float, parts: dict) -> dict:
        logged = {"step": self.step, "loss": mean_over_ranks(loss, self.d), "loss_critic": sum(critic) / len(critic),
                  "grad_norm": gnorm, "lr": 0.0 if self._critic_only() else self.sched.get_last_lr()[0],
                  **{k: mean_over_ranks(v, self.d) for k, v in parts.items()}}
        self.history.append(logged)
        self.step += 1
        return logged

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def save(self) -> Path | None:
        """Every process gathers, the first writes (None elsewhere)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        student, critic = (get_model_state_dict(m, options=opts) for m in (self.student, self.critic))
        optim, critic_optim = (get_optimizer_state_dict(m, o, options=opts)
                               for m, o in ((self.student, self.opt), (self.critic, self.critic_opt)))
        ema = {k: full_tensor(v).cpu() for k, v in self.ema.items()}
        if not self.d.main:
            return None
        lineage = self.lineage + [{"stage": "distill", "steps": self.step, "preset": self.cfg.name, "batch": self.st.batch,
                    **({"init_student": self.st.init_student} if self.st.init_student else {}),
                    **({"teacher": "bidirectional"} if self.window else {})}]
        meta = {"sampling": self.record}

        def write(tmp: Path) -> None:
            save_model(tmp / "model.safetensors", student, self.cfg, lineage, {"kind": "raw", "step": self.step, **meta})
            save_model(tmp / "ema.safetensors", ema, self.cfg, lineage, {"kind": "ema", "step": self.step, **meta})
            save_model(tmp / "critic.safetensors", critic, self.cfg, lineage, {"kind": "critic", "step": self.step})
            torch.save({"optimizer": optim, "scheduler": self.sched.state_dict(),
                        "critic_optimizer": critic_optim,
                        "critic_scheduler": self.critic_sched.state_dict(), "step": self.step,
                        "history": self.history, "settings": self.st.to_dict()}, tmp / "state.pt")
        return write_checkpoint(self.out, self.step, write, self.history, f"distill ({self.cfg.name})")

    def resume(self) -> bool:
        found = latest_state(self.out, self.st)
        if found is None:
            return False
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        path, state = found
        opts = StateDictOptions(full_state_dict=True)
        # parameters a rollout never reaches (e.g. the audio branch without audio) have no optimizer state
        loose = StateDictOptions(full_state_dict=True, strict=False)
        for m, o, name, optim in ((self.student, self.opt, "model", "optimizer"),
                                  (self.critic, self.critic_opt, "critic", "critic_optimizer")):
            set_model_state_dict(m, read_state_dict(path / f"{name}.safetensors"), options=opts)
            set_optimizer_state_dict(m, o, state[optim], options=loose)
        ema = read_state_dict(path / "ema.safetensors")
        for k, v in self.ema.items():
            load_like(v, ema[k])
        self.sched.load_state_dict(state["scheduler"])
        self.critic_sched.load_state_dict(state["critic_scheduler"])
        self.step, self.history = state["step"], state["history"]
        return True

    def checkpoint_dir(self, step: int) -> Path:
        return checkpoint_dir(self.out, step)


def distill(dst: Distiller, progress=None, deadline: float | None = None) -> dict:
    """Run (or resume, from out/latest) `dst` to its settings' steps, checkpointing every save_every
    and when `minutes` of training have passed or at `deadline` (a time.perf_counter() value; then it
    stops there)."""
    dst.out.mkdir(parents=True, exist_ok=True)
    resumed = dst.resume()
    n0, t0 = dst.step, time.perf_counter()
    while dst.step < dst.st.steps:
        logged = dst.train_step()
        if progress and dst.d.main:
            progress(logged)
        now = time.perf_counter()
        timed_out = agreed((dst.st.minutes is not None and now - t0 > dst.st.minutes * 60)
                           or (deadline is not None and now > deadline), dst.d)
        if dst.step % dst.st.save_every == 0 or dst.step == dst.st.steps or timed_out:
            dst.save()
        if timed_out:
            break
    seconds = time.perf_counter() - t0
    return {"out": str(dst.out), "resumed_from": n0 if resumed else None, "steps": dst.step,
            "final_loss": dst.history[-1]["loss"] if dst.history else None, "train_s": seconds,
            "samples_per_s": (dst.step - n0) * dst.st.batch / max(seconds, 1e-9),
            "checkpoint": str(dst.checkpoint_dir(dst.step))}


def distill_run(st: DistillSettings, out: str | Path, root: Path | None = None, progress=None,
                d: Dist | None = None, prefetch: int = 0, deadline: float | None = None) -> dict:
    """Distill the teacher checkpoint `st.init_from` into out/ (re-run to resume); the conditions come
    from the dataset stage 2 trains on, its clips of `chunks` chunks, coded with the teacher's
    autoencoder (`prefetch` > 0: rendered in that many processes, up front or beside the rollouts with
    st.render_overlap, and kept on the device).
    Records a catalog row under `root`; `deadline` as distill's."""
    from models.checkpoint import checkpoint_sampling, load_dit
    from stages.train.data import build_dataset
    from stages.train.loop import TrainSettings, prepare_codec
    d = d or init_dist()
    check_world(st, d)
    if not st.init_from:
        raise ValueError("distillation needs a teacher: --from causal.ckpt (or a bidirectional one with --init-student)")
    record = checkpoint_sampling(st.init_from)
    whole = (record or {}).get("stage") == "bidirectional"
    if not record or record.get("stage") not in ("causal", "bidirectional"):
        raise ValueError(f"{st.init_from} is not a causal or bidirectional teacher (its sampling record says stage "
                         f"{(record or {}).get('stage')!r}); distill the checkpoint of `vidu train`")
    if whole and not st.init_student:
        raise ValueError(f"{st.init_from} is a bidirectional teacher: its student starts from a distilled causal "
                         "student (--init-student student.ckpt), whose streaming layout stage 1 never had")
    if whole:
        check_whole(st)
    teacher, cfg = load_dit(st.init_from)
    cfg = cfg.replace(chunk_frames=record["chunk_frames"])
    if st.init_student:
        check_student(st.init_student, cfg)       # refuse a wrong file before the data are built
    if whole:
        record = student_layout(st, record)
    if st.lipsync:
        check_lipsync(st.lipsync, cfg)
    if st.lpips:
        load_lpips(st.lpips, st.lpips_lin)   # refuse unfit LPIPS weights before the data are built
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    latest_state(out, st)          # a run that cannot resume says so before its data are rendered
    data_st = TrainSettings(stage="causal", seed=st.seed, samples=st.samples, data=st.data, init_from=st.init_from)
    data = build_dataset(cfg.replace(latent_frames=st.chunks * record["chunk_frames"]), data_st, out, d,
                         prepare_codec, masks=bool(st.lipsync))        # the sync reward's mouth boxes

    lo, hi = batch_rows(st.batch, d)

    def batches(step: int) -> dict:                # this process's rows of the step's global batch
        b = data.batch(step * st.batch + lo, hi - lo, d.device)
        return {k: b[k] for k in ("ref", "text", "audio", "voice", "mouth_box") if k in b}

    codec = data.codec
    if codec is None and st.pcm_weight > 0:  # clips given as latents: PCM decodes with the teacher's codec file
        from models.checkpoint import load_taehv
        from stages.train.data import teacher_codec
        path = teacher_codec(st.init_from)
        codec = load_taehv(path, d.device) if path is not None and path.is_file() else None
    dst = Distiller(teacher, cfg, record, st, out, batches, d.device, codec, d, whole)
    run_id = "distill-" + hashlib.sha256(json.dumps(st.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    if root is not None and d.main:
        from manifests import catalog
        from stages.run.runner import code_version
        catalog.record_start(root, run_id, "distill", "checkpoint", {"distill": st.to_dict(), "model": cfg.to_dict()},
                             code_version(), [st.init_from], str(out))
    t0, n0, state = time.perf_counter(), None, "failed"
    try:
        data.start(prefetch, st.render_overlap, st.batch, d.device)
        summary = distill(dst, progress, deadline)
        n0, state = summary["resumed_from"] or 0, "done"
    finally:
        data.close()                     # the rendering thread, when training ended before it did
        if root is not None and d.main:
            from manifests import catalog
            catalog.record_end(root, run_id, state, {"ok": dst.step}, n0 or 0, time.perf_counter() - t0)
    return {"run_id": run_id, **summary, "seconds": time.perf_counter() - t0}
