"""The training loop shared by both teacher stages.

    summary = train(TrainSettings(stage="bidirectional", preset="tiny", steps=200), out_dir)

One process, or `torchrun --nproc-per-node N vidu train ...`: each rank holds a shard of the model
(FSDP2 `fully_shard` per block and at the root) and its rows of every global batch. AdamW with
linear warmup and cosine decay, gradient clipping, EMA weights, bf16 autocast on GPU, optional
gradient checkpointing. Checkpoints every `save_every` steps under out_dir/step-NNNNNN/ (model and
EMA as vidu safetensors with config, lineage and the sampling / streaming settings the model was trained
for (`sampling_record`: shift, steps, chunk frames, window, sink, noisy-cache level, codec), state.pt with optimizer, schedule, EMA, step and
loss history); a re-run resumes from the newest one and continues exactly: data order and noise are
functions of (seed, step), so a resumed run reproduces the uninterrupted run's losses.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from models.checkpoint import load_dit, read_metadata, save_model
from models.config import PRESETS, preset as get_preset
from models.dit import DiT
from stages.run import ranged
from stages.train.data import Dataset, build_dataset
from stages.train.objectives import OBJECTIVES, Draw, ObjectiveSettings
from stages.train.plot import loss_curve_png
from stages.train.sample import sampling_record


@dataclass(frozen=True)
class TrainSettings:
    stage: str = ranged("bidirectional", choices=tuple(OBJECTIVES))
    preset: str = ranged("tiny", choices=tuple(PRESETS))
    steps: int = ranged(200, min=1)
    batch: int = ranged(4, min=1)        # global batch (split across ranks)
    lr: float = ranged(3e-4, gt=0)
    warmup: int = ranged(20, min=0)
    min_lr_ratio: float = ranged(0.1, min=0, max=1)
    weight_decay: float = ranged(0.01, min=0)
    grad_clip: float = ranged(1.0, gt=0)
    ema: float = ranged(0.999, min=0, max=1)
    grad_ckpt: bool = False
    save_every: int = ranged(100, min=1)
    seed: int = ranged(0, min=0)
    samples: int = ranged(256, min=1)    # synthetic training samples (the dataset cycles over them)
    data: str | None = None              # a synth manifest to train on instead of clips rendered on the fly
    init_from: str | None = None         # checkpoint to start from (stage 2: the bidirectional teacher)
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)

    def __post_init__(self):
        if self.stage not in OBJECTIVES:
            raise ValueError(f"--stage is one of: {', '.join(OBJECTIVES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist() -> Dist:
    """torchrun's environment -> a process group (nccl on GPU, gloo on CPU); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(0, 1, torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu"))


