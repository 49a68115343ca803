"""The training loop of every stage: the video autoencoder and the two teachers.

    summary = train(TrainSettings(stage="autoencoder", preset="tiny", steps=200), "runs/ae")
    summary = train(TrainSettings(stage="bidirectional", preset="tiny", steps=200,
                                  codec="runs/ae/step-000200/ema.safetensors"), "runs/bi")

The autoencoder stage is stages/train/autoencoder.py (one process); the teachers are below.

One process, or `torchrun --nproc-per-node N vidu train ...`: each rank holds a shard of the model
(FSDP2 `fully_shard` per block and at the root) and its rows of every global batch. With
`sequence_parallel` P > 1, groups of P consecutive ranks take the same rows and split each sample's
tokens (Ulysses, models/ulysses.py); a rank's gradients are its tokens' share, so its loss is scaled by
P before FSDP2 averages over all ranks, which gives the mean over the groups of each group's summed
shares: the single-process gradient. AdamW with linear warmup and cosine decay, gradient clipping,
EMA weights, bf16 autocast on GPU, optional gradient checkpointing. Checkpoints every `save_every` steps under out_dir/step-NNNNNN/ (model and
EMA as vidu safetensors with config, lineage and the sampling / streaming settings the model was trained
for (`sampling_record`: shift, steps, chunk frames, window, sink, noisy-cache level, codec), state.pt with optimizer, schedule, EMA, step and
loss history); a re-run resumes from the newest one and continues exactly: data order and noise are
functions of (seed, step), so a resumed run reproduces the uninterrupted run's losses. `minutes` stops a
run (with a checkpoint) after that much training time; re-running continues it.

Stage 2 trains in the streaming regime on clips of `objective.clip_frames` latent frames, with the
window and sink its checkpoints record (`stream_objective`; objectives.py `causal_loss`).

The teachers code frames with a TAEHV autoencoder: `codec`, else the one the `init_from` checkpoint was
trained with, else one trained here first (stages/train/data.py `prepare_codec`); it is copied to
out/codec.safetensors and recorded in every checkpoint's "sampling" metadata.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.checkpoint import load_dit, read_metadata, save_model
from models.config import PRESETS, preset as get_preset
from models.dit import DiT
from stages.run import ranged
from stages.train.autoencoder import AutoencoderSettings
from stages.train.data import CODEC_FILE, Dataset, build_dataset, teacher_codec
from stages.train.machinery import (Dist, adamw, agreed, batch_rows, checkpoint_dir, ema_decay, ema_update, full_tensor,
                                    init_dist, latest_state, load_like, mean_over_ranks, optimizer_step, sequence_group,
                                    shard, step_generator, write_checkpoint)
from stages.train.objectives import OBJECTIVES, Draw, ObjectiveSettings
from stages.train.sample import sampling_record

STAGES = ("autoencoder", *OBJECTIVES)


@dataclass(frozen=True)
class TrainSettings:
    stage: str = ranged("bidirectional", choices=STAGES)
    preset: str = ranged("tiny", choices=tuple(PRESETS))
    steps: int = ranged(200, min=1)
    batch: int = ranged(4, min=1)        # global batch (split across ranks, or groups of sequence_parallel ranks)
    sequence_parallel: int = ranged(1, min=1)   # ranks splitting each sample's tokens (teachers, under torchrun)
    lr: float = ranged(3e-4, gt=0)
    warmup: int = ranged(20, min=0)
    min_lr_ratio: float = ranged(0.1, min=0, max=1)
    weight_decay: float = ranged(0.01, min=0)
    grad_clip: float = ranged(1.0, gt=0)
    ema: float = ranged(0.999, min=0, max=1)
    grad_ckpt: bool = False
    # the teachers: compile each DiT block with torch.compile on CUDA (fuses the fp32 adaLN/norm arithmetic
    # that bounds an eager step of a small model: 1.8-2x samples/s for `small` on an H200,
    # benchmarks/train_step.py; ~20 s of compilation once); ignored on the CPU. Static shapes: stage 2's
    # sequences have one length (objectives.training_frames)
    compile: bool = False
    save_every: int = ranged(100, min=1)
    seed: int = ranged(0, min=0)
    samples: int = ranged(256, min=1)    # synthetic training samples (the dataset cycles over them)
    data: str | None = None              # a synth manifest to train on instead of clips rendered on the fly
    init_from: str | None = None         # checkpoint to start from (stage 2: the bidirectional teacher)
    # teachers: a checkpoint of another preset whose tensors of the same name and shape seed the model, the rest
    # starting fresh (a video teacher for its -voice preset: all but the speech input and the joint-audio branch)
    warm_from: str | None = None
    codec: str | None = None             # teachers: the autoencoder (vidu train --stage autoencoder) coding frames
    # teachers: start from init_from under `codec`, another autoencoder than the one init_from was trained with
    # (the DiT relearns the latent space; a codec retrained from the old one keeps much of it); else refused
    recode: bool = False
    minutes: float | None = ranged(None, gt=0)   # stop (with a checkpoint) after this much training time
    # teachers: the draws while the clips render (Dataset.fill; with --workers they render beside training):
    # the first batch's clips, each further clip joining after this many more samples; 0: every clip first
    render_overlap: int = ranged(0, min=0)
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    autoencoder: AutoencoderSettings = field(default_factory=AutoencoderSettings)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage is one of: {', '.join(STAGES)}")
        if self.compile and self.stage == "autoencoder":
            raise ValueError("--compile is for the teachers (the DiT's blocks)")
        if self.stage == "autoencoder" and (self.codec or self.init_from or self.data):
            raise ValueError("the autoencoder stage trains on the synthetic world from scratch: "
                             "--codec, --from and --data are for the teachers")
        if self.recode and not (self.codec and (self.init_from or self.warm_from)):
            raise ValueError("--recode goes with --from (or --warm-from) and the new --codec")
        if self.warm_from and (self.init_from or self.stage == "autoencoder"):
            raise ValueError("--warm-from seeds a teacher of another preset; --from continues one of this preset: "
                             "give one of them")
        if self.sequence_parallel > 1 and (self.stage == "autoencoder" or self.compile):
            raise ValueError("--sequence-parallel is for the teachers without --compile (its all-to-alls are "
                             "not compiled)")

    def to_dict(self) -> dict:
        """What is trained, which a resumed run must repeat: not sequence_parallel, which like the number
        of processes only lays the work out (the catalog records both beside it)."""
        d = dataclasses.asdict(self)
        del d["sequence_parallel"]
        return d


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
        self.cfg = cfg.replace(chunk_frames=cf) if st.stage == "causal" else cfg
        self.objective = dataclasses.replace(st.objective, chunk_frames=cf)
        if self.objective.lipsync:
            from stages.train.lipsync import check_hears_logmel
            check_hears_logmel(cfg)
        if st.stage == "causal":
            self.objective = stream_objective(self.objective, self.cfg)
        # stage 2 trains on long clips (the objective's clip_frames), stage 1 on the model's
        data_cfg = cfg.replace(latent_frames=self.objective.clip_frames) if st.stage == "causal" else cfg
        torch.manual_seed(st.seed)
        model = DiT(cfg.dit)
        if init is not None:
            model.load_state_dict(init)
        if st.warm_from:
            self.lineage = warm_start(model, st.warm_from, cfg)
        model.gradient_checkpointing = st.grad_ckpt
        model.to(d.device).train()
        if st.compile and d.device.type == "cuda":
            model.compile_blocks(dynamic=False)
        if st.sequence_parallel > 1:
            model.shard_sequence(sequence_group(st.sequence_parallel))
        if d.world > 1:
            shard(model)
        self.model = model
        self.ema = {k: p.detach().clone().float() for k, p in model.named_parameters()}
        self.opt, self.sched = adamw(model, st, d.device)
        self.step = 0
        self.history: list[dict] = []
        self.data: Dataset = build_dataset(data_cfg, st, self.out, d, prepare_codec,
                                           masks=self.objective.needs_masks, ref_pose=self.objective.ref_pose)
        self.data.start(prefetch, st.render_overlap, st.batch, d.device)

    def close(self) -> None:
        """Stop the data's rendering thread (training ended before the rendering did)."""
        self.data.close()

    # -- one optimisation step --
    def rows(self) -> tuple[int, int]:
        return batch_rows(self.st.batch, self.d, self.st.sequence_parallel)

    def train_step(self) -> dict:
        st, d = self.st, self.d
        lo, hi = self.rows()
        batch = self.data.batch(self.step * st.batch + lo, hi - lo, d.device)
        draw = Draw(step_generator(st.seed, self.step), lo, hi, st.batch)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
            loss, parts = OBJECTIVES[st.stage](self.model, batch, self.objective, draw)
        (loss * st.sequence_parallel).backward()      # FSDP2 averages over all ranks; a group's shares add up
        gnorm = optimizer_step(self.model, self.opt, self.sched, st.grad_clip)
        ema_update(self.ema, self.model, ema_decay(self.step, st.ema))
        logged = {"step": self.step, "loss": loss.detach().float(), "grad_norm": full_tensor(gnorm).float(),
                  **{k: v.float() for k, v in parts.items()}}
        logged = {k: (mean_over_ranks(v, d) if torch.is_tensor(v) else v) for k, v in logged.items()}
        logged["lr"] = self.sched.get_last_lr()[0]
        self.step += 1
        return logged

    # -- checkpoints --
    def checkpoint_dir(self, step: int) -> Path:
        return checkpoint_dir(self.out, step)

    def save(self) -> Path | None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)
        optim_sd = get_optimizer_state_dict(self.model, self.opt, options=opts)
        ema_sd = {k: full_tensor(v).cpu() for k, v in self.ema.items()}
        if not self.d.main:
            return None
        lineage = self.lineage + [{"stage": self.st.stage, "steps": self.step, "preset": self.cfg.name,
                                   "batch": self.st.batch, "data": self.st.data or f"synth:{self.st.samples}@{self.st.seed}",
                                   "date": time.strftime("%Y-%m-%d")}]
        sampling = self.sampling()

        def write(tmp: Path) -> None:
            save_model(tmp / "model.safetensors", model_sd, self.cfg, lineage,
                       {"kind": "raw", "step": self.step, "sampling": sampling})
            save_model(tmp / "ema.safetensors", ema_sd, self.cfg, lineage,
                       {"kind": "ema", "step": self.step, "sampling": sampling})
            torch.save({"optimizer": optim_sd, "scheduler": self.sched.state_dict(), "step": self.step,
                        "history": self.history, "settings": self.st.to_dict()}, tmp / "state.pt")
        return write_checkpoint(self.out, self.step, write, self.history, f"{self.st.stage} ({self.cfg.name})")

    def sampling(self) -> dict:
        """The settings the checkpoint records (a checkpoint sits in out/step-N/, the codec in out/)."""
        ob = self.objective
        if self.data.codec is not None:
            codec = self.data.codec_record
        else:
            codec = {"kind": self.data.source.rows[0]["latent_kind"]}
        return sampling_record(self.cfg, self.st.stage, ob.shift, ob.chunk_frames, noisy_level(self.st.stage, ob),
                               codec)

    def resume(self) -> bool:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        from models.checkpoint import read_state_dict
        found = latest_state(self.out, self.st)
        if found is None:
            return False
        path, state = found
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, read_state_dict(path / "model.safetensors"), options=opts)
        set_optimizer_state_dict(self.model, self.opt, state["optimizer"], options=opts)
        self.sched.load_state_dict(state["scheduler"])
        ema = read_state_dict(path / "ema.safetensors")
        for k, v in self.ema.items():
            load_like(v, ema[k])
        self.step, self.history = state["step"], state["history"]
        return True


