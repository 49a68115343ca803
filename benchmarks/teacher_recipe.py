"""The teacher recipe on one GPU as phases, each one GPU run of at most 9 minutes: the video autoencoder,
stage 1 (bidirectional teacher), stage 2 (causal teacher), then the synth bench on held-out cases.

    python benchmarks/teacher_recipe.py --phase autoencoder   --work W --minutes 8.5   # skip it with --codec
    python benchmarks/teacher_recipe.py --phase bidirectional --work W --minutes 8.5 [--codec ae.safetensors]
    python benchmarks/teacher_recipe.py --phase causal        --work W --minutes 8.5
    python benchmarks/teacher_recipe.py --phase causal --again --work W --minutes 9   # further, from W/causal
    python benchmarks/teacher_recipe.py --phase causal --again --from models/starter/model.safetensors \
        --codec models/starter/codec.safetensors --work W --minutes 9      # W without a teacher: from the starter
    python benchmarks/teacher_recipe.py --phase causal --again --recode --from models/starter/model.safetensors \
        --codec NEW.safetensors --work W --minutes 9     # the starter's DiT onto a retrained codec's latents
    python benchmarks/teacher_recipe.py --phase eval          --work W --streams 4 [--guidance G --sampler S]
    python benchmarks/teacher_recipe.py --phase eval --from models/starter/model.safetensors --work W   # as shipped
    python benchmarks/teacher_recipe.py --phase eval          --work W --idle   # synth-idle: the cases told nothing
    python benchmarks/teacher_recipe.py --phase eval          --work W --teacher bidirectional   # sampled whole, in windows
    python benchmarks/teacher_recipe.py --phase clips         --work W --teacher bidirectional --cases 32
    python benchmarks/teacher_recipe.py --phase lipsync       --work W      # the sync loss's discriminator
    python benchmarks/teacher_recipe.py --phase distill       --work W --minutes 8.5 [--steps N] [--init-student DIR] [--ode-warmup N]
                                          [--pcm-weight P] [--sync-weight S] [--guidance G]   # 0, 0: pure DMD
    python benchmarks/teacher_recipe.py --phase distill --teacher bidirectional --init-student models/starter/model.safetensors \
        --work W --minutes 8.5          # stage 1 distilled straight into the warm student (whole-clip scores, no stage 2)
    python benchmarks/teacher_recipe.py --phase eval          --work W --teacher student --streams 4
    python benchmarks/teacher_recipe.py --phase starter       --work W --scores recipe_eval.json   # CPU: package it
    python benchmarks/teacher_recipe.py --phase bidirectional --preset small-voice --warm W0/bidirectional --work W
                                          # issue 19: a voice model seeded with a video teacher's tensors that fit
    python benchmarks/teacher_recipe.py --phase voice         --preset small-voice --work W   # its voice bench

`--work W` is the run folder a phase reads and adds to; each training phase also copies what it made to
$OUT (default: W/out) as bf16 EMA weights in files of at most 16 MiB (safetensors shards + an index when
a model is larger), with the codec, so that $OUT is the next GPU run's W (<= 64 MiB):

    W/codec.safetensors                          the autoencoder (phase autoencoder, or --codec)
    W/bidirectional/ema*.safetensors[.index.json] stage 1's EMA (phase bidirectional)
    W/causal/ema*.safetensors[.index.json]        stage 2's EMA (phase causal)
    W/student/ema*.safetensors[.index.json]       the distilled student's EMA (phase distill, `vidu distill`
                                                  of W/causal: DMD, its settings in RECIPES)
    W/runs/<stage>[-again-<seed>]/                training runs (optimizer state; resumed from latest
                                                  when a phase is run again on the same W, never carried)

What travels to a GPU run is the working tree and the carried paths, 64 MiB in all: the starter model
(models/starter/*.safetensors, 39 MiB) is moved out of the checkout for the run and back after it, and
W holds what the phase reads (a teacher, the codec: <= 41 MiB), never a teacher and a student together.
Files a phase leaves outside $OUT stay on the machine while it is held (it is given back after ~30 s
idle): the distill phase run again at once, without carrying W, resumes W/runs/distill with its
optimizer state (each run trains for the phase's minutes, up to the steps the first run set).

A training phase first times a few steps (a probe on a handful of clips: step time and clip rendering
cost), then fits the step count (cosine schedule) to what is left of --minutes after rendering every
clip up front in --workers processes; `minutes` of TrainSettings stops it on time regardless. Settings:
RECIPES below (one place; objective options go in ObjectiveSettings there). Text features come from the
committed table benchmarks/data/text_table.safetensors ($VIDU_TEXT_TABLE; `--write-text-table` rebuilds
it with MiniLM), so the GPU image needs no MiniLM.

The eval phase is `vidu eval --bench synth`'s cases and scores without its files: case i is
stages.synth.make_sample(HELD_OUT_BASE + i, split="eval") (held-out TTS voices and texts), its control
the speech of the bench's control seed; it is streamed through `vidu stream`'s session (the engine, the
checkpoint's codec, instructions typed between chunks, stages/eval/bench/runner.py; `--streams N` runs N
such streams at once, in processes sharing the GPU; the bidirectional teacher, which cannot stream, samples
each case whole in overlapping windows of its clip length with the case's per-frame texts and speech) and scored by
stages/eval/bench/synthscore.py (lip-sync r and its mismatched-audio control, instruction success,
latency and confusion, identity error, drift). Not here: the mp4 files and the catalog (PyAV and duckdb
are not on the GPU image) and score_frames' dlib numbers. Results go to $OUT/recipe_<phase>.json and a
short table is printed last. The clips phase (`clip_eval`) measures a teacher's lip sync without the
stream: held-out speaking clips at the training length sampled whole, against the codec's ceiling and
a shuffled-speech control. MFU counts 6 x parameters x tokens + attention against an H200's dense
bf16 peak.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoint import checkpoint_file, read_metadata, read_state_dict, save_safetensors  # noqa: E402
from models.config import NEUTRAL_TEXT, preset as get_preset  # noqa: E402
from models.dit import SELF_ATTENTION  # noqa: E402
from models.flow import add_noise, timestep  # noqa: E402
from stages.distill.dmd import DMDSettings  # noqa: E402
from stages.train.autoencoder import AutoencoderSettings  # noqa: E402
from stages.train.loop import TrainSettings, tokens_per_sample, train  # noqa: E402
from stages.train.objectives import ObjectiveSettings  # noqa: E402

PHASES = ("autoencoder", "lipsync", "bidirectional", "causal", "distill", "eval", "clips", "starter", "voice")
LIPSYNC = "lipsync.safetensors"
TEXT_TABLE = ROOT / "benchmarks" / "data" / "text_table.safetensors"
SHIP_LIMIT = 16 * 2 ** 20            # bytes per file coming back from a GPU run ($OUT)
H200_BF16_PEAK = 989e12              # dense bf16 FLOP/s of an H200 (SXM)
CODEC = "codec.safetensors"
POOL_START_S = 20.0                  # rendering processes' start-up before the first clip (see fitted_settings)
RENDER_SHARE = 0.5                   # the most of a training phase's time left after its probe that rendering may take
# wall time of rendering and coding a stage's clips on the GPU machine, in units of (one-thread clip time x
# clips / workers): session 26, 1024 stage-1 clips in 59 s on 15 workers; session 31, 1024 stage-2 clips of
# 8 s (0.60 s each on one thread) in ~230 s, the workers waiting on the one coding process; session 32, with the
# audio features computed by the workers, 1024 clips (0.50 s each) in 120 s: (120 - 20) / (1024 x 0.50 / 15) = 2.9;
# session 63, 4096 stage-1 clips (0.119 s each) in 117 s on 15 workers: (117 - 20) / (4096 x 0.119 / 15) = 3.0;
# beside training (session 66, H100): 4096 clips (0.139 s) in ~180 s, 4.2; small-voice 3584 (0.196 s) in ~180 s, 3.4;
# stage 2 beside training (session 68, H100): 1024 clips (0.556 s) in ~190 s, 5.0
RENDER_FACTOR = {"bidirectional": 3.8, "causal": 5.0}
# a training step beside the rendering / alone (session 65, H100, 15 rendering workers: 0.154 / ~0.081 s in
# stage 1, 0.120 / 0.079 s in stage 2; session 66: 0.156 / 0.075 s in stage 1; session 68: ~0.159 / 0.0756 s in
# stage 2, which planned at 1.5 and a render factor of 3.0 ran 1914 of 2869 steps): a phase plans its steps (the
# cosine schedule's length) at this pace while its clips render, so its deadline does not stop it before the
# schedule ends
OVERLAP_SLOWDOWN = {"bidirectional": 2.0, "causal": 2.2}


@dataclass(frozen=True)
class Recipe:
    """Everything a preset's recipe sets, per phase."""
    preset: str
    autoencoder: dict                # TrainSettings fields of the autoencoder stage
    bidirectional: dict              # ... of stage 1
    causal: dict                     # ... of stage 2 (init_from: stage 1's EMA)
    eval_cases: int                  # held-out synth cases (bench seeds HELD_OUT_BASE + i)
    eval_seconds: float              # seconds per case
    distill: dict = field(default_factory=dict)   # DistillSettings fields of stage 3 (init_from: stage 2's EMA)
    # ... added when the student starts warm (--init-student): the critic first learns the warm student's
    # samples alone (session 31: a warm student against a new teacher without it broke in 152 steps)
    distill_warm: dict = field(default_factory=lambda: dict(critic_warmup=50))
    stream: dict = field(default_factory=dict)   # StreamSettings fields for eval (None / absent: the checkpoint's)
    # the lip-sync discriminator (stages/train/lipsync.py): training clips, steps, batch (at 128 these clips
    # stay at chance: session 58, benchmarks/lipsync_fit.py), clip seconds, held-out clips, the held-out AUC
    # (matched vs shifted speech) it must reach before the teachers use it, and the sync loss weight they then use
    lipsync: dict = field(default_factory=lambda: dict(clips=256, steps=600, batch=512, seconds=4.0, eval_clips=64,
                                                         min_auc=0.7, weight=0.02))
    probe_steps: int = 12            # timed steps before a training phase (the last half are timed)
    reserve_s: float = 25.0          # phase time kept for the last checkpoint and shipping


