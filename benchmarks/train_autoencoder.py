"""Train the `small` preset's video autoencoder (TAEHV widths of models/config.py) on the synthetic world
on one GPU for a few minutes, then measure what the round trip keeps on held-out world clips.

    python benchmarks/train_autoencoder.py --minutes 7 --workers 14          # writes to $OUT (default .)

The issue-14 recipe (one H200, 16 cores, one `run` call of at most 600 s carrying `.whl`; training
hard-stopped at --total-s minus --reserve-s): a warm start from the shipped codec with encoder and decoder
trained (benchmarks/codec_probe.py: the shipped encoder's latents hardly carry the mouth's motion inside a
4-frame group, so a decoder-only fine-tune cannot bring it back; RESULTS.md 2026-12-04), a lower peak lr
than from scratch, the motion term (frame differences inside mouth, eyes and hands) and each rendered
batch trained twice (as rendered, then reversed in time: the latent groups fall one frame later against
the motion). The stage's defaults since session 44 (AutoencoderSettings) also draw 40 % of the training
clips in the animal style (the world: 25 %), put the action a clip's end cuts into it (a 33-frame clip
showed a raised hand in 0.3 % of clips, a head turn in 4 %; now 9 % and 30 %) and weight the mouth's
surroundings (an animal's muzzle, nose and chin) as the mouth (session 43's run lost the mouth of a
dark-muzzled animal clip; the shipped codec already recolours that muzzle):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python3 benchmarks/train_autoencoder.py --init models/starter/codec.safetensors --motion-weight 4 \
        --reuse 2 --lr 5e-4 --minutes 6.6 --total-s 560 --reserve-s 110 --no-eval-raw --workers 14 --batch 8 \
        --frames 33 --eval-clips 16 2>&1 | tee $OUT/log

Expected: ~15 s to install and import, a ~30-s probe, training to t = 450 s, the checkpoint and
ema_bf16.safetensors by ~460 s, then the evaluation (EMA and init on 16 clips: rendering and the
analyzer in 14 processes, ~2.6 core-s a clip, the codecs on the GPU), which starts no clip past
t = 550 s; ~575 s in all. autoencoder.json is written before the evaluation and again after every clip
(`complete`: all clips done), the log has a timestamp per phase and clip: a call killed mid-evaluation
still returns the weights and the clips scored so far. Session 43 ran it with --total-s 545 and the
default reserve (75 s) and raw evaluated too: 2092 steps trained, then the call was killed at 595 s while
evaluating (init and EMA strips written, no autoencoder.json); the evaluation of the weights that came
back ran on the CPU (`--eval`, RESULTS.md session 43). Session 44 ran the recipe above: the probe done at
28 s, 1925 steps by 430 s, the 16 clips evaluated in 34 s, 464 s in all (a 475-s call): `--reserve-s 60`
would train 50 s more and still end near 520 s. Next (RESULTS.md session 44): the same from the shipped
codec with `--mouth-contrast 150 --eval-animals 8` (dark muzzles, the remaining failure; one <= 9-minute
phase, not a warm start from session 44's weights).

Sessions 46-51 trained six phases from the shipped codec; their weights lived on a dev VM only and were lost with
it. Session 52 rebuilt the lineage in three calls from the shipped codec with every knob on (`--nod-share 0.3`
included; lr 5e-4, 3e-4, 2e-4) and committed the result as models/world_codec.safetensors (RESULTS.md): on a fourth
held-out set (`--eval-from 3000`) the mouth holds on 20 of 22 speaking clips, the two others (dark-muzzled animals
moving the head's pitch) at 0.947-0.949. The next phase, judged on a fifth set:

    timeout 560 python3 -u benchmarks/train_autoencoder.py --init models/starter/codec.safetensors --nod-share 0.3 \
        --animal-share 0.75 --mouth-contrast 150 --eval-animals 8 --motion-weight 4 --reuse 2 --lr 1.5e-4 --minutes 6.2 \
        --total-s 540 --reserve-s 75 --no-eval-raw --no-eval-init --eval-from 4000 --workers 14 --batch 8 --frames 33 \
        --eval-clips 16 > $OUT/log 2>&1

The world codec lives in one place, models/starter/codec.safetensors (session 52's models/world_codec.safetensors;
since session 55 the starter model is trained on its latents). A better codec replaces it together with a starter
moved onto its latents (teacher_recipe.py --recode), never alone: keep it in a folder that outlives the session.

The same stage as `vidu train --stage autoencoder` (stages/train/autoencoder.py): a short probe fits the
step count to the time, then one run with the cosine schedule ending on time (or at --total-s minus
--reserve-s, whichever comes first). Evaluation, on clips whose seeds no training clip has, rendered in
memory (no video files, no catalog), in --workers processes:
  per clip, the correlation between the world analyzer's reading (stages.synth.analyze) of the
  uncompressed frames and of the round trip, for mouth, eyes (blinks), yaw and hand, over the clips in
  which the world's own track of that signal moves (a clip without speech has a still mouth: the
  analyzer's noise there correlates with nothing); PSNR over all pixels and over moving pixels (those
  whose value changes by more than 4/255 from the previous frame in the uncompressed clip). The --init
  file is evaluated on the same clips (as `init`). --eval-animals N adds N held-out clips drawn in the
  animal style, with speech (the world's mix gives 16 clips 2 speaking animals; the codec keeps animals worst).
Writes ema_bf16.safetensors (the EMA weights in bf16 with their config: the codec the teachers take,
`--codec`), raw_bf16.safetensors (unless --no-eval-raw), autoencoder.json with every figure (per clip:
each signal's r and `SIGNAL_reference`, the truth's reading against the world's track), loss.png and a
truth | round trip frame strip per weights file; prints a short table last. Runs where duckdb and PyAV
are missing (the GPU image): nothing here decodes video or opens a catalog.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import sys
import time
import types
from concurrent.futures import TimeoutError as FutureTimeout, wait
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _name in ("av", "duckdb"):           # imported at module level by packages this script never calls into
    if importlib.util.find_spec(_name) is None:
        sys.modules[_name] = types.ModuleType(_name)

from models.checkpoint import load_taehv, save_taehv  # noqa: E402
from models.config import preset  # noqa: E402
from stages.train.autoencoder import AutoencoderSettings, to_unit, world_clip  # noqa: E402

AE = {f.name: f.default for f in dataclasses.fields(AutoencoderSettings)}   # the stage's defaults, one home
from stages.train.loop import TrainSettings, train  # noqa: E402

SIGNALS = ("mouth", "eyes", "yaw", "hand")
MOVES = {"mouth": 0.02, "eyes": 0.05, "yaw": 0.05, "hand": 0.05}   # std of the world's track over a clip: "it moves"
EVAL_SEED = 2_000_000_000                                           # held-out world seeds start here
MOVING = 4 / 255
SCORE_GRACE_S = 15                  # past the evaluation's deadline, the analyses in flight are waited for this long


def settings(args, steps: int, minutes: float | None = None) -> TrainSettings:
    return TrainSettings(stage="autoencoder", preset=args.preset, steps=steps, batch=args.batch, lr=args.lr,
                         warmup=min(100, steps // 10), ema=args.ema, save_every=steps, seed=0, minutes=minutes,
                         autoencoder=AutoencoderSettings(
                             frames=args.frames, region_weight=args.region_weight, temporal_weight=args.temporal_weight,
                             motion_weight=args.motion_weight, reuse=args.reuse,
                             init=str(args.init) if args.init else None, freeze_encoder=args.freeze_encoder,
                             animal_share=args.animal_share, cut_actions=not args.no_cut_actions,
                             mouth_contrast=args.mouth_contrast, nod_share=args.nod_share))


def fit_steps(args, work: Path) -> tuple[int, float]:
    """Steps that fit args.minutes, from a timed probe (its last 10 of 20 steps, data loading warm)."""
    marks = []
    probe = dataclasses.replace(settings(args, 20), save_every=1000)
    train(probe, work / "probe", progress=lambda logged: marks.append(time.perf_counter()), prefetch=args.workers)
    step_s = (marks[-1] - marks[9]) / 10
    return max(100, int(args.minutes * 60 / step_s)), step_s


def corr(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = ~np.isnan(a) & ~np.isnan(b)
    if ok.sum() < 4 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return None
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def psnr(mse: float) -> float:
    return float(10 * np.log10(1 / max(mse, 1e-12)))


def held_out_clips(cfg, n: int, frames: int, pool=None, masks: bool = False) -> list:
    """The clips of held_out_seeds rendered (in `pool`'s processes when given): [(frames, Sample)];
    `masks`: keep the region masks."""
    render = functools.partial(_eval_clip, cfg, frames, masks)
    seeds = held_out_seeds(cfg, n, frames)
    return list(pool.map(render, seeds) if pool else map(render, seeds))


def held_out_seeds(cfg, n: int, frames: int, start: int = EVAL_SEED) -> list[int]:
    """n of the first 4n held-out clips from seed `start`, those in which a rarely moving signal (hand, yaw,
    ...) moves first (the world's actions are sparse), then the others in seed order; chosen from the world's
    tracks (no pixels drawn)."""
    from stages.synth import make_sample
    candidates = []
    for seed in range(start, start + 4 * n):
        s = make_sample(seed, width=cfg.width, height=cfg.height, fps=cfg.audio.fps, seconds=frames / cfg.audio.fps,
                        split="eval", draw=False)
        candidates.append((sum(np.std(s.tracks[k]) > 2 * MOVES[k] for k in ("eyes", "yaw", "hand")), seed))
        if sum(c[0] > 0 for c in candidates) >= n:
            break
    candidates.sort(key=lambda c: (-c[0], c[1]))
    return [seed for _, seed in candidates[:n]]


def held_out_animals(cfg, n: int, frames: int, after: int, start: int = EVAL_SEED) -> list[tuple[int, str]]:
    """n more held-out clips drawn in the animal style, (seed, "animal"), those in which the mouth moves, from
    seed start + max(100, after) on (past held_out_seeds' candidates): the style the codec keeps worst has
    2 speaking clips of 16 in the world's mix (RESULTS.md 2026-12-04 session 44)."""
    out, seed = [], start + max(100, after)
    while len(out) < n:
        seed += 1
        s = world_clip(cfg, seed, frames, split="eval", draw=False, style="animal")[1]
        if np.std(s.tracks["mouth"]) > MOVES["mouth"]:
            out.append((seed, "animal"))
    return out


def _eval_clip(cfg, frames: int, masks: bool, seed: int | tuple[int, str]):
    """Held-out world clip `seed` (or (seed, style)): (frames [T, H, W, 3] uint8, its Sample without pixels
    (and masks))."""
    seed, style = seed if isinstance(seed, tuple) else (seed, None)
    f, s, _ = world_clip(cfg, seed, frames, split="eval", style=style)
    s.frames = None
    if not masks:
        s.masks = None
    return f, s


def summary(rows: list[dict], sums: dict) -> dict:
    """The figures of one weights file over the clips evaluated so far (rows: per_clip; sums: squared
    errors and counts)."""
    res = {"clips": len(rows), "psnr": psnr(sums["se_all"] / max(sums["n_all"], 1)),
           "psnr_moving": psnr(sums["se_mov"] / max(sums["n_mov"], 1)),
           "moving_fraction": float(sums["n_mov"] / max(sums["n_all"], 1)), "per_clip": rows}
    for k in SIGNALS:
        v = [r[k] for r in rows if r.get(k) is not None]
        r0 = [r[f"{k}_reference"] for r in rows if r.get(f"{k}_reference") is not None]
        res[k] = {"clips": len(v), "mean_r": float(np.mean(v)) if v else None,
                  "median_r": float(np.median(v)) if v else None, "min_r": float(np.min(v)) if v else None,
                  "clips_r_ge_0.95": int(sum(c >= 0.95 for c in v)),
                  "reference_r_min": float(np.min(r0)) if r0 else None}
    return res


@torch.no_grad()
def evaluate(codecs: dict, cfg, seeds: list[int], frames: int, out: Path, pool, deadline: float | None = None,
             flush=None) -> dict:
    """Figures of each codec in `codecs` (name -> TAEHV) on the held-out clips `seeds`, clip by clip:
    the clips are rendered and the analyzer runs in `pool`'s processes while the codecs run here, and
    after each clip `flush(evs)` gets the figures so far (a call killed mid-way keeps them). No clip is
    started or waited for past `deadline` (perf_counter s), nor its analyses past it + SCORE_GRACE_S. The first clip's truth | round trip strips go to
    OUT/NAME_roundtrip.png. A signal counts in a clip when the world's own track of it moves (std >
    MOVES): a clip with no speech has a still mouth, and the analyzer's noise on it correlates with
    nothing. Beside each r (truth reading vs round-trip reading) stands `reference_r`: the truth's reading
    against the world's track, the eval's own ceiling."""
    from stages.synth import analyze
    rendered = [pool.submit(_eval_clip, cfg, frames, False, seed) for seed in seeds]
    rows = {name: [] for name in codecs}
    sums = {name: dict(se_all=0.0, n_all=0, se_mov=0.0, n_mov=0) for name in codecs}
    evs: dict = {}
    pending = []                      # (clip, sample, {name: round trip}, analyzer futures)
    for i, fut in enumerate(rendered):
        left = None if deadline is None else deadline - time.perf_counter()
        try:                          # a clip still rendering at the deadline stops it too (session 49's call hung on one)
            clip, s = fut.result(timeout=None if left is None else max(0.0, left))
        except FutureTimeout:
            for f in rendered[i:]:
                f.cancel()
            print(f"evaluation stopped at the deadline after {i} of {len(seeds)} clips", flush=True)
            break
        trips = {}
        for name, codec in codecs.items():
            dev = next(codec.parameters()).device
            y = codec.decode_video(codec.encode_video(to_unit(torch.from_numpy(clip)[None]).to(dev)))
            trips[name] = (y[0].float() * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            if i == 0:
                strip(clip, trips[name], out / f"{name}_roundtrip.png")
        futs = [pool.submit(analyze, v, s.identity) for v in (clip, *trips.values())]
        pending.append((clip, s, trips, futs))
        while pending and (all(f.done() for f in pending[0][3]) or len(pending) > 2):
            _score(*pending.pop(0), rows, sums)
            evs = {name: summary(rows[name], sums[name]) for name in codecs}
            if flush:
                flush(evs)
    for item in pending:
        if deadline is not None and wait(item[3], timeout=max(0.0, deadline + SCORE_GRACE_S - time.perf_counter())).not_done:
            break
        _score(*item, rows, sums)
        evs = {name: summary(rows[name], sums[name]) for name in codecs}
        if flush:
            flush(evs)
    return evs


def _score(frames: np.ndarray, s, trips: dict, futs: list, rows: dict, sums: dict) -> None:
    """One clip's per-clip row and error sums for each weights file (futs: the analyzer's readings of
    the truth and of each round trip, in trips' order)."""
    m_x, *m_ys = [f.result() for f in futs]
    xq = frames.astype(np.float32) / 255
    moving = np.zeros(frames.shape[:3], bool)
    moving[1:] = (np.abs(np.diff(xq, axis=0)) > MOVING).any(-1)
    for (name, rt), m_y in zip(trips.items(), m_ys):
        err = (rt.astype(np.float32) / 255 - xq) ** 2
        a = sums[name]
        a["se_all"] += float(err.sum())
        a["n_all"] += err.size
        a["se_mov"] += float(err[moving].sum())
        a["n_mov"] += int(moving.sum()) * 3
        row = {"seed": s.seed, "style": s.identity.style}
        for k in SIGNALS:
            if np.std(s.tracks[k]) > MOVES[k]:
                row[k] = corr(m_x[k], m_y[k])
                row[f"{k}_reference"] = corr(m_x[k], s.tracks[k].astype(np.float64))
        rows[name].append(row)


def table(evs: dict) -> str:
    """The short table the script prints last: per weights file, PSNR and per signal
    mean / median / min r (clips >= 0.95 of clips)."""
    def cell(e):
        if not e["clips"]:
            return "-"
        return f"{e['mean_r']:.3f} / {e['median_r']:.3f} / {e['min_r']:.2f} ({e['clips_r_ge_0.95']} of {e['clips']})"
    lines = ["| weights | PSNR | PSNR moving | " + " | ".join(f"{k} r mean / median / min (>= 0.95)" for k in SIGNALS)
             + " |", "|---" * (3 + len(SIGNALS)) + "|"]
    for name, e in evs.items():
        lines.append(f"| {name} | {e['psnr']:.2f} | {e['psnr_moving']:.2f} | "
                     + " | ".join(cell(e[k]) for k in SIGNALS) + " |")
    return "\n".join(lines)


def strip(truth: np.ndarray, rt: np.ndarray, path: Path, n: int = 8) -> None:
    from PIL import Image
    rows = [np.concatenate(list(a[1:1 + n]), 1) for a in (truth, rt)]
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def write_json(path: Path, res: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, path)


def main() -> None:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=7.0, help="training time (the probe comes before it)")
    ap.add_argument("--total-s", type=float, help="hard limit on the whole call: training stops (with a checkpoint) "
                    "--reserve-s before it, and evaluation starts no clip past it (less 10 s)")
    ap.add_argument("--reserve-s", type=float, default=75.0, help="time kept for shipping and evaluation")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=33, help="frames per training clip, 1 + 4k")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--region-weight", type=float, default=AE["region_weight"])
    ap.add_argument("--temporal-weight", type=float, default=AE["temporal_weight"])
    ap.add_argument("--motion-weight", type=float, default=AE["motion_weight"],
                    help="the frame-difference loss inside mouth, eyes and hands alone")
    ap.add_argument("--reuse", type=int, default=AE["reuse"], help="steps per rendered batch (1-4)")
    ap.add_argument("--animal-share", type=float, default=AE["animal_share"],
                    help="share of training clips of the animal style (negative: the world's mix)")
    ap.add_argument("--no-cut-actions", action="store_true",
                    help="training clips without the action their end cuts (fewer hands and head turns)")
    ap.add_argument("--nod-share", type=float, default=AE["nod_share"],
                    help="share of training clips whose instructions are one nod (speaking heads that nod)")
    ap.add_argument("--mouth-contrast", type=float, default=AE["mouth_contrast"],
                    help="weigh a low-contrast mouth zone x clip(this / RGB distance mouth-surroundings, 1, 4) "
                         "(150: a dark muzzle x 3; 0: off)")
    ap.add_argument("--init", type=Path, help="warm start from this autoencoder file (also evaluated, as `init`)")
    ap.add_argument("--freeze-encoder", action="store_true", help="train the decoder alone (the latents stay init's)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--eval-clips", type=int, default=16)
    ap.add_argument("--eval-seconds", type=float, default=4.0)
    ap.add_argument("--eval-animals", type=int, default=0,
                    help="this many more held-out clips in the animal style, with speech (after the --eval-clips)")
    ap.add_argument("--eval-from", type=int, default=0,
                    help="held-out seeds from EVAL_SEED + this (another held-out set than the one training was "
                         "judged on: the phases chose their settings on the clips from offset 0)")
    ap.add_argument("--no-eval-raw", action="store_true", help="evaluate the EMA weights (and init) only")
    ap.add_argument("--no-eval-init", action="store_true", help="do not evaluate the --init file")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vidu-ae"), help="scratch (emptied first)")
    ap.add_argument("--eval", type=Path, nargs="+", help="only evaluate these autoencoder files (no training)")
    args = ap.parse_args()
    if args.animal_share is not None and args.animal_share < 0:
        args.animal_share = None
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset(args.preset)
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "preset": args.preset,
           "args": {k: str(v) for k, v in vars(args).items()}, "complete": False}
    log = lambda what: print(f"[{time.perf_counter() - t_start:6.1f} s] {what}", flush=True)   # noqa: E731
    if args.eval:
        weights = {p.name.split("_")[0]: p for p in args.eval}
    else:
        shutil.rmtree(args.work, ignore_errors=True)       # a warm machine's earlier run is not resumed
        t0 = time.perf_counter()
        steps, res["probe_step_s"] = fit_steps(args, args.work)
        res["probe_s"] = time.perf_counter() - t0
        log(f"probe: {res['probe_step_s']:.3f} s a step, {steps} steps planned")
        deadline = t_start + args.total_s - args.reserve_s if args.total_s else None
        res["train"] = train(settings(args, steps, minutes=args.minutes + 0.5), args.work / "run",
                             prefetch=args.workers, deadline=deadline)
        res["train"]["planned_steps"] = steps
        log(f"trained {res['train']['steps']} steps")
        shutil.copy(args.work / "run" / "loss.png", out / "loss.png")
        weights = ship(Path(res["train"]["checkpoint"]), res["train"]["steps"], out, dev, raw=not args.no_eval_raw)
        log(f"shipped {', '.join(str(p) for p in weights.values())}")
        if args.init and not args.no_eval_init:
            weights = {**weights, "init": args.init}       # the trained weights first: their figures matter most
    res["weights"] = {k: str(v) for k, v in weights.items()}
    write_json(out / "autoencoder.json", res)             # the training figures, before any evaluation
    frames = 1 + 4 * round((args.eval_seconds * cfg.audio.fps - 1) / 4)
    t1 = time.perf_counter()
    eval_deadline = t_start + args.total_s - 10 if args.total_s else None
    start = EVAL_SEED + args.eval_from
    seeds = held_out_seeds(cfg, args.eval_clips, frames, start)
    seeds += held_out_animals(cfg, args.eval_animals, frames, 4 * args.eval_clips, start) if args.eval_animals else []
    log(f"evaluating {len(weights)} weights files on {len(seeds)} held-out clips")
    codecs = {name: load_taehv(path, dev) for name, path in weights.items()}

    def flush(evs: dict) -> None:
        res.update(eval=evs, eval_s=time.perf_counter() - t1, total_s=time.perf_counter() - t_start)
        write_json(out / "autoencoder.json", res)
        first = next(iter(evs.values()))
        log(f"clip {first['clips']}: " + "; ".join(f"{n} " + ", ".join(
            f"{k} {r[k]:.3f}" for k in SIGNALS if r.get(k) is not None) for n, e in evs.items()
            for r in e["per_clip"][-1:]))

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max(1, args.workers), mp_context=mp.get_context("spawn")) as pool:
        evs = evaluate(codecs, cfg, seeds, frames, out, pool, eval_deadline, flush)
        pool.shutdown(wait=False, cancel_futures=True)
    trained = {k: v for k, v in evs.items() if k != "init"} or evs
    best = max(trained, key=lambda k: trained[k]["psnr"]) if trained else next(iter(weights))
    codec = codecs[best]
    res.update(params=sum(p.numel() for p in codec.parameters()), config=codec.config.to_dict(), best=best,
               eval=evs, eval_s=time.perf_counter() - t1, shipped_bytes=weights[best].stat().st_size,
               total_s=time.perf_counter() - t_start, complete=bool(evs) and all(
                   e["clips"] == len(seeds) for e in evs.values()))
    write_json(out / "autoencoder.json", res)
    tr = res.get("train", {})
    print(json.dumps({k: res.get(k) for k in ("device", "params", "probe_step_s", "best", "eval_s", "total_s")}))
    if tr:
        print(f"trained {tr['steps']} of {tr['planned_steps']} steps in {tr['seconds']:.0f} s "
              f"({tr['samples_per_s']:.1f} clips a second, each rendered clip {args.reuse}x; "
              f"final loss {tr['final_loss']:.4f})")
    if evs:
        print(table(evs))


def ship(ckpt: Path, step: int, out: Path, dev, raw: bool = True) -> dict[str, Path]:
    """The run's EMA (and raw) weights as bf16 files in `out` (both with the EMA's latent statistics)."""
    from models.taehv import TAEHV
    ema = load_taehv(ckpt / "ema.safetensors", dev)
    models = [("ema", ema)]
    if raw:
        models.append(("raw", TAEHV(ema.config).to(dev).eval()))
        models[1][1].load_state_dict(load_taehv(ckpt / "model.safetensors").state_dict())
    return {name: save_taehv(out / f"{name}_bf16.safetensors", model, model.config, {"kind": name, "step": step},
                             dtype=torch.bfloat16) for name, model in models}


if __name__ == "__main__":
    main()