def noisy_level(stage: str, ob: ObjectiveSettings) -> float | None:
    """The highest history noise level training showed (None: clean history only)."""
    return ob.tau_max if stage == "causal" and ob.p_teacher_forcing < 1 else None


def stream_objective(ob: ObjectiveSettings, cfg) -> ObjectiveSettings:
    """The objective with stage 2's window and sink filled in from the checkpoint's record
    (`sampling_record`: what fits in the model's 1 + latent_frames positions), so that training streams
    exactly what `vidu stream --ckpt` will; a given window or sink the record would not say is refused,
    as is a clip too short for the window to wrap."""
    rec = sampling_record(cfg, "causal", ob.shift, ob.chunk_frames, None, {})
    for name in ("window", "sink"):
        given = getattr(ob, name)
        if given is not None and given != rec[name]:
            raise ValueError(f"stage 2 streams with the {name} its checkpoint records, {rec[name]} for preset "
                             f"{cfg.name} with chunks of {ob.chunk_frames}; {given} is not recordable")
    ob = dataclasses.replace(ob, window=rec["window"], sink=rec["sink"])
    context = (ob.chunk_frames if ob.sink else 0) + ob.window + ob.chunk_frames
    if ob.clip_frames <= context:
        raise ValueError(f"clip_frames {ob.clip_frames} must exceed sink + window + chunk = {context} latent "
                         f"frames, so that the window wraps as in a long stream")
    return ob