RECIPES = {
    "small": Recipe(
        preset="small",
        autoencoder=dict(batch=8, lr=1e-3, ema=0.99, autoencoder=AutoencoderSettings(frames=33)),
        # clips are rendered and coded up front (one thread: ~0.25 s per 1.3-s clip, ~1 s per 8-s stage-2 clip)
        bidirectional=dict(batch=32, samples=4096, lr=1e-3, ema=0.995, compile=True),
        causal=dict(batch=32, samples=1024, lr=2e-4, ema=0.995, compile=True,
                    objective=ObjectiveSettings(p_teacher_forcing=0.5, chunk_frames=1, tau_max=0.5)),
        eval_cases=48, eval_seconds=8.0,
        # rollouts of 12 chunks (the window of 7 wraps); the real score guided on the text alone at the
        # teacher's streaming default (session 29: guidance on text and speech breaks the stream)
        # the critic (fake score) must keep up with the student: at 2x the student's lr and one update a step DMD
        # widens the gap on the CPU rehearsal (benchmarks/dmd_critic_pace.py, 1.47 -> 1.98) as the GPU students of
        # sessions 30-32 drifted; 5 updates (DMD2's two-time-scale rule) close it (0.92), 4x + 5: see RESULTS
        # not compiled: inductor failed on the distill step on an H100 (session 56), and eager ran 1.86 s a step there
        # (session 34, compiled, on an H200: 2.3 s); --compile asks for it
        distill=dict(batch=32, chunks=12, samples=256, steps=600, lr=5e-5, critic_lr=2e-4, critic_updates=5,
                     warmup=50, ema=0.99, dmd=DMDSettings(guidance=3.0, guide="text"), compile=False)),
    "tiny": Recipe(                   # the CPU rehearsal (tests/test_recipe.py)
        preset="tiny",
        autoencoder=dict(batch=2, lr=2e-3, ema=0.9, autoencoder=AutoencoderSettings(frames=5)),
        bidirectional=dict(batch=2, samples=4, lr=1e-3, ema=0.9),
        causal=dict(batch=2, samples=4, lr=1e-3, ema=0.9,
                    objective=ObjectiveSettings(p_teacher_forcing=0.5, chunk_frames=1, tau_max=0.5)),
        eval_cases=2, eval_seconds=1.0, stream=dict(steps=2), probe_steps=4, reserve_s=5.0,
        distill=dict(batch=1, chunks=3, samples=2, steps=4, lr=1e-4, critic_lr=1e-4, critic_updates=2, warmup=1, ema=0.9,
                     dmd=DMDSettings(guidance=3.0, guide="text")), distill_warm=dict(critic_warmup=1),
        lipsync=dict(clips=3, steps=5, batch=64, seconds=2.0, eval_clips=2, min_auc=0.0, weight=0.02)),
}

# the voice presets (issue 19): the same recipe on a model that hears speech content and says it in a character
# voice; their teachers are judged by --phase voice (the synth bench feeds waves, which a content model does not hear)
RECIPES["small-voice"] = dataclasses.replace(RECIPES["small"], preset="small-voice")
RECIPES["tiny-voice"] = dataclasses.replace(RECIPES["tiny"], preset="tiny-voice")
VOICE_CASES = 16

# -- shipping: bf16 files of at most SHIP_LIMIT bytes ------------------------------------------------

def ship(path: Path, dest: Path, name: str, limit: int = SHIP_LIMIT) -> list[Path]:
    """The safetensors checkpoint `path` (its metadata kept) as bf16 files dest/name.safetensors, or,
    when that is over `limit` bytes, shards dest/name-0000k-of-0000n.safetensors and their index
    dest/name.safetensors.index.json (each shard with the whole metadata: read_metadata reads the index
    as its first shard; `shipped` finds either). Returns the files written."""
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in read_state_dict(path).items()}
    meta = read_metadata(path)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob(f"{name}*.safetensors*"):
        old.unlink()
    groups, size = [[]], 0
    budget = limit - 64 * 1024 - len(json.dumps(meta))              # header: keys, shapes, metadata
    for k, v in sd.items():
        n = v.numel() * v.element_size() + 200
        if n > budget:
            raise ValueError(f"{k} alone is {n} bytes, over the {limit}-byte file limit")
        if size + n > budget:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    if len(groups) == 1:
        return [save_safetensors(dest / f"{name}.safetensors", sd, meta)]
    files, weight_map = [], {}
    for i, keys in enumerate(groups, 1):
        shard = f"{name}-{i:05d}-of-{len(groups):05d}.safetensors"
        files.append(save_safetensors(dest / shard, {k: sd[k] for k in keys}, meta))
        weight_map.update({k: shard for k in keys})
    index = dest / f"{name}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": sum(f.stat().st_size for f in files)},
                                 "weight_map": weight_map}, indent=1))
    return files + [index]


