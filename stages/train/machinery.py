"""What every training stage shares: processes, the learning-rate schedule, per-step randomness, EMA
and the checkpoint folder layout.

A run's folder holds step-NNNNNN/ checkpoints (each written to a .tmp folder and renamed, so a crash
leaves the previous one whole), `latest` naming the newest, loss.jsonl (one line a step) and loss.png.
Every checkpoint has state.pt with the run's settings; a re-run resumes from `latest` only with the
same settings.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from stages.train.plot import loss_curve_png


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


def batch_rows(batch: int, d: Dist, sequence_parallel: int = 1) -> tuple[int, int]:
    """Rows [lo, hi) of a global batch that rank d.rank trains on: its sequence-parallel group's (groups
    of consecutive ranks, `sequence_group`), the batch split evenly over the groups."""
    group, groups = d.rank // sequence_parallel, d.world // sequence_parallel
    per = batch // groups
    return group * per, (group + 1) * per


def shard(model: torch.nn.Module) -> None:
    """FSDP2 over the process group: each DiT block a unit, the rest at the root."""
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: a shard (DTensor) gathered, a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def load_like(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a full tensor into `dst`, which may be a shard (DTensor) of it."""
    if hasattr(dst, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        dst.copy_(distribute_tensor(src.to(dst.dtype), dst.device_mesh, dst.placements))
    else:
        dst.copy_(src)


def agreed(flag: bool, d: Dist) -> bool:
    """True when any process says so (all stop at the same step)."""
    if d.world == 1:
        return flag
    t = torch.tensor(float(flag), device=d.device)
    dist.all_reduce(t)
    return bool(t.item())


def mean_over_ranks(v: torch.Tensor, d: Dist) -> float:
    """A scalar averaged over the processes (each its rows' mean: the global batch's)."""
    v = v.detach().float().reshape(()).to(d.device)
    if d.world > 1:
        dist.all_reduce(v)
        v = v / d.world
    return float(v)


def sequence_group(size: int) -> dist.ProcessGroup:
    """This rank's group of `size` consecutive ranks (ranks k*size .. (k+1)*size - 1) that split each
    sample's tokens (Ulysses, models/ulysses.py). Every rank must call it: groups are created
    collectively."""
    group, _ = dist.new_subgroups(group_size=size)
    return group


def lr_factor(step: int, st) -> float:
    """Linear warmup over st.warmup steps, then cosine decay to st.min_lr_ratio at st.steps."""
    if step < st.warmup:
        return (step + 1) / st.warmup
    progress = (step - st.warmup) / max(1, st.steps - st.warmup)
    return st.min_lr_ratio + (1 - st.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_generator(seed: int, step: int) -> torch.Generator:
    h = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little"))


def adamw(model: torch.nn.Module, st, device: torch.device):
    """AdamW and its warmup-cosine schedule for `model` under settings `st` (lr, weight_decay, ...)."""
    opt = torch.optim.AdamW(model.parameters(), lr=st.lr, betas=(0.9, 0.999), weight_decay=st.weight_decay,
                            fused=device.type == "cuda")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, st))


def optimizer_step(model: torch.nn.Module, opt, sched, clip: float) -> torch.Tensor:
    """Clip the gradients to norm `clip`, step the optimizer (and the schedule, unless None), clear the
    gradients; returns the norm before clipping."""
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)
    return gnorm


def ema_decay(step: int, decay: float) -> float:
    """The EMA decay at optimizer step `step` (0-based): min(decay, (1 + step) / (10 + step)), so the
    average forgets the random init early (with a fixed 0.999, 82 % of the EMA after 200 steps would
    still be the init) and settles at `decay`."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    for k, p in model.named_parameters():
        ema[k].lerp_(p.detach().float(), 1 - decay)


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / f"step-{step:06d}"


def write_checkpoint(out: Path, step: int, write: Callable[[Path], None], history: list[dict], title: str) -> Path:
    """out/step-NNNNNN/ holding what `write(folder)` puts there, then `latest`, loss.png and loss.jsonl."""
    path = checkpoint_dir(out, step)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    write(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    (out / "latest").write_text(path.name + "\n")
    loss_curve_png(history, out / "loss.png", title=title)
    log = out / "loss.jsonl"
    log.with_name("loss.jsonl.tmp").write_text("".join(json.dumps(h) + "\n" for h in history))
    log.with_name("loss.jsonl.tmp").replace(log)
    return path


RUN_CONTROL = ("minutes",)     # settings that stop a run without changing what it computes: a resume may change them


def _with_defaults(saved, defaults):
    """`saved` settings with the keys they lack (at any depth) taken from `defaults`."""
    if not isinstance(saved, dict) or not isinstance(defaults, dict):
        return saved
    return {**defaults, **{k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}}


def latest_state(out: Path, st) -> tuple[Path, dict] | None:
    """(newest checkpoint folder, its state.pt) of a run written with the settings `st` (a settings
    dataclass with to_dict(); RUN_CONTROL aside), or None for a new run. A setting added to vidu after
    the run was written counts as its default there (settings are added with the default that does what
    vidu did before them). Trainers call it before building their data too, so that a run that cannot
    resume says so at once."""
    latest = Path(out) / "latest"
    if not latest.is_file():
        return None
    path = Path(out) / latest.read_text().strip()
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)

    def computed(s: dict) -> dict:
        return {k: v for k, v in json.loads(json.dumps(s)).items() if k not in RUN_CONTROL}
    defaults = computed(type(st)().to_dict())
    if _with_defaults(computed(state["settings"]), defaults) != computed(st.to_dict()):
        raise ValueError(f"{path} was written with other settings; use another --out or the same options")
    return path, state