def tokens_per_sample(cfg) -> int:
    return (1 + cfg.latent_frames) * cfg.tokens_per_frame()


INLINE_CODEC_STEPS = 50     # a teacher given no codec trains this quick one first (give --codec for a real one)


def prepare_codec(cfg, st: TrainSettings, out: Path) -> Path:
    """out/codec.safetensors: a copy of st.codec, else of the codec st.init_from was trained with, else
    an autoencoder of the preset trained here first (INLINE_CODEC_STEPS steps, in out/codec-run/). A
    st.codec other than init_from's is refused unless st.recode."""
    path = Path(out) / CODEC_FILE
    if path.exists():
        return path
    origin = st.init_from or st.warm_from
    given, inherited = (Path(st.codec) if st.codec else None), teacher_codec(origin)
    if given and inherited and not st.recode and not _same_codec(given, inherited, origin):
        raise ValueError(f"--codec {given} is not the autoencoder {origin} was trained with ({inherited}); "
                         f"--recode trains it on the new codec's latents")
    src = given or inherited
    tmp = path.with_name(path.name + ".tmp")
    if src is None:
        key = (cfg.name, st.seed)
        if key not in _INLINE_CODECS:
            _INLINE_CODECS[key] = _train_inline_codec(cfg, st.seed, Path(out) / "codec-run").read_bytes()
        tmp.write_bytes(_INLINE_CODECS[key])
    elif not src.is_file():
        raise ValueError(f"codec not found: {src}")
    else:
        shutil.copyfile(src, tmp)
    tmp.replace(path)
    return path