def shipped(dest: Path, name: str) -> Path:
    """The checkpoint a phase shipped to dest: dest/name.safetensors, or its shards' index (every loader
    reads either: load_dit, load_taehv, --from, `vidu stream --ckpt`)."""
    for path in (dest / f"{name}.safetensors.index.json", dest / f"{name}.safetensors"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{dest / name}.safetensors (or its shards' index) is missing: run the phase before, "
                            f"or carry its $OUT")


# -- training phases -----------------------------------------------------------------------------

def stage_settings(recipe: Recipe, stage: str, work: Path, steps: int, minutes: float | None,
                   again: bool = False, recode: bool = False) -> TrainSettings:
    """A training stage's settings; `again`: start from the stage's own shipped EMA (W/<stage>), a further
    run with a fresh optimizer and schedule (training continued across GPU sessions); `recode`: that EMA
    was trained with another codec than W's (TrainSettings.recode)."""
    kw = dict(getattr(recipe, stage))
    kw.update(stage=stage, preset=recipe.preset, steps=steps, minutes=minutes, save_every=max(1, steps // 4),
              warmup=min(100, steps // 10))
    if stage == "bidirectional" or again:
        kw["codec"] = str(work / CODEC)
    if again:
        kw["init_from"] = str(shipped(work / stage, "ema"))
        kw["seed"] = fresh_seed(kw["init_from"], stage)
        kw["recode"] = recode
    elif stage == "causal":
        kw["init_from"] = str(shipped(work / "bidirectional", "ema"))
    if stage != "autoencoder" and usable_lipsync(recipe, work):
        kw["objective"] = dataclasses.replace(kw.get("objective", ObjectiveSettings()),
                                              sync_weight=recipe.lipsync["weight"], lipsync=str(work / LIPSYNC))
    return TrainSettings(**kw)


def with_objective(recipe: Recipe, **kw) -> Recipe:
    """The recipe with its teacher stages' ObjectiveSettings changed by `kw` (--eyes-weight, --ref-pose)."""
    return dataclasses.replace(recipe, **{s: {**getattr(recipe, s), "objective": dataclasses.replace(
        getattr(recipe, s).get("objective", ObjectiveSettings()), **kw)} for s in ("bidirectional", "causal")})


def fresh_seed(init_from: str, stage: str) -> int:
    """The data seed of a further run of `stage` (--again): one past the highest seed its runs in the
    checkpoint's lineage rendered clips from ("synth:<n>@<seed>"), so each continuation sees new clips."""
    used = [int(r["data"].rsplit("@", 1)[1]) for r in read_metadata(init_from).get("lineage", [])
            if r.get("stage") == stage and str(r.get("data", "")).startswith("synth:")]
    return max(used, default=-1) + 1


def usable_lipsync(recipe: Recipe, work: Path) -> bool:
    """W/lipsync.safetensors exists and passed its held-out check (the teachers then add the sync loss)."""
    path = work / LIPSYNC
    if not path.is_file():
        return False
    return (read_metadata(path).get("eval") or {}).get("auc_shifted", 0.0) >= recipe.lipsync["min_auc"]


def lipsync_phase(recipe: Recipe, work: Path, out: Path, workers: int) -> dict:
    """Train the lip-sync discriminator on world clips through the run's codec, check it on held-out
    clips (eval-split voices), and leave it as W/lipsync.safetensors (and in $OUT) with its scores."""
    from models.checkpoint import load_taehv
    from stages.train.lipsync import LipSyncConfig, evaluate, fit, prepare_clips, save_lipsync
    t0 = time.perf_counter()
    p, cfg = recipe.lipsync, get_preset(recipe.preset)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    codec = load_taehv(work / CODEC, dev)
    train_clips = prepare_clips(cfg, codec, p["clips"], seed=11, seconds=p["seconds"], split="train", workers=workers)
    held = prepare_clips(cfg, codec, p["eval_clips"], seed=12, seconds=p["seconds"], split="eval", workers=workers)
    t1 = time.perf_counter()
    model = fit(train_clips, LipSyncConfig.for_model(cfg), p["steps"], p["batch"], device=dev)
    t2 = time.perf_counter()
    ev = {"held_out": evaluate(model, held), "train": evaluate(model, train_clips)}
    path = save_lipsync(work / LIPSYNC, model.cpu().to(torch.bfloat16), {"eval": ev["held_out"]})   # shipped as bf16
    shutil.copy(path, out / LIPSYNC)
    return {"phase": "lipsync", "settings": p, "render_s": t1 - t0, "fit_s": t2 - t1, "eval": ev,
            "used_by_teachers": usable_lipsync(recipe, work), "shipped": {LIPSYNC: path.stat().st_size}}


def run_name(stage: str, work: Path, again: bool) -> str:
    """W/runs/<name>: a stage's run, or its further run from the shipped EMA (--again), named by that
    run's data seed: a re-run of an interrupted phase resumes it, and the next phase (W/<stage> now the
    EMA the last one shipped, its lineage one seed longer) starts its own run."""
    return f"{stage}-again-{fresh_seed(str(shipped(work / stage, 'ema')), stage)}" if again else stage


def probe(recipe: Recipe, stage: str, work: Path, workers: int, again: bool = False, recode: bool = False) -> dict:
    """Seconds per step (the median of the probe's last half) and per rendered clip (x workers), from a
    short run on a few clips."""
    st = stage_settings(recipe, stage, work, recipe.probe_steps, None, again, recode)
    n = min(st.samples, 2 * st.batch)
    st = dataclasses.replace(st, samples=n, save_every=10 ** 6)
    out = work / "runs" / f"probe-{stage}"
    shutil.rmtree(out, ignore_errors=True)
    marks, t0 = [], time.perf_counter()
    train(st, out, progress=lambda logged: marks.append(time.perf_counter()), prefetch=workers)
    shutil.rmtree(out, ignore_errors=True)
    half = recipe.probe_steps // 2      # the median step of the last half: one slow step (a recompile, a stall) in
    step_s = float(np.median(np.diff(marks[half - 1:])))   # 6 made the mean 2-4x the phase's pace (session 65)
    render_s = 0.0
    if stage != "autoencoder":      # one clip rendered here on one thread, as a rendering worker does
        from stages.train.data import ClipSource
        cfg = get_preset(recipe.preset)
        if stage == "causal":
            cfg = cfg.replace(latent_frames=st.objective.clip_frames)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        source = ClipSource(cfg, st.seed + 1, 5, masks=True)
        source(0)                       # the first clip pays one-time costs (TTS library, caches): not timed
        t1 = time.perf_counter()
        for i in range(1, 5):
            source(i)
        render_s = (time.perf_counter() - t1) / 4
        torch.set_num_threads(threads)
    return {"step_s": step_s, "clip_render_s": render_s, "probe_s": time.perf_counter() - t0}


def fitted_settings(recipe: Recipe, stage: str, work: Path, minutes: float, workers: int, t_phase: float,
                    steps: int | None = None, again: bool = False, recode: bool = False) -> tuple:
    """The run's settings: those it was started with (W/runs/<run>/recipe.json: a re-run resumes it),
    else `steps` (stopped after `minutes` of training; every clip rendered first), else steps fitted to the
    phase time left after the probe, training beside the rendering."""
    saved = work / "runs" / run_name(stage, work, again) / "recipe.json"
    if saved.is_file():
        rec = json.loads(saved.read_text())
        st = stage_settings(recipe, stage, work, rec["steps"], rec["train_minutes"], again, recode)
        st = dataclasses.replace(st, render_overlap=rec.get("render_overlap", 0))
        return (dataclasses.replace(st, samples=rec["samples"]) if rec.get("samples") else st), rec
    if steps:
        rec = {"steps": steps, "train_minutes": minutes}
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(rec, indent=1))
        return stage_settings(recipe, stage, work, steps, minutes, again, recode), rec
    timing = probe(recipe, stage, work, workers, again, recode)
    st = stage_settings(recipe, stage, work, 1, None, again, recode)
    # the workers start (imports, TTS) and share the machine with coding on the GPU: POOL_START_S plus the
    # measured one-thread clip time x RENDER_FACTOR; the phase's deadline stops training however long it takes
    # a phase too short to render every clip in RENDER_SHARE of what is left renders fewer (session 61's
    # 3.5-minute stage 1 rendered its 4096 clips for 136 s and, rendering first then, trained one step)
    # training starts once the pool is up and a batch is coded, and runs beside the rest of the rendering
    # (TrainSettings.render_overlap: a clip joins the draws every batch x per_clip / step_s samples, the pace
    # the workers keep, so the loop seldom waits; session 63's phases idled the GPU a third of their time)
    samples, render, overlap = st.samples, 0.0, 0
    if stage != "autoencoder":
        per_clip = RENDER_FACTOR[stage] * timing["clip_render_s"] / max(1, workers)
        room = minutes * 60 - (time.perf_counter() - t_phase) - recipe.reserve_s - POOL_START_S
        samples = max(st.batch, min(st.samples, int(RENDER_SHARE * room / per_clip)))
        render = POOL_START_S + samples * per_clip
        overlap = max(1, math.ceil(st.batch * per_clip / timing["step_s"]))
    left = minutes * 60 - (time.perf_counter() - t_phase) - (POOL_START_S if render else 0.0) - recipe.reserve_s
    if left < 10 * timing["step_s"]:
        raise SystemExit(f"--minutes {minutes:g} leaves {left:.0f} s of training after the probe")
    beside = min(left, render - POOL_START_S) if render else 0.0      # training while the clips render
    steps = beside / (timing["step_s"] * OVERLAP_SLOWDOWN.get(stage, 1.0)) + (left - beside) / timing["step_s"]
    rec = {**timing, "render_estimate_s": render, "render_overlap": overlap, "train_minutes": left / 60,
           "steps": max(10, int(steps)), **({"samples": samples} if samples != st.samples else {})}
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(rec, indent=1))
    st = stage_settings(recipe, stage, work, rec["steps"], rec["train_minutes"], again, recode)
    return dataclasses.replace(st, samples=samples, render_overlap=overlap), rec


def flops_per_sample(cfg) -> float:
    """Training FLOPs of one clip: 6 x (self-attention, text / speech cross-attention and FFN weights)
    x tokens + attention scores (4 L^2 dim per layer forward, x3). Stage 2's sequences have the same
    length (objectives.training_frames: ref + sink + window + chunk = 1 + latent_frames)."""
    d = cfg.dit
    L = tokens_per_sample(cfg)
    per_block = 4 * d.dim * d.dim * 2 + 2 * d.dim * d.ffn_dim + (4 * d.dim * d.dim if d.audio_dim else 0)
    return float(6 * L * per_block * d.num_layers + 3 * 4 * L * L * d.dim * d.num_layers)


def ship_ema(ckpt: Path, work: Path, out: Path, name: str) -> list:
    """A run's EMA (ckpt/ema.safetensors) shipped as W/name/ema* and copied to $OUT/name/ with the codec:
    $OUT is the whole next work folder. Returns the files in $OUT."""
    shipped = ship(ckpt / "ema.safetensors", work / name, "ema")
    (out / name).mkdir(parents=True, exist_ok=True)
    return [*(shutil.copy(f, out / name / f.name) for f in shipped), shutil.copy(work / CODEC, out / CODEC)]


def train_phase(recipe: Recipe, stage: str, work: Path, out: Path, minutes: float, workers: int, t_phase: float,
                steps: int | None = None, again: bool = False, recode: bool = False) -> dict:
    if again and stage == "autoencoder":
        raise SystemExit("--again continues a teacher stage (bidirectional or causal)")
    st, fit = fitted_settings(recipe, stage, work, minutes, workers, t_phase, steps, again, recode)
    run = work / "runs" / run_name(stage, work, again)
    t0 = time.perf_counter()
    summary = train(st, run, prefetch=workers, deadline=t_phase + minutes * 60 - recipe.reserve_s,
                    progress=lambda h: h["step"] % 200 or print(f"{stage} step {h['step']}: loss {h['loss']:.4f} at "
                                                                 f"{time.perf_counter() - t_phase:.0f} s of the phase", flush=True))
    summary["wall_s"] = time.perf_counter() - t0
    ckpt = Path(summary["checkpoint"])
    history = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    tail = history[-max(1, len(history) // 10):]
    res = {"phase": stage, "again": again, "settings": st.to_dict(), "fit": fit, "train": summary,
           "loss_first": history[0]["loss"], "loss_last_10pct": float(np.mean([h["loss"] for h in tail])),
           "loss_curve": [(h["step"], round(h["loss"], 5)) for h in history[:: max(1, len(history) // 50)]]}
    if stage == "autoencoder":
        files = [shutil.copy(f, out / f.name) for f in ship(ckpt / "ema.safetensors", work, "codec")]
    else:
        cfg = get_preset(recipe.preset)
        res["flops_per_sample"] = flops_per_sample(cfg)
        res["mfu"] = summary["samples_per_s"] * res["flops_per_sample"] / H200_BF16_PEAK
        files = ship_ema(ckpt, work, out, stage)
    shutil.copy(run / "loss.png", out / f"loss_{stage}.png")
    res["shipped"] = {str(Path(f).relative_to(out)): Path(f).stat().st_size for f in files}
    return res


DISTILL_CLIP_S = 2.4         # one worker's time per distill clip (sessions 58-59: 256 clips on 15 workers in ~60 s)
DISTILL_STEP_S = 2.5         # a distill step of the recipe's (batch 32, 12 chunks), eager, on an H100 (session 58; PCM 80: 3.6)


def distill_fit(recipe: Recipe, minutes: float, t_phase: float, steps: int | None, workers: int) -> dict:
    """The distill phase's plan: its steps, its training minutes and its render overlap. The rollouts start
    once a batch of clips is coded and the rest render beside them (DistillSettings.render_overlap: a clip
    joins the draws every batch x per-clip time / step time samples), so only the first batch's rendering
    comes off the phase's time."""
    d, per_clip = recipe.distill, DISTILL_CLIP_S / max(1, workers)
    first = POOL_START_S + min(d["samples"], d["batch"]) * per_clip
    left = minutes * 60 - (time.perf_counter() - t_phase) - first - recipe.reserve_s
    if left < 30:
        raise SystemExit(f"--minutes {minutes:g} leaves {left:.0f} s of distillation")
    return {"steps": steps or d["steps"], "train_minutes": left / 60,
            "render_overlap": max(1, math.ceil(d["batch"] * per_clip / DISTILL_STEP_S))}


def distill_phase(recipe: Recipe, work: Path, out: Path, minutes: float, workers: int, t_phase: float,
                  steps: int | None = None, init_student: Path | None = None, ode_warmup: int = 0,
                  pcm_weight: float = 0.0, sync_weight: float = 0.0, guidance: float | None = None,
                  compile: bool | None = None, recache: bool = False, teacher: str = "causal") -> dict:
    """Stage 3: `vidu distill` of W/<teacher> (stages/distill/loop.py: DMD on the student's self-rollouts;
    W/causal, or W/bidirectional by whole-clip scores, which needs `init_student`)
    with RECIPES' settings for `steps` (default the recipe's), stopped after what is left of `minutes`;
    a re-run on the same W resumes it (W/runs/distill/recipe.json). `init_student`: a folder holding a
    previous student's shipped EMA (ema*.safetensors) or a student's file (the shipped starter), the warm start; `ode_warmup`: its first steps
    regress the teacher's ODE (stages/distill/ode.py); `pcm_weight`, `sync_weight`: the PCM regularizer's
    and the sync reward's weights (0, 0: pure DMD); `guidance`: the real score's (default the recipe's);
    `recache`: roll out with LongLive's recache (the student streams with it). With
    W/lipsync.safetensors (the lipsync phase) the sync loss is measured at any weight (loss_sync); the
    reward needs it past the recipe's held-out bar. Ships W/student."""
    from stages.distill.loop import DistillSettings, distill_run
    if sync_weight > 0 and not usable_lipsync(recipe, work):    # a discriminator at chance rewards nothing (session 57)
        raise SystemExit(f"--sync-weight needs a lip-sync discriminator that passed its held-out check (AUC >= "
                         f"{recipe.lipsync['min_auc']}), and {work / LIPSYNC} is missing or below it: run --phase lipsync first")
    saved = work / "runs" / "distill" / "recipe.json"
    if saved.is_file():
        rec = json.loads(saved.read_text())
    else:
        rec = distill_fit(recipe, minutes, t_phase, steps, workers)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(rec, indent=1))
    kw = {**recipe.distill, "steps": rec["steps"], "minutes": rec["train_minutes"],
          "render_overlap": rec.get("render_overlap", 0),       # a run planned before the overlap resumes without
          "save_every": max(1, rec["steps"] // 4), "init_from": str(shipped(work / teacher, "ema")),
          **({"init_student": str(checkpoint_file(init_student)),
              **recipe.distill_warm} if init_student else {}),
          **({"ode_warmup": ode_warmup} if ode_warmup else {}), "pcm_weight": pcm_weight, "sync_weight": sync_weight,
          "recache": recache}
    if guidance is not None:
        kw["dmd"] = dataclasses.replace(kw["dmd"], guidance=guidance)
    if compile is not None:
        kw["compile"] = compile
    if (work / LIPSYNC).is_file():
        kw["lipsync"] = str(work / LIPSYNC)
    st = DistillSettings(**kw)
    run = work / "runs" / "distill"
    t0 = time.perf_counter()
    summary = distill_run(st, run, prefetch=workers, deadline=t_phase + minutes * 60 - recipe.reserve_s, progress=lambda h: h["step"] % 50 or print(
        f"distill step {h['step']}: loss {h['loss']:.4f} critic {h['loss_critic']:.4f} at "
        f"{time.perf_counter() - t0:.0f} s", flush=True))
    summary["wall_s"] = time.perf_counter() - t0
    ckpt = Path(summary["checkpoint"])
    history = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    tail = history[-max(1, len(history) // 10):]
    keys = list(dict.fromkeys(k for h in history for k in h if k.startswith(("loss", "gnorm"))))   # ODE warm-up rows differ
    res = {"phase": "distill", "settings": st.to_dict(), "fit": rec, "train": summary,
           "lipsync_eval": read_metadata(work / LIPSYNC).get("eval") if st.lipsync else None,
           "loss_first": {k: next(h[k] for h in history if k in h) for k in keys},
           "loss_last_10pct": {k: float(np.mean([h[k] for h in tail if k in h])) for k in keys
                               if any(k in h for h in tail)},
           "loss_curve": [{k: round(h[k], 5) for k in ("step", *keys) if k in h}
                          for h in history[:: max(1, len(history) // 50)]]}
    files = ship_ema(ckpt, work, out, "student")
    shutil.copy(run / "loss.png", out / "loss_distill.png")
    res["shipped"] = {str(Path(f).relative_to(out)): Path(f).stat().st_size for f in files}
    return res


def voice_phase(recipe: Recipe, work: Path, out: Path, teacher: str, cases: int | None, seconds: float | None,
                steps: int | None, guidance: float | None, guide: str | None) -> dict:
    """Issue 19's voice bench (stages/eval/bench/voice.py) on W/<teacher>, a voice preset's stage 1 sampled
    whole, or its stage 2 / student streamed: VOICE_CASES held-out clips of the recipe's eval length (at least whole sentences), each
    driven by one character voice and told another; sampling as the checkpoint records unless asked. The
    waves go to OUT/voice_waves.npz, scored here when the scorers are installed (the GPU image lacks them:
    then `python benchmarks/voice_bench.py --score voice_waves.npz` on the dev machine)."""
    from stages.eval.bench.voice import generate, save_waves, scored, scorers_missing
    from stages.synth.dataset import SPEECH_MIN_S
    t0 = time.perf_counter()
    res = generate(shipped(work / teacher, "ema"), work / CODEC, cases or VOICE_CASES,
                   seconds or max(SPEECH_MIN_S, recipe.eval_seconds), steps, guidance, guide)
    save_waves(out / "voice_waves.npz", res)
    missing = scorers_missing()
    res = {k: v for k, v in res.items() if k not in ("waves", "mouths")} if missing else scored(res)
    return {"phase": "voice", "teacher": teacher, **res, "scorers_missing": missing,
            "eval_s": time.perf_counter() - t0}


def starter_phase(work: Path, scores: Path, dest: Path | None = None) -> dict:
    """The shipped starter model (models/starter): the checkpoint the eval phase scored (`scores`: its
    recipe_eval.json; W/student, or a causal teacher W/causal with a few-step sampler, issue 16) as one
    bf16 file beside W's codec, its sampling record set to the stream settings that eval used (its
    overrides, e.g. --stream-steps 3, resolved as `vidu stream` resolves them) and pointing at the codec
    file beside it, its lineage (recipe, commit) and the eval's summary in its metadata ("starter").
    Refuses scores of another phase, of a model outside W (an eval --from a file), and files over the
    size limit."""
    import subprocess
    from models import starter
    from models.config import ModelConfig
    from stages.stream.engine import StreamSettings
    dest = dest or starter.HERE
    ev = json.loads(Path(scores).read_text())
    folder = ev.get("teacher")
    if ev.get("phase") != "eval" or folder not in ("student", "causal"):
        raise SystemExit(f"{scores} is not an eval of the student or the causal teacher (--phase eval)")
    if ev.get("bench", "synth") != "synth":
        raise SystemExit(f"{scores} scored {ev['bench']}'s untold cases: ship from the synth bench's eval")
    if Path(ev["checkpoint"]).parent.name != folder:          # an eval --from another file: not W's model
        raise SystemExit(f"{scores} scored {ev['checkpoint']}, not the work folder's {folder}")
    model = shipped(work / folder, "ema")
    meta = read_metadata(model)
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in read_state_dict(model).items()}
    given = {k: v for k, v in (ev.get("stream") or {}).items() if k in meta["sampling"]}
    st = StreamSettings.resolve(ModelConfig.from_dict(meta["config"]), meta["sampling"], **given)
    sampling = {**meta["sampling"], **{k: getattr(st, k) for k in ("steps", "noisy_step", "twin", "sampler",
                                                                   "guidance", "guide")}}
    meta["sampling"] = {**sampling, "codec": {**sampling["codec"], "file": starter.CODEC.name}}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    s = ev["summary"]
    kind = "distilled student" if folder == "student" else "causal teacher"
    guided = f", guidance {st.guidance:g} on the {st.guide}" if st.guidance != 1 else ""
    meta["starter"] = {"model": f"{kind}, {st.steps} steps{guided}", "recipe": "benchmarks/teacher_recipe.py",
                       "commit": commit or None, "lineage": meta.get("lineage"),
                       "eval": {"cases": ev["cases"], "seconds": ev["seconds"], "device": ev["device"]},
                       "scores": {k: s[k] for k in ("mouth_r", "mouth_abs_r_control", "instr_success", "instr_events",
                                                    "latency_s_p50", "latency_s_p90", "spurious_per_min",
                                                    "identity_error", "truth_identity_error")}}
    dest.mkdir(parents=True, exist_ok=True)
    save_safetensors(dest / starter.MODEL.name, sd, meta)
    shutil.copyfile(work / CODEC, dest / starter.CODEC.name)
    size = sum((dest / f).stat().st_size for f in (starter.MODEL.name, starter.CODEC.name))
    if size > starter.SIZE_LIMIT:
        raise SystemExit(f"the starter is {size / 2 ** 20:.1f} MiB, over {starter.SIZE_LIMIT / 2 ** 20:.0f} MiB")
    return {"phase": "starter", "dest": str(dest), "bytes": size, "starter": meta["starter"]}


# -- eval: the synth bench's cases and scores, in memory ----------------------------------------------

def _case(i: int, seconds: float, size: int, tmp: str, idle: bool = False) -> dict:
    """Synth bench case i as BenchSamples writes it (stages/eval/bench/cases.py; `idle`: synth-idle's, the
    case untold): the ground truth as tmp/truth<i>.json, the rest in memory."""
    from stages import synth
    from stages.eval.bench.cases import CONTROL_BASE, FPS, _with_speech, synth_case
    s = synth_case(i, size, seconds, idle)
    control_seed, control_mouth = _with_speech(CONTROL_BASE, i, s.frames.shape[0] / FPS)
    truth = s.truth()
    truth["control_mouth"] = control_mouth
    path = Path(tmp) / f"truth{i}.json"
    path.write_text(json.dumps(truth))
    return {"index": i, "seed": s.seed, "control_seed": control_seed, "frames": s.frames, "audio": s.audio,
            "ref": synth.render(s.identity, synth.State(), size, size, s.scene), "truth": str(path),
            "events": [list(a) for a in s.actions], "voice": s.said.source if s.said else ""}


def stream_case(bench, case: dict, tmp: Path) -> tuple[np.ndarray, dict]:
    """Frames [T, H, W, 3] of `case` streamed by the bench's system (EvalBench's parts and typist)."""
    from PIL import Image
    from stages.eval.bench.runner import _Collect, _Typist
    from stages.stream.events import AudioChunk, AudioEnd, EventQueue
    from stages.stream.session import SessionOptions, run_session
    image = tmp / f"ref{case['index']}.png"
    Image.fromarray(case["ref"]).save(image)
    parts = bench._parts(str(image))
    events = EventQueue()
    timed = [(float(a), float(b), str(t)) for a, b, t in case["events"]]
    typist = _Typist(events, timed, parts.cfg.audio.fps, NEUTRAL_TEXT)
    typist.push_due(0)
    events.put(AudioChunk(case["audio"]))
    events.put(AudioEnd())
    collect = _Collect()
    summary = run_session(parts, events, [collect], SessionOptions(), live=typist)
    return np.concatenate(collect.frames), {"stream_fps": summary.get("fps"), "first_chunk_s": summary.get("first_chunk_s")}


def _score(frames: np.ndarray, truth: str, workers: int = 1) -> dict:
    """The bench's numbers of one case (runner._synth_numbers: frames scaled to the truth's size),
    measured in `workers` processes."""
    from stages.eval.bench.runner import _synth_numbers
    s = _synth_numbers(frames, 25.0, truth, workers)
    return {**s, **{k: json.loads(s[k]) for k in ("confusion", "drift_ratios", "instr_classes", "instr_blockers")}}


def strip(truth: np.ndarray, frames: np.ndarray, path: Path, every: int = 25, most: int = 12) -> None:
    """Ground truth over generated, one frame a second (at most `most` frames, evenly spaced over a
    longer stream), as a PNG (the contact sheet)."""
    import cv2
    from PIL import Image
    H, W = truth.shape[1:3]
    n = min(len(truth), len(frames))
    pick = np.arange(0, n, every) if n <= every * most else np.linspace(0, n - 1, most).astype(int)
    gen = [cv2.resize(frames[i], (W, H), interpolation=cv2.INTER_LINEAR) for i in pick]
    rows = [np.concatenate([truth[i] for i in pick], 1), np.concatenate(gen, 1)]
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def _eval_shard(ckpt: str, preset: str, dev: str, stream: dict, indices: list[int], secs: float, size: int,
                out: str, workers: int = 1, idle: bool = False) -> list[dict]:
    """Stream and score the cases `indices` (one process: its own model, its cases rendered and scored
    here, in `workers` processes); contact sheets for cases 0 and 1."""
    import tempfile
    from stages.eval.bench.runner import EvalBench
    bench = EvalBench(bench="synth", system=ckpt, preset=preset, device=dev, **stream)
    bench.setup()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in indices:
            case = _case(i, secs, size, tmp, idle)
            t1 = time.perf_counter()
            frames, speed = stream_case(bench, case, Path(tmp))
            speed["stream_s"] = time.perf_counter() - t1
            truth_frames = case.pop("frames")
            if i < 2:
                strip(truth_frames, frames, Path(out) / f"eval_case{i}.png")
            info = {k: case[k] for k in ("index", "seed", "control_seed", "voice", "events")}
            rows.append({**info, **speed, **_score(frames, case["truth"], workers),
                         "truth": _score(truth_frames, case["truth"], workers)})
    return rows


def _paced(t0: float):
    """A progress callback for one long case's windows: a line at every tenth of them (the drift case's
    sampling, told as it goes, so a run stopped by its time limit says how far it got and at what pace)."""
    def told(done: int, total: int) -> None:
        if done == total or done * 10 // total != (done - 1) * 10 // total:
            took = time.perf_counter() - t0
            print(f"  window {done} of {total} at {took:.0f} s ({took / done:.2f} s a window)", flush=True)
    return told


def _sampler(ckpt: Path, codec_path: Path, dev: str, stream: dict):
    """(make, how): a bidirectional teacher's frames of a group of cases sampled whole (stages/train/sample.py
    `sample_clips`: each case's latent frames with the texts in force and its speech, in overlapping windows of the
    model's clip length; steps, guidance and its target from `stream` or the checkpoint's record)."""
    from models.checkpoint import checkpoint_sampling, load_dit, load_taehv
    from models.encoders import text_encoder
    from stages.train.sample import sample_clips, whole_settings
    model, cfg = load_dit(ckpt, device=dev)
    model.eval()
    if stream.get("compile") and dev == "cuda":       # one window shape: a batch-1 long case is bound by launches
        model.compile_blocks(dynamic=False)
    how = whole_settings(checkpoint_sampling(ckpt), stream.get("steps"), stream.get("guidance"), stream.get("guide"))
    codec = load_taehv(codec_path, dev)
    encode = text_encoder("minilm", max_len=cfg.dit.text_len)

    def make(group: list[dict], T: int, seed: int, progress) -> list[np.ndarray]:
        return sample_clips(model, cfg, codec, encode, [c["ref"] for c in group], [c["audio"] for c in group],
                            [c["events"] for c in group], T, **how, seed=seed, progress=progress)
    return make, {**how, "sampled": "whole, in windows"}


def through_codec(codec, frames: np.ndarray) -> np.ndarray:
    """Frames [T, H, W, 3] uint8 (T = 1 + 4k) encoded and decoded by `codec` (TAEHV), as the model's frames
    are decoded (stages/train/sample.py `decode_video`)."""
    from models.taehv import frames_to_latents
    from stages.train.sample import decode_video
    with torch.no_grad():
        z = frames_to_latents(codec, frames)[None].to(next(codec.parameters()).device)
        return decode_video(codec, z, len(frames))


CODEC_CASE_MAX_S = 30.0   # through_codec encodes a case in one piece: 751 frames at 256x256 (0.6 GB as float)


def _codec_maker(codec_path: Path, dev: str):
    """(make, how): the cases' own ground-truth frames through the codec (`through_codec`): what a model that
    drew the world exactly in the codec's latents would score, the ceiling the codec leaves each bench number."""
    from models.checkpoint import load_taehv
    codec = load_taehv(codec_path, dev)

    def make(group: list[dict], T: int, seed: int, progress) -> list[np.ndarray]:
        return [through_codec(codec, c["frames"]) for c in group]
    return make, {"sampled": "the ground truth through the codec"}


def _whole_rows(make, how: dict, dev: str, n: int, secs: float, size: int, out: Path, workers: int,
                idle: bool) -> tuple[list[dict], dict]:
    """The synth bench's cases made whole by `make` (`_sampler`'s or `_codec_maker`'s), not streamed, scored as
    the streamed cases are. Cases of one length are made together; rendering and scoring run in `workers`
    processes, the ground truth's scored while the device works."""
    import multiprocessing as mp
    import tempfile
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
    batch = 16 if dev == "cuda" else 2
    rows, gen_s, gen_frames = [], 0.0, 0
    pool = ProcessPoolExecutor(max(1, workers), mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                               initargs=(1,))
    with pool, ThreadPoolExecutor(1) as aside, tempfile.TemporaryDirectory() as tmp:
        for a in range(0, n, batch):
            tr = time.perf_counter()
            group = list(pool.map(_case, range(a, min(n, a + batch)), [secs] * batch, [size] * batch, [tmp] * batch,
                                  [idle] * batch))
            T = len(group[0]["frames"])
            if any(len(c["frames"]) != T for c in group):
                raise ValueError("the cases of one batch differ in length")
            t0 = time.perf_counter()
            # the truth is scored on the CPU while the device samples; one long case (the drift clip,
            # --cases 1 --seconds 600) has its frames spread over the workers, from a thread here
            truths = ([aside.submit(_score, group[0]["frames"], group[0]["truth"], workers)] if n == 1 else
                      [pool.submit(_score, c["frames"], c["truth"]) for c in group])
            made = make(group, T, a, _paced(t0) if n == 1 else None)
            t1 = time.perf_counter()
            gen_s += t1 - t0
            gen_frames += T * len(group)
            mine = ([_score(made[0], group[0]["truth"], workers)] if n == 1 else
                    [j.result() for j in [pool.submit(_score, f, c["truth"]) for f, c in zip(made, group)]])
            scores = list(zip(mine, [j.result() for j in truths]))
            print(f"  cases {a}-{a + len(group) - 1} ({T} frames each): rendered {t0 - tr:.0f} s, sampled and decoded "
                  f"{t1 - t0:.0f} s, scored {time.perf_counter() - t1:.0f} s more", flush=True)
            for f, c, (mine, truth) in zip(made, group, scores):
                if c["index"] < 2:
                    strip(c["frames"], f, out / f"eval_case{c['index']}.png")
                info = {k: c[k] for k in ("index", "seed", "control_seed", "voice", "events")}
                rows.append({**info, "stream_fps": None, **mine, "truth": truth})
    return rows, {**how, "gen_fps": gen_frames / gen_s if gen_s else None}


def eval_phase(recipe: Recipe, work: Path, out: Path, teacher: str, streams: int, cases: int | None,
               seconds: float | None, overrides: dict | None = None, workers: int = 1,
               ckpt: Path | None = None, idle: bool = False) -> dict:
    """Stream and score the held-out cases (`idle`, --idle: synth-idle's, the cases untold, on which every
    detected action is unprompted) with the `teacher` checkpoint in W (or `ckpt`, --from: a
    checkpoint with its codec beside it, e.g. models/starter/model.safetensors), in `streams` processes
    that share the device (case i goes to process i mod streams; each renders, streams and scores its
    own: one stream of this small model leaves the GPU mostly idle), or here when streams <= 1 (then
    scored in `workers` processes: the drift stream, `--cases 1 --seconds 600`). `teacher` "codec": no model, the
    cases' ground truth through W's codec (`_codec_maker`: the ceiling it leaves each number)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from stages.eval.bench.cases import IDLE_BENCH, BenchSamples
    n, secs, size = cases or recipe.eval_cases, seconds or recipe.eval_seconds, BenchSamples.size
    given = ckpt
    ckpt = work / CODEC if teacher == "codec" else ckpt or shipped(work / teacher, "ema")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    stream = {**recipe.stream, **(overrides or {})}
    t0 = time.perf_counter()
    k = max(1, min(streams, n))
    shards = [list(range(j, n, k)) for j in range(k)]
    args = (str(ckpt), recipe.preset, dev, stream)
    whole = None
    if teacher in ("bidirectional", "codec") and given is None:      # no stream: the cases made whole
        make, how = _codec_maker(ckpt, dev) if teacher == "codec" else _sampler(ckpt, work / CODEC, dev, stream)
        rows, whole = _whole_rows(make, how, dev, n, secs, size, out, max(1, workers), idle)
    elif k == 1:
        rows = _eval_shard(*args, shards[0], secs, size, str(out), max(1, workers), idle)
    else:
        with ProcessPoolExecutor(k, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(1,)) as pool:
            parts = [pool.submit(_eval_shard, *args, shard, secs, size, str(out), 1, idle) for shard in shards]
            rows = [r for p in parts for r in p.result()]
    rows.sort(key=lambda r: r["index"])
    return {"phase": "eval", "teacher": teacher, "checkpoint": str(ckpt), "from": given is not None,
            "bench": IDLE_BENCH if idle else "synth",
            "cases": n, "seconds": secs, "device": dev,
            "streams": 0 if whole else k, "stream": stream, "whole": whole, "eval_s": time.perf_counter() - t0,
            "summary": summarise(rows), "rows": rows}


# -- clips: the teachers' lip sync at the training clip length, without streaming --------------------

CLIP_VARIANTS = ("guided", "unguided", "shuffled", "codec")
# the instructed probe: every clip again with one instruction (class i % 8) at PROBE_ONSET, sampled with
# its texts (guidance 1, the teacher's, and PROBE_TEXT_GUIDANCE on the text alone: the speech kept in the
# unconditional pass), with the neutral text instead (the same noise and speech: what the model does
# untold), and the instructed truth through the codec (the detectors' ceiling)
PROBE_VARIANTS = ("instructed", "instructed_guided", "instructed_text_guided", "untold", "instructed_codec")
PROBE_TEXT_GUIDANCE = 3.0


def _clip_case(i: int, cfg) -> dict | None:
    """Held-out clip i at the model's clip length (stage 1's), or None when its mouth hardly moves (no
    lip sync to measure): render_clip of seed HELD_OUT_BASE + i with the eval split's voices."""
    from stages.eval.bench.cases import HELD_OUT_BASE
    from stages.train.data import render_clip
    c = render_clip(HELD_OUT_BASE + i, cfg, split="eval", truth=True)
    return c if np.std(c["truth"]["tracks"]["mouth"]) > 0.05 else None


PROBE_ONSET = 0.12  # s: the instructed probe's instruction, early enough that its action fits the clip


def _instructed_case(seed: int, cfg, action: str | None) -> dict:
    """Held-out clip `seed` again, now with one instruction `action` given at PROBE_ONSET (its action as
    long as the clip allows, within the action's own range), or with none (None): the same character,
    scene and speech."""
    from stages.synth.world import ACTIONS, INSTRUCTION_DELAY, event
    from stages.train.data import render_clip
    if action is None:
        return render_clip(seed, cfg, split="eval", truth=True, events=[])
    lo, hi = ACTIONS[action].seconds
    room = cfg.video_frames / cfg.audio.fps - PROBE_ONSET - INSTRUCTION_DELAY - 0.04
    return render_clip(seed, cfg, split="eval", truth=True, events=[event(PROBE_ONSET, action, min(hi, max(lo, room)))])


TEXT_USE_SIGMAS = (0.3, 0.5, 0.7, 0.9)   # noise levels of the text-use measure (the band where poses are decided)


@torch.no_grad()
def text_use(model, batch: list[dict], swapped: list[torch.Tensor], neutral: list[torch.Tensor], dev) -> dict:
    """Does the teacher use *which* instruction it is told? Its v loss on the instructed clips' frames
    under the instruction (those whose text is not the neutral one), at TEXT_USE_SIGMAS with the same
    noise, given "told": each clip's own texts, "swapped": another class's (`swapped`), "neutral": no
    instruction. swapped - told > 0: the class is used; neutral - told > 0: the presence of one is."""
    x0 = torch.stack([b["video"] for b in batch]).to(dev)
    ref = torch.stack([b["ref"] for b in batch]).to(dev)
    audio = torch.stack([b["audio"] for b in batch]).to(dev) if "audio" in batch[0] else None
    told = torch.stack([b["text"] for b in batch]).to(dev)
    texts = {"told": told, "swapped": torch.stack(swapped).to(dev), "neutral": torch.stack(neutral).to(dev)}
    under = ((told - texts["neutral"]).abs().amax((-1, -2)) > 0).float()        # [B, F] frames told something
    g = torch.Generator().manual_seed(0)
    out = {k: [] for k in texts}
    for sig in TEXT_USE_SIGMAS:
        eps = torch.randn(x0.shape, generator=g).to(dev, x0.dtype)
        x_t = add_noise(x0, eps, sig)
        t = torch.full((x0.shape[0],), timestep(sig), device=dev)
        for name, text in texts.items():
            with torch.autocast("cuda", torch.bfloat16, enabled=dev == "cuda"):
                v = model(x_t, t, text, audio=audio, ref=ref).video.float()
            per_frame = (v - (eps - x0).float()).square().mean((1, 3, 4))         # [B, F]
            out[name].append(float((per_frame * under).sum() / under.sum().clamp(min=1)))
    return {"sigmas": list(TEXT_USE_SIGMAS), **{k: [round(x, 5) for x in v] for k, v in out.items()},
            "swapped_minus_told": float(np.mean(out["swapped"]) - np.mean(out["told"])),
            "neutral_minus_told": float(np.mean(out["neutral"]) - np.mean(out["told"]))}


class _Cases:
    """The clip source Dataset reads (cfg, n, clip i)."""

    def __init__(self, cfg, clips: list[dict]):
        self.cfg, self.clips, self.n = cfg, clips, len(clips)

    def __call__(self, i: int) -> dict:
        return self.clips[i]


def clip_eval(recipe: Recipe, work: Path, out: Path, teacher: str, workers: int, cases: int | None,
              steps: int | None = None) -> dict:
    """Lip sync of a teacher on held-out speaking clips at its training length (1 + 4 (F - 1) frames),
    every clip sampled whole with `sample_bidirectional` (the bidirectional teacher's own sampler; for
    the causal teacher the same full-attention sampler, i.e. its stage-1 behaviour) and scored by the synth
    bench's synth_scores: "guided" (the teacher's guidance), "unguided" (1.0), "shuffled" (guided,
    but driven by the next clip's speech and scored against this clip's: a model that lip-syncs drops
    to r ~ 0 here), "codec" (the ground truth through the codec: the ceiling), "truth" (the frames).
    Then the instructed probe (PROBE_VARIANTS): does the teacher act on text at all? Instruction success
    (the bench's detectors and rules) of the clips re-rendered with one instruction each, sampled with
    it, and untold (the neutral text, same noise and speech: how often the action happens anyway)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from models.checkpoint import checkpoint_sampling, load_dit, load_taehv
    from models.encoders import text_encoder
    from models.flow import SHIFT
    from models.taehv import latents_to_frames
    from stages.eval.bench.synthscore import synth_scores
    from stages.synth.world import ACTIONS
    from stages.train.data import Dataset
    from stages.train.sample import BIDIRECTIONAL_STEPS, TEACHER_GUIDANCE, sample_bidirectional
    t0 = time.perf_counter()
    n = cases or recipe.eval_cases
    names = list(ACTIONS)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = shipped(work / teacher, "ema")
    model, cfg = load_dit(ckpt, device=dev)
    model.eval()
    shift = (checkpoint_sampling(ckpt) or {}).get("shift", SHIFT)   # what the checkpoint streams with
    codec = load_taehv(work / CODEC, dev)
    pool = ProcessPoolExecutor(max(1, workers), mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                               initargs=(1,))
    with pool:
        clips = [c for c in pool.map(_clip_case, range(8 * n), [cfg] * (8 * n)) if c is not None][:n]
        ds = Dataset(_Cases(cfg, clips), 0, codec, text_encoder("minilm", max_len=cfg.dit.text_len))
        batch = [ds.sample(i) for i in range(len(clips))]
        stack = lambda key, order: torch.stack([batch[j][key] for j in order]).to(dev)  # noqa: E731

        bs = 16 if dev == "cuda" else 2
        order = list(range(len(clips)))
        shuffled = order[1:] + order[:1]
        runs = {"guided": (TEACHER_GUIDANCE, order), "unguided": (1.0, order), "shuffled": (TEACHER_GUIDANCE, shuffled)}
        frames = {k: [] for k in CLIP_VARIANTS}
        for a in range(0, len(clips), bs):
            idx = order[a:a + bs]
            frames["codec"] += list(latents_to_frames(codec, stack("video", idx)))
            for name, (g, speech) in runs.items():
                with torch.autocast("cuda", torch.bfloat16, enabled=dev == "cuda"):
                    z, _ = sample_bidirectional(model, cfg, stack("ref", idx), stack("text", idx),
                                                stack("audio", speech[a:a + bs]) if cfg.dit.audio_dim else None,
                                                steps=steps or BIDIRECTIONAL_STEPS, shift=shift, seed=a, guidance=g)
                frames[name] += list(latents_to_frames(codec, z))
        frames["truth"] = [c["frames"] for c in clips]
        actions = [names[i % len(names)] for i in order]
        seeds = [c["truth"]["seed"] for c in clips]
        told = list(pool.map(_instructed_case, seeds, [cfg] * len(clips), actions))
        plain = list(pool.map(_instructed_case, seeds, [cfg] * len(clips), [None] * len(clips)))
        tbatch = [Dataset(_Cases(cfg, told), 0, codec, ds.encode_text).sample(i) for i in range(len(told))]
        neutral = [Dataset(_Cases(cfg, plain), 0, codec, ds.encode_text).sample(i)["text"] for i in range(len(plain))]
        tstack = lambda key, idx: torch.stack([tbatch[j][key] for j in idx]).to(dev)  # noqa: E731
        # swapped: the next clip's texts (class i + 1 mod 8 at the same onset); needs two clips
        other = [tbatch[order[(i + 1) % len(order)]]["text"] for i in range(len(order))]
        uses = [text_use(model, [tbatch[j] for j in order[a:a + bs]], other[a:a + bs],
                         [neutral[j] for j in order[a:a + bs]], dev) for a in range(0, len(told), bs)] if len(told) > 1 else []
        use = {k: float(np.mean([u[k] for u in uses])) if uses else None for k in ("swapped_minus_told", "neutral_minus_told")}
        use["batches"] = uses
        for name in PROBE_VARIANTS:
            frames[name] = []
        for a in range(0, len(told), bs):
            idx = order[a:a + bs]
            frames["instructed_codec"] += list(latents_to_frames(codec, tstack("video", idx)))
            text = tstack("text", idx)
            probes = {"instructed": (1.0, text, "all"), "instructed_guided": (TEACHER_GUIDANCE, text, "all"),
                      "instructed_text_guided": (PROBE_TEXT_GUIDANCE, text, "text"),
                      "untold": (1.0, torch.stack([neutral[j] for j in idx]).to(dev), "all")}
            for name, (g, txt, guide) in probes.items():
                with torch.autocast("cuda", torch.bfloat16, enabled=dev == "cuda"):
                    z, _ = sample_bidirectional(model, cfg, tstack("ref", idx), txt,
                                                tstack("audio", idx) if cfg.dit.audio_dim else None,
                                                steps=steps or BIDIRECTIONAL_STEPS, shift=shift, seed=a, guidance=g,
                                                guide=guide)
                frames[name] += list(latents_to_frames(codec, z))
        frames["instructed_truth"] = [c["frames"] for c in told]
        controls = [np.asarray(clips[shuffled[i]]["truth"]["tracks"]["mouth"]) for i in order]
        truths = {name: (told if name.startswith("instructed") or name == "untold" else clips) for name in frames}
        scored = {name: [pool.submit(synth_scores, f[i], cfg.audio.fps, truths[name][i]["truth"], controls[i])
                         for i in order] for name, f in frames.items()}
        rows = [{"seed": c["truth"]["seed"], "voice": c["truth"]["speech_source"], "action": actions[i],
                 **{name: scored[name][i].result() for name in frames}} for i, c in enumerate(clips)]
    probe = {}
    for name in (*PROBE_VARIANTS, "instructed_truth"):
        ok = [r[name]["instr_success"] for r in rows if r[name]["instr_success"] is not None]
        probe[name] = {"instr_success": float(np.mean(ok)) if ok else None,
                         "per_class": {a: float(np.mean([r[name]["instr_success"] for r in rows if r["action"] == a
                                                         and r[name]["instr_success"] is not None] or [np.nan]))
                                       for a in names},
                         "spurious_per_min": float(np.mean([r[name]["spurious_per_min"] for r in rows]))}
    summary = {}
    for name in (*CLIP_VARIANTS, "truth"):
        rs = [r[name]["mouth_r"] for r in rows if r[name]["mouth_r"] is not None]
        ctl = [abs(r[name]["mouth_r_control"]) for r in rows if r[name]["mouth_r_control"] is not None]
        ide = [r[name]["identity_error"] for r in rows if r[name]["identity_error"] is not None]
        summary[name] = {"mouth_r": float(np.mean(rs)) if rs else None,
                         "mouth_abs_r_control": float(np.mean(ctl)) if ctl else None,
                         "identity_error": float(np.mean(ide)) if ide else None,
                         "face_found": float(np.mean([r[name]["face_found"] for r in rows]))}
    if clips:
        strip(np.concatenate(frames["truth"][:6]), np.concatenate(frames["guided"][:6]),
              out / f"clips_{teacher}.png", every=11)
        strip(np.concatenate(frames["instructed_truth"][:8]), np.concatenate(frames["instructed"][:8]),
              out / f"clips_{teacher}_instructed.png", every=11)
    return {"phase": "clips", "teacher": teacher, "checkpoint": str(ckpt), "cases": len(clips),
            "seconds": cfg.video_frames / cfg.audio.fps, "device": dev, "shift": shift, "guidance": TEACHER_GUIDANCE,
            "eval_s": time.perf_counter() - t0, "summary": summary, "instructed": probe, "text_use": use, "rows": rows}


def summarise(rows: list[dict]) -> dict:
    """The eval phase's numbers over its rows (each with its ground truth's, "truth"): instructions pooled
    over events, the rest means over clips; `by_style`: the same per character style
    (synthscore.style_breakdown), each with its truth's instruction success, hit and action sharpness."""
    from stages.eval.bench.synthscore import blockers_summed, instruction_drift, pooled, style_breakdown

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None
    lat = [x for r in rows for x in r["instr_latency_s"]]
    ev = sum(r["instr_events"] or 0 for r in rows)
    truths = [r["truth"] for r in rows]
    by_style = style_breakdown(rows)
    for style, truth in style_breakdown(truths).items():
        by_style[style].update({f"truth_{k}": truth[k] for k in ("instr_success", "instr_hit", "action_sharpness_ratio")})
    return {"clips": len(rows), "mouth_r": mean(r["mouth_r"] for r in rows),
            "mouth_abs_r_control": mean(abs(r["mouth_r_control"]) if r["mouth_r_control"] is not None else None
                                        for r in rows),
            "truth_mouth_r": mean(r["truth"]["mouth_r"] for r in rows),
            "identity_error": mean(r["identity_error"] for r in rows),
            "truth_identity_error": mean(r["truth"]["identity_error"] for r in rows),
            "instr_events": ev, "instr_success": pooled(rows), "truth_instr_success": pooled(truths),
            "instr_hit": pooled(rows, "instr_hit"), "truth_instr_hit": pooled(truths, "instr_hit"),
            "instr_hit_chance": pooled(rows, "instr_hit_chance", counts=False),
            "instr_blockers": blockers_summed(rows),
            "latency_s_p50": float(np.median(lat)) if lat else None,
            "latency_s_p90": float(np.percentile(lat, 90)) if lat else None,
            "spurious_per_min": mean(r["spurious_per_min"] for r in rows),
            "spurious_idle_per_min": mean(r["spurious_idle_per_min"] for r in rows),
            "truth_spurious_per_min": mean(r["truth"]["spurious_per_min"] for r in rows),
            **{f"{who}{k}": mean((r["truth"] if who else r)[k] for r in rows)
               for k in ("action_sharpness_ratio", "action_identity_error") for who in ("", "truth_")},
            "by_style": by_style,
            "drift": {k: mean(r["drift_ratios"].get(k) for r in rows)
                      for k in ("identity_error", "sharpness", "motion", "sync_r", "instructions")},
            # the instruction ratio pooled over the rows' events: counts first / last 10 %, ratio, 95 % interval
            "drift_instructions": instruction_drift(rows),
            "stream_fps": mean(r["stream_fps"] for r in rows)}


# -- the text table ----------------------------------------------------------------------------------

def recipe_texts() -> list[str]:
    """Every text training and the synth bench condition on: the neutral prompt and the world's
    instructions (stages.synth ACTIONS names: training's per-frame texts and the bench's events)."""
    from stages.synth import ACTIONS
    return [NEUTRAL_TEXT, *ACTIONS]


def write_text_table(path: Path = TEXT_TABLE) -> Path:
    from models.encoders import TextEncoder, save_text_table
    return save_text_table(TextEncoder("minilm", max_len=512), recipe_texts(), path)


# -- the command ---------------------------------------------------------------------------------------

def table(res: dict) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    if res["phase"] == "lipsync":
        h, t = res["eval"]["held_out"], res["eval"]["train"]
        return (f"lipsync: {res['settings']['clips']} clips rendered + coded in {res['render_s']:.0f} s, fit in "
                f"{res['fit_s']:.0f} s; AUC held-out shifted {f(h['auc_shifted'])} / other clip {f(h['auc_other_clip'])} "
                f"/ window {f(h['auc_window'])} (train {f(t['auc_shifted'])} / {f(t['auc_other_clip'])}); "
                f"used by the teachers: {res['used_by_teachers']}")
    if res["phase"] == "voice":
        from stages.eval.bench.voice import table as voice_table
        head = (f"voice bench: {res['teacher']}, {res['cases']} held-out cases x {res['seconds']:g} s, "
                f"{res['eval_s']:.0f} s on {res['device']}")
        if res["scorers_missing"]:
            return (f"{head}; waves in voice_waves.npz, not scored here (no {res['scorers_missing']}): "
                    f"python benchmarks/voice_bench.py --score voice_waves.npz")
        return head + "\n" + voice_table(res["summary"], res["oracle"])
    if res["phase"] == "clips":
        lines = [f"clips {res['teacher']}: {res['cases']} held-out clips x {res['seconds']:.2f} s, "
                 f"{res['eval_s']:.0f} s on {res['device']}",
                 "| variant | lip-sync r | mismatched abs r | identity error | face found |", "|---|---|---|---|---|"]
        for name, v in res["summary"].items():
            lines.append(f"| {name} | {f(v['mouth_r'])} | {f(v['mouth_abs_r_control'])} | {f(v['identity_error'])} "
                         f"| {f(v['face_found'])} |")
        classes = list(next(iter(res["instructed"].values()))["per_class"])
        lines += [f"instructed probe (one instruction at {PROBE_ONSET} s a clip, class i % {len(classes)}):",
                  "| variant | success | spurious / min | " + " | ".join(classes) + " |", "|---" * (3 + len(classes)) + "|"]
        for name, v in res["instructed"].items():
            lines.append(f"| {name} | {f(v['instr_success'])} | {f(v['spurious_per_min'])} | "
                         + " | ".join(f(v["per_class"][c]) for c in classes) + " |")
        u = res["text_use"]
        if u["batches"]:
            lines.append(f"text use (v loss under the instruction, noise {TEXT_USE_SIGMAS}): swapped - told "
                         f"{u['swapped_minus_told']:+.5f} (the class), neutral - told {u['neutral_minus_told']:+.5f} "
                         "(an instruction)")
        return "\n".join(lines)
    if res["phase"] == "eval":
        s = res["summary"]
        return "\n".join([f"eval {Path(res['checkpoint']).name if res.get('from') else res['teacher']} on {res.get('bench', 'synth')} {res['stream']}: {s['clips']} clips x {res['seconds']:g} s, {res['eval_s']:.0f} s "
                          f"on {res['device']}, " + (res["whole"]["sampled"] if res["teacher"] == "codec" else
                                                     f"sampled whole in windows ({res['whole']['steps']} steps, guidance "
                                                     f"{res['whole']['guidance']:g} on {res['whole']['guide']}), "
                                                     f"{f(res['whole']['gen_fps'])} fps generated" if res.get("whole")
                                                     else f"{f(s['stream_fps'])} fps streamed"),
                          f"  lip sync r {f(s['mouth_r'])} (truth {f(s['truth_mouth_r'])}), mismatched |r| "
                          f"{f(s['mouth_abs_r_control'])}",
                          f"  instructions {f(s['instr_success'])} of {s['instr_events']} (truth "
                          f"{f(s['truth_instr_success'])}), latency p50 {f(s['latency_s_p50'])} s p90 "
                          f"{f(s['latency_s_p90'])} s, spurious {f(s['spurious_per_min'])}/min "
                          f"({f(s['spurious_idle_per_min'])} with no instruction in force; truth {f(s['truth_spurious_per_min'])})",
                          f"  told class fired in 0-1 s, others allowed {f(s['instr_hit'])} (by chance "
                          f"{f(s.get('instr_hit_chance'))}; truth {f(s['truth_instr_hit'])})",
                          *([("  also fired in a told event's second: " + "; ".join(
                              f"{c}: " + ", ".join(f"{k} {n}" for k, n in o.items())
                              for c, o in s["instr_blockers"].items()))] if s.get("instr_blockers") else []),
                          f"  identity error {f(s['identity_error'])} (truth {f(s['truth_identity_error'])}), on the "
                          f"frames of told actions {f(s['action_identity_error'])} (truth {f(s['truth_action_identity_error'])})",
                          f"  sharpness during told actions / idle {f(s['action_sharpness_ratio'])} (truth "
                          f"{f(s['truth_action_sharpness_ratio'])})",
                          "  drift, last / first 10 %: " + ", ".join(f"{k} {f(v)}" for k, v in s["drift"].items())
                          + " (instructions pooled: {1[0]} of {1[1]} / {0[0]} of {0[1]}".format(*s["drift_instructions"]["counts"])
                          + " = {}, 95 % {}-{})".format(*(f(s["drift_instructions"][k]) for k in ("ratio", "low", "high"))),
                          *[f"  {style}: {v['clips']} clips, instructions {f(v['instr_success'])} of {v['instr_events']} "
                            f"(hit {f(v['instr_hit'])}; truth {f(v['truth_instr_success'])}), r {f(v['mouth_r'])}, "
                            f"spurious {f(v['spurious_per_min'])}/min, identity error {f(v['identity_error'])}, "
                            f"sharpness told / idle {f(v['action_sharpness_ratio'])} (truth "
                            f"{f(v['truth_action_sharpness_ratio'])}); success / told: "
                            + (", ".join(f"{c} {n['success']}/{n['told']}" for c, n in v["instr_classes"].items()) or "none")
                            for style, v in s["by_style"].items()]])
    if res["phase"] == "starter":
        return f"starter: {res['dest']} ({res['bytes'] / 2 ** 20:.1f} MiB), scores {res['starter']['scores']}"
    if res["phase"] == "distill":
        t = res["train"]
        return (f"distill: {t['steps']} steps x batch {res['settings']['batch']} in {t['train_s']:.0f} s, "
                f"{t['samples_per_s']:.1f} rollouts/s; "
                + ", ".join(f"{k} {res['loss_first'][k]:.4f} -> " + (f"{res['loss_last_10pct'][k]:.4f}" if k in
                            res["loss_last_10pct"] else "-") for k in res["loss_first"])
                + "\n  shipped: " + ", ".join(f"{k} ({v / 2 ** 20:.1f} MiB)" for k, v in res["shipped"].items()))
    t = res["train"]
    line = (f"{res['phase']}: {t['steps']} steps x batch {res['settings']['batch']} in {t['seconds']:.0f} s, "
            f"{t['samples_per_s']:.1f} samples/s, loss {res['loss_first']:.4f} -> {res['loss_last_10pct']:.4f}")
    if "mfu" in res:
        line += f", MFU {100 * res['mfu']:.2f}% of an H200"
    return line + "\n  shipped: " + ", ".join(f"{k} ({v / 2 ** 20:.1f} MiB)" for k, v in res["shipped"].items())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=PHASES)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vidu-recipe"))
    ap.add_argument("--minutes", type=float, default=8.5, help="wall time of the phase (probe, rendering, training)")
    ap.add_argument("--preset", default="small", choices=sorted(RECIPES))
    ap.add_argument("--codec", type=Path, help="an autoencoder to use instead of running the autoencoder phase")
    ap.add_argument("--steps", type=int, help="train this many steps (no probe; --minutes still stops training); clips: sampling steps")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="processes rendering clips (0: in this process, as needed)")
    ap.add_argument("--teacher", choices=("causal", "bidirectional", "student", "codec"),
                    help="eval, clips: which checkpoint (default causal; eval's codec: no model, the ground truth "
                         "through W's codec, the bench's ceiling); voice: which (default bidirectional, sampled "
                         "whole; the others are streamed)")
    ap.add_argument("--stream-steps", type=int, help="eval: the stream's denoising steps per chunk (default: the checkpoint's)")
    ap.add_argument("--cases", type=int, help="eval: held-out cases (default: the recipe's)")
    ap.add_argument("--streams", type=int, default=1, help="eval: processes streaming cases at once on the device")
    ap.add_argument("--seconds", type=float, help="eval: seconds per case (default: the recipe's)")
    ap.add_argument("--guidance", type=float,
                    help="eval: the stream's guidance scale (default: the checkpoint's); distill: the real score's")
    ap.add_argument("--sampler", choices=("euler", "renoise"), help="eval: the stream's sampler (default: the checkpoint's)")
    ap.add_argument("--guide", choices=("all", "text"), help="eval: what guidance's unconditional pass nulls")
    ap.add_argument("--idle", action="store_true",
                    help="eval: synth-idle's cases (the synth cases untold: every detected action is unprompted)")
    ap.add_argument("--recache", action=argparse.BooleanOptionalAction,
                    help="eval: re-cache the history under each new instruction (LongLive), or not (default: the "
                         "checkpoint's record); distill: roll out with it (the student then streams with it)")
    ap.add_argument("--attention", choices=tuple(SELF_ATTENTION),
                    help="eval: self-attention's backend (vidu stream --attention; default sdpa)")
    ap.add_argument("--kernels", action=argparse.BooleanOptionalAction,
                    help="eval: the fused kernels (vidu stream --kernels; default: on a GPU)")
    ap.add_argument("--again", action="store_true",
                    help="bidirectional / causal: train further from the stage's shipped EMA in W (fresh optimizer and schedule)")
    ap.add_argument("--from", dest="start", type=Path,
                    help="with --again: continue from this checkpoint (copied to W/<stage> first), e.g. the starter's model; "
                         "with --phase eval: score this checkpoint (its codec file beside it) instead of W's")
    ap.add_argument("--warm", type=Path,
                    help="bidirectional: seed a voice preset's stage 1 with the tensors of this teacher of another preset "
                         "that fit (a file, or a folder of shipped ema shards; TrainSettings.warm_from)")
    ap.add_argument("--recode", action="store_true",
                    help="with --from: it was trained with another codec than --codec; train it on --codec's latents")
    ap.add_argument("--init-student", type=Path, help="distill: warm start from this folder's shipped student EMA, or this student file (models/starter/model.safetensors)")
    ap.add_argument("--ode-warmup", type=int, default=0, help="distill: first steps of ODE regression before DMD")
    ap.add_argument("--pcm-weight", type=float, default=0.0, help="distill: the PCM regularizer's weight (0: none)")
    ap.add_argument("--sync-weight", type=float, default=0.0,
                    help="distill: the sync reward's weight (needs W/lipsync.safetensors; 0: measured only)")
    ap.add_argument("--eyes-weight", type=float,
                    help="bidirectional / causal: the video loss weight of the eyes region (default: ObjectiveSettings')")
    ap.add_argument("--ref-pose", type=float,
                    help="bidirectional / causal: the share of clips whose reference shows a random pose (default: "
                         "ObjectiveSettings')")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction,
                    help="distill: torch.compile the student, critic and teacher (default: the recipe's); eval: the "
                         "model's blocks (vidu stream --compile; a bidirectional teacher's whole-clip sampler too)")
    ap.add_argument("--scores", type=Path, help="starter: the eval phase's result (recipe_eval.json) of the model to ship")
    ap.add_argument("--write-text-table", action="store_true", help="rebuild the text table with MiniLM (not on GPU)")
    args = ap.parse_args(argv)
    if args.write_text_table:
        print(write_text_table())
        return {}
    if not args.phase:
        ap.error("--phase is required")
    if args.teacher == "codec" and (args.phase != "eval" or args.start):
        ap.error("--teacher codec (the ground truth through W's codec: give it with --codec) goes with --phase eval, "
                 "without --from")
    if args.phase == "distill" and args.teacher not in (None, "causal", "bidirectional"):
        ap.error(f"--phase distill distills a teacher (--teacher causal or bidirectional), not {args.teacher}")
    if args.teacher == "codec" and (args.seconds or 0) > CODEC_CASE_MAX_S:
        ap.error(f"--teacher codec encodes each case whole: at most {CODEC_CASE_MAX_S:g} s a case, not {args.seconds:g}")
    t_phase = time.perf_counter()
    os.environ.setdefault("VIDU_TEXT_TABLE", str(TEXT_TABLE))
    recipe = RECIPES[args.preset]
    if args.eyes_weight is not None:
        if args.phase not in ("bidirectional", "causal"):
            ap.error("--eyes-weight goes with a teacher stage (bidirectional or causal)")
        recipe = with_objective(recipe, eyes_weight=args.eyes_weight)
    if args.ref_pose is not None:
        if args.phase not in ("bidirectional", "causal"):
            ap.error("--ref-pose goes with a teacher stage (bidirectional or causal)")
        recipe = with_objective(recipe, ref_pose=args.ref_pose)
    work = args.work
    out = Path(os.environ.get("OUT") or work / "out")
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if args.codec and not ((work / CODEC).is_file() and (work / CODEC).samefile(args.codec)):
        shutil.copyfile(args.codec, work / CODEC)      # (--codec W/codec.safetensors: already there)
    scored = args.phase == "eval" and args.start      # a checkpoint evaluated where it lies, with its own codec
    if args.phase != "autoencoder" and not scored and not (work / CODEC).is_file():
        raise SystemExit(f"{work / CODEC} is missing: run --phase autoencoder first, or give --codec")
    if args.start:
        if not (scored or args.again and args.phase in ("bidirectional", "causal")):
            ap.error("--from goes with --again and a teacher stage (bidirectional or causal), or with --phase eval")
        if not args.start.is_file():
            raise SystemExit(f"--from {args.start}: no such file")
        if not scored:
            ship(args.start, work / args.phase, "ema")     # what --again continues from (bf16, shards if large)
    if args.recode and not (args.start and args.codec):
        ap.error("--recode goes with --from and --codec")
    if args.warm:
        if args.phase != "bidirectional" or args.again:
            ap.error("--warm seeds a fresh stage 1 (--phase bidirectional, without --again)")
        if not args.warm.exists():
            raise SystemExit(f"--warm {args.warm}: no such file or folder")
        warm = checkpoint_file(args.warm)
        recipe = dataclasses.replace(recipe, bidirectional={**recipe.bidirectional, "warm_from": str(warm)})
    torch.backends.cudnn.benchmark = True
    if args.phase == "lipsync":
        res = lipsync_phase(recipe, work, out, args.workers)
    elif args.phase == "clips":
        res = clip_eval(recipe, work, out, args.teacher or "causal", args.workers, args.cases, args.steps)
    elif args.phase == "starter":
        if not args.scores:
            ap.error("--phase starter needs --scores (the eval phase's recipe_eval.json of the model to ship)")
        res = starter_phase(work, args.scores)
    elif args.phase == "voice":
        res = voice_phase(recipe, work, out, args.teacher or "bidirectional", args.cases, args.seconds, args.stream_steps,
                          args.guidance, args.guide)
    elif args.phase == "distill":
        res = distill_phase(recipe, work, out, args.minutes, args.workers, t_phase, args.steps, args.init_student,
                            args.ode_warmup, args.pcm_weight, args.sync_weight, args.guidance, args.compile, bool(args.recache),
                            args.teacher or "causal")
    elif args.phase == "eval":
        overrides = {k: v for k, v in (("guidance", args.guidance), ("sampler", args.sampler), ("guide", args.guide),
                                       ("recache", args.recache), ("steps", args.stream_steps),
                                       ("attention", args.attention), ("kernels", args.kernels),
                                       ("compile", args.compile))
                     if v is not None}
        res = eval_phase(recipe, work, out, args.teacher or "causal", args.streams, args.cases, args.seconds, overrides,
                         args.workers, args.start, args.idle)
    else:
        res = train_phase(recipe, args.phase, work, out, args.minutes, args.workers, t_phase, args.steps, args.again,
                          args.recode)
    res.update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               phase_wall_s=time.perf_counter() - t_phase)
    (out / f"recipe_{args.phase}.json").write_text(json.dumps(res, indent=1, default=str))
    print(table(res))
    return res


if __name__ == "__main__":
    main()