def lr_factor(step: int, st: TrainSettings) -> float:
    if step < st.warmup:
        return (step + 1) / st.warmup
    progress = (step - st.warmup) / max(1, st.steps - st.warmup)
    return st.min_lr_ratio + (1 - st.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_generator(seed: int, step: int) -> torch.Generator:
    h = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little"))


class Trainer:
    def __init__(self, st: TrainSettings, out: Path, d: Dist, prefetch: int = 0):
        self.st, self.out, self.d = st, Path(out), d
        cfg = get_preset(st.preset)
        self.lineage: list[dict] = []
        if st.init_from:
            meta = read_metadata(st.init_from)
            self.lineage = list(meta.get("lineage", []))
            src, cfg_from = load_dit(st.init_from)
            cfg = cfg_from if cfg_from.name.split(":")[0] != "inferred" else cfg
            init = src.state_dict()
        else:
            init = None
        # ModelConfig.chunk_frames is the causal block size: the objective's default, and what a
        # causal checkpoint records it was trained with
        cf = st.objective.chunk_frames or cfg.chunk_frames
        self.objective = dataclasses.replace(st.objective, chunk_frames=cf)
        self.cfg = cfg.replace(chunk_frames=cf) if st.stage == "causal" else cfg
        torch.manual_seed(st.seed)
        model = DiT(cfg.dit)
        if init is not None:
            model.load_state_dict(init)
        model.gradient_checkpointing = st.grad_ckpt
        model.to(d.device).train()
        if d.world > 1:
            from torch.distributed.fsdp import fully_shard
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        self.model = model
        self.ema = {k: p.detach().clone().float() for k, p in model.named_parameters()}
        fused = d.device.type == "cuda"
        self.opt = torch.optim.AdamW(model.parameters(), lr=st.lr, betas=(0.9, 0.999), weight_decay=st.weight_decay,
                                     fused=fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, st))
        self.step = 0
        self.history: list[dict] = []
        self.data: Dataset = build_dataset(cfg, st.samples, st.seed, self.out, d, st.data)
        if prefetch:
            self.data.prefetch(prefetch)

    # -- one optimisation step --
    def rows(self) -> tuple[int, int]:
        per = self.st.batch // self.d.world
        return self.d.rank * per, (self.d.rank + 1) * per

    def train_step(self) -> dict:
        st, d = self.st, self.d
        lo, hi = self.rows()
        batch = self.data.batch(self.step * st.batch + lo, hi - lo, d.device)
        draw = Draw(step_generator(st.seed, self.step), lo, hi, st.batch)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
            loss, parts = OBJECTIVES[st.stage](self.model, batch, self.objective, draw)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), st.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, p in self.model.named_parameters():
                self.ema[k].lerp_(p.detach().float(), 1 - st.ema)
        logged = {"step": self.step, "loss": loss.detach().float(), "grad_norm": _full(gnorm).float(),
                  **{k: v.float() for k, v in parts.items()}}
        logged = {k: (self._mean(v) if torch.is_tensor(v) else v) for k, v in logged.items()}
        logged["lr"] = self.sched.get_last_lr()[0]
        self.step += 1
        return logged

    def _mean(self, v: torch.Tensor) -> float:
        v = v.detach().float().reshape(()).to(self.d.device)
        if self.d.world > 1:
            dist.all_reduce(v)
            v = v / self.d.world
        return float(v)

    # -- checkpoints --
    def checkpoint_dir(self, step: int) -> Path:
        return self.out / f"step-{step:06d}"

    def save(self) -> Path | None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)
        optim_sd = get_optimizer_state_dict(self.model, self.opt, options=opts)
        ema_sd = {k: _full(v).cpu() for k, v in self.ema.items()}
        if not self.d.main:
            return None
        path = self.checkpoint_dir(self.step)
        tmp = path.with_name(path.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        lineage = self.lineage + [{"stage": self.st.stage, "steps": self.step, "preset": self.cfg.name,
                                   "batch": self.st.batch, "data": self.st.data or f"synth:{self.st.samples}@{self.st.seed}",
                                   "date": time.strftime("%Y-%m-%d")}]
        sampling = self.sampling()
        save_model(tmp / "model.safetensors", model_sd, self.cfg, lineage,
                   {"kind": "raw", "step": self.step, "sampling": sampling})
        save_model(tmp / "ema.safetensors", ema_sd, self.cfg, lineage,
                   {"kind": "ema", "step": self.step, "sampling": sampling})
        torch.save({"optimizer": optim_sd, "scheduler": self.sched.state_dict(), "step": self.step,
                    "history": self.history, "settings": self.st.to_dict()}, tmp / "state.pt")
        if path.exists():
            import shutil
            shutil.rmtree(path)
        tmp.rename(path)
        (self.out / "latest").write_text(path.name + "\n")
        loss_curve_png(self.history, self.out / "loss.png", title=f"{self.st.stage} ({self.cfg.name})")
        log = self.out / "loss.jsonl"
        log.with_name("loss.jsonl.tmp").write_text("".join(json.dumps(h) + "\n" for h in self.history))
        log.with_name("loss.jsonl.tmp").replace(log)
        return path

    def sampling(self) -> dict:
        """The settings the checkpoint records (a checkpoint sits in out/step-N/, the codec in out/)."""
        ob = self.objective
        if self.data.codec is not None:
            codec = {"kind": "pca", "file": "../codec.safetensors", "channels": self.data.codec.channels}
        else:
            codec = {"kind": self.data.source.rows[0]["latent_kind"]}
        noisy = ob.tau_max if self.st.stage == "causal" and ob.p_teacher_forcing < 1 else None
        return sampling_record(self.cfg, self.st.stage, ob.shift, ob.chunk_frames, noisy, codec)

    def resume(self) -> bool:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        from models.checkpoint import read_state_dict
        latest = self.out / "latest"
        if not latest.is_file():
            return False
        path = self.out / latest.read_text().strip()
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        if state["settings"] != json.loads(json.dumps(self.st.to_dict())):
            raise ValueError(f"{path} was written with other settings; use another --out or the same options")
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, read_state_dict(path / "model.safetensors"), options=opts)
        set_optimizer_state_dict(self.model, self.opt, state["optimizer"], options=opts)
        self.sched.load_state_dict(state["scheduler"])
        ema = read_state_dict(path / "ema.safetensors")
        for k, v in self.ema.items():
            _load_like(v, ema[k])
        self.step, self.history = state["step"], state["history"]
        return True


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _load_like(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a full tensor into `dst`, which may be a shard (DTensor) of it."""
    if hasattr(dst, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        dst.copy_(distribute_tensor(src.to(dst.dtype), dst.device_mesh, dst.placements))
    else:
        dst.copy_(src)


def tokens_per_sample(cfg) -> int:
    return (1 + cfg.latent_frames) * cfg.tokens_per_frame()


def train(st: TrainSettings, out: str | Path, root: Path | None = None, progress=None, prefetch: int = 0) -> dict:
    """Run (or resume) a training stage; returns a summary. `progress(logged)` is called per step;
    `prefetch` > 0 renders the whole dataset up front in that many processes."""
    d = init_dist()
    if st.batch % d.world:
        raise ValueError(f"--batch {st.batch} does not split over {d.world} processes")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(st, out, d, prefetch)
    resumed = trainer.resume()
    run_id = "train-" + hashlib.sha256(json.dumps(st.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    params = {"train": st.to_dict(), "model": trainer.cfg.to_dict(), "world_size": d.world}
    if d.main and root is not None:
        from manifests import catalog
        from stages.run.runner import code_version
        catalog.record_start(root, run_id, f"train-{st.stage}", "checkpoint", params, code_version(),
                             [st.init_from] if st.init_from else [], str(out))
    t0, n0 = time.perf_counter(), trainer.step
    state = "failed"
    try:
        while trainer.step < st.steps:
            logged = trainer.train_step()
            if d.main:
                trainer.history.append(logged)
                if progress:
                    progress(logged)
            if trainer.step % st.save_every == 0 or trainer.step == st.steps:
                trainer.save()
        state = "done"
    except KeyboardInterrupt:
        state = "interrupted"
        raise
    finally:
        seconds = time.perf_counter() - t0
        if d.main and root is not None:
            from manifests import catalog
            catalog.record_end(root, run_id, state, {"ok": trainer.step}, n0, seconds)
    steps_run = trainer.step - n0
    samples_s = steps_run * st.batch / max(seconds, 1e-9)
    return {"run_id": run_id, "out": str(out), "resumed_from": n0 if resumed else None, "steps": trainer.step,
            "final_loss": trainer.history[-1]["loss"] if trainer.history else None,
            "samples_per_s": samples_s, "tokens_per_s": samples_s * tokens_per_sample(trainer.cfg),
            "params": sum(p.numel() for p in trainer.model.parameters()) if d.world == 1 else None,
            "checkpoint": str(trainer.checkpoint_dir(trainer.step)), "world_size": d.world, "seconds": seconds}