_INLINE_CODECS: dict[tuple[str, int], bytes] = {}      # (preset, seed) -> the quick codec, trained once a process


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def warm_start(model: DiT, path: str, cfg) -> list[dict]:
    """Seed `model` (preset `cfg`) with every tensor of the checkpoint `path` of the same name and shape; the
    lineage the trained model inherits: path's, then the warm start (which tensors came, of how many)."""
    from models.checkpoint import read_state_dict
    own, src = model.state_dict(), read_state_dict(path)
    fit = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    if not fit:
        raise ValueError(f"--warm-from {path}: none of its tensors fits preset {cfg.name}")
    model.load_state_dict(fit, strict=False)
    fresh = sorted(k for k in own if k not in fit)
    return list(read_metadata(path).get("lineage", [])) + [
        {"warm_from": Path(path).name, "preset": cfg.name, "tensors": len(fit), "of": len(own), "fresh": fresh}]


def _same_codec(given: Path, inherited: Path, init_from: str) -> bool:
    """`given` is the codec `init_from` was trained with: the digest prefix its record keeps, else (an
    older record) the file it names. The digest first: a checkpoint copied into a folder beside another
    codec file (teacher_recipe.py's W/<stage>/ beside W/codec.safetensors) names that file."""
    from models.checkpoint import checkpoint_sampling
    recorded = checkpoint_sampling(init_from)["codec"].get("sha256")
    if recorded:
        return _digest(given).startswith(recorded)
    return inherited.is_file() and _digest(given) == _digest(inherited)


def _train_inline_codec(cfg, seed: int, out: Path) -> Path:
    """A quick autoencoder of the preset, trained in this process on one thread (bit-identical wherever
    it runs, so runs and their resumptions agree)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        st = TrainSettings(stage="autoencoder", preset=cfg.name, steps=INLINE_CODEC_STEPS, batch=2, lr=2e-3, warmup=5,
                           save_every=INLINE_CODEC_STEPS, seed=seed)
        summary = train(st, out, d=Dist())
    finally:
        torch.set_num_threads(threads)
    return Path(summary["checkpoint"]) / "ema.safetensors"


def train(st: TrainSettings, out: str | Path, root: Path | None = None, progress=None, prefetch: int = 0,
          d: Dist | None = None, deadline: float | None = None) -> dict:
    """Run (or resume) a training stage; returns a summary. `progress(logged)` is called per step;
    `prefetch` > 0: that many processes render data (teachers: the whole dataset up front; the
    autoencoder: DataLoader workers). `d`: the processes (default: torchrun's, or this one).
    `deadline` (a time.perf_counter() value): stop there with a checkpoint too, however long the data
    took (a GPU run's hard limit; `minutes` counts training time alone)."""
    d = d or init_dist()
    if d.world % st.sequence_parallel:
        raise ValueError(f"{d.world} processes do not form groups of --sequence-parallel {st.sequence_parallel}")
    if st.batch % (d.world // st.sequence_parallel):
        raise ValueError(f"--batch {st.batch} does not split over {d.world // st.sequence_parallel} "
                         f"{'groups of processes' if st.sequence_parallel > 1 else 'processes'}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    latest_state(out, st)          # a run that cannot resume says so before its data are rendered
    t_start = time.perf_counter()
    if st.stage == "autoencoder":
        from stages.train.autoencoder import AutoencoderTrainer
        trainer = AutoencoderTrainer(st, out, d, prefetch)
    else:
        trainer = Trainer(st, out, d, prefetch)
    resumed = trainer.resume()
    run_id = "train-" + hashlib.sha256(json.dumps(st.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    params = {"train": st.to_dict(), "model": trainer.cfg.to_dict(), "world_size": d.world,
              "sequence_parallel": st.sequence_parallel}
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
            now = time.perf_counter()
            timed_out = agreed((st.minutes is not None and now - t0 > st.minutes * 60)
                                or (deadline is not None and now > deadline), d)
            if trainer.step % st.save_every == 0 or trainer.step == st.steps or timed_out:
                trainer.save()
            if timed_out:
                break
        state = "done" if trainer.step == st.steps else "stopped"
    except KeyboardInterrupt:
        state = "interrupted"
        raise
    finally:
        seconds = time.perf_counter() - t0
        trainer.close()
        if d.main and root is not None:
            from manifests import catalog
            catalog.record_end(root, run_id, state, {"ok": trainer.step}, n0, seconds)
    steps_run = trainer.step - n0
    samples_s = steps_run * st.batch / max(seconds, 1e-9)
    tokens = 0 if st.stage == "autoencoder" else tokens_per_sample(trainer.cfg)
    return {"run_id": run_id, "out": str(out), "resumed_from": n0 if resumed else None, "steps": trainer.step,
            "final_loss": trainer.history[-1]["loss"] if trainer.history else None,
            "samples_per_s": samples_s, "tokens_per_s": samples_s * tokens,
            "params": sum(p.numel() for p in trainer.model.parameters()) if d.world == 1 else None,
            "checkpoint": str(trainer.checkpoint_dir(trainer.step)), "world_size": d.world, "seconds": seconds,
            "data_s": t0 - t_start}
