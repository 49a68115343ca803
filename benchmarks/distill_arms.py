"""Distillation arms side by side on one GPU (issue 17's evidence: pure DMD, + PCM, + the sync reward):
each arm is the teacher recipe's distill phase (benchmarks/teacher_recipe.py) with its own weights, all
arms at once as separate processes sharing the GPU (a small model's distillation leaves most of an H200
idle), then each student (and the teacher at the students' step count) through the recipe's eval phase.

    python3 benchmarks/distill_arms.py train --work W --arms dmd:0:0 pcm:10:0 sync:0:0.05 g5:0:0:5 --minutes 9 --steps 150
    python3 benchmarks/distill_arms.py eval  --work W --arms dmd pcm sync --cases 48 --streams 12 --teacher-steps 3

An arm NAME:PCM:SYNC[:GUIDANCE] (the real score's guidance, default the recipe's) trains in W_NAME (W's teacher linked, its codec and W/lipsync.safetensors copied:
the sync loss is measured in every arm, applied in those with SYNC > 0) and keeps its student and logs
there (W_NAME/out, on the machine while it is held); $OUT gets one summary per mode (arms_train.json,
arms_eval.json) and, from eval, the student of the arm with the best lip sync (student/, its scores
recipe_eval.json) for `teacher_recipe.py --phase starter`. The table printed last: per arm the steps,
seconds a step, the loss terms first -> last 10 % and their gradient norms at the output layer; then the
bench's scores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).with_name("teacher_recipe.py")
FILES = ("codec.safetensors", "lipsync.safetensors")


def arm_dir(work: Path, name: str) -> Path:
    return work.parent / f"{work.name}_{name}"


def parse_arm(spec: str) -> tuple[str, float, float, float | None]:
    try:
        name, pcm, sync, *g = spec.split(":")
        if len(g) > 1:
            raise ValueError
        return name, float(pcm), float(sync), (float(g[0]) if g else None)
    except ValueError:
        raise SystemExit(f"an arm is NAME:PCM_WEIGHT:SYNC_WEIGHT[:GUIDANCE], not {spec!r}") from None


def prepare(work: Path, name: str) -> Path:
    """W_NAME with W's teacher (a link) and W's codec and discriminator (copies)."""
    w = arm_dir(work, name)
    w.mkdir(parents=True, exist_ok=True)
    if not (work / "causal").is_dir():
        raise SystemExit(f"{work / 'causal'} is missing: run the recipe's causal phase first")
    link = w / "causal"
    if not link.exists():
        link.symlink_to((work / "causal").resolve(), target_is_directory=True)
    for f in FILES:
        if (work / f).is_file():
            shutil.copyfile(work / f, w / f)
    return w


def launch(args: list[str], w: Path, out: Path, log: Path, preset: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OUT": str(out)}
    return subprocess.Popen([sys.executable, str(RECIPE), *args, "--work", str(w), "--preset", preset], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait(procs: dict[str, subprocess.Popen], logs: dict[str, Path]) -> dict[str, int]:
    codes = {name: p.wait() for name, p in procs.items()}
    for name, code in codes.items():
        if code:
            print(f"{name}: exit {code}; its log ends:\n" + "".join(logs[name].read_text().splitlines(True)[-15:]))
    return codes


def train(a) -> dict:
    arms = [parse_arm(s) for s in a.arms]
    procs, logs = {}, {}
    for name, pcm, sync, g in arms:
        w = prepare(a.work, name)
        logs[name] = w / "distill.log"
        procs[name] = launch(["--phase", "distill", "--minutes", str(a.minutes), "--steps", str(a.steps),
                              "--workers", str(a.workers), "--pcm-weight", str(pcm), "--sync-weight", str(sync),
                              *(["--guidance", str(g)] if g is not None else [])],
                             w, w / "out", logs[name], a.preset)
    codes = wait(procs, logs)
    res = {}
    for name, pcm, sync, g in arms:
        f = arm_dir(a.work, name) / "out" / "recipe_distill.json"
        res[name] = {"pcm_weight": pcm, "sync_weight": sync, "guidance": g, "exit": codes[name],
                     **({k: v for k, v in json.loads(f.read_text()).items() if k != "loss_curve"}
                        if f.is_file() and not codes[name] else {})}
    return res


def train_table(res: dict) -> str:
    lines = ["| arm | pcm | sync | guidance | steps | s / step | " + " | ".join(KEYS) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(KEYS)]
    for name, r in res.items():
        if "train" not in r:
            lines.append(f"| {name} | {r['pcm_weight']:g} | {r['sync_weight']:g} | {r['guidance']} | failed ({r['exit']}) |")
            continue
        t = r["train"]
        cells = [(f"{r['loss_first'][k]:.4g} -> {r['loss_last_10pct'].get(k, float('nan')):.4g}"
                  if k in r["loss_first"] else "-") for k in KEYS]
        lines.append(f"| {name} | {r['pcm_weight']:g} | {r['sync_weight']:g} | {r['settings']['dmd']['guidance']:g} | {t['steps']} | "
                     f"{t['train_s'] / max(1, t['steps'] - (t['resumed_from'] or 0)):.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


KEYS = ("loss_dmd", "loss_pcm", "loss_sync", "loss_critic", "gnorm_dmd", "gnorm_pcm", "gnorm_sync")


def evaluate(a, out: Path) -> dict:
    """Each model through the bench in turn; out/arms_eval.json is rewritten after each (a run cut short keeps
    the models it finished)."""
    runs = [(name, arm_dir(a.work, name), ["--teacher", "student"]) for name in a.arms]
    if a.teacher_steps:
        runs.append((f"teacher@{a.teacher_steps}", a.work, ["--teacher", "causal", "--stream-steps", str(a.teacher_steps)]))
    res = {}
    for name, w, extra in runs:                        # one at a time: each fills the GPU with its streams
        own = w / f"eval_{name.replace('@', '_')}"
        log = w / f"eval_{name.replace('@', '_')}.log"
        t0 = time.perf_counter()
        code = wait({name: launch(["--phase", "eval", "--cases", str(a.cases), "--streams", str(a.streams),
                                   "--workers", str(a.workers), *extra], w, own, log, a.preset)}, {name: log})[name]
        f = own / "recipe_eval.json"
        res[name] = ({"summary": json.loads(f.read_text())["summary"], "eval_s": time.perf_counter() - t0,
                      "scores": str(f)} if f.is_file() and not code else {"exit": code})
        (out / "arms_eval.json").write_text(json.dumps(res, indent=1, default=str))
    students = [n for n in a.arms if "summary" in res[n]]
    if students and a.ship:
        best = max(students, key=lambda n: res[n]["summary"]["mouth_r"])
        shutil.copytree(arm_dir(a.work, best) / "student", out / "student", dirs_exist_ok=True)
        shutil.copyfile(res[best]["scores"], out / "recipe_eval.json")
        res["shipped"] = best
    return res


def num(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def eval_table(res: dict) -> str:
    lines = ["| model | lip-sync r | mismatched abs r | instructions | spurious / min | identity error | fps |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        if name == "shipped":
            continue
        if "summary" not in r:
            lines.append(f"| {name} | failed ({r['exit']}) |")
            continue
        s = r["summary"]
        cells = [num(s["mouth_r"], 3), num(s["mouth_abs_r_control"], 3),
                 "-" if s["instr_success"] is None else f"{100 * s['instr_success']:.1f} %",
                 num(s["spurious_per_min"], 1), num(s["identity_error"], 2), num(s["stream_fps"], 1)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("train", "eval"))
    ap.add_argument("--work", type=Path, required=True, help="the recipe's work folder holding the causal teacher")
    ap.add_argument("--arms", nargs="+", required=True, help="train: NAME:PCM:SYNC; eval: NAME")
    ap.add_argument("--minutes", type=float, default=9.0)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--workers", type=int, default=5, help="clip-rendering processes per arm")
    ap.add_argument("--cases", type=int, default=48)
    ap.add_argument("--streams", type=int, default=12)
    ap.add_argument("--teacher-steps", type=int, default=0, help="eval: also the teacher at this many steps")
    ap.add_argument("--ship", action="store_true", help="eval: copy the best lip-sync student to $OUT")
    ap.add_argument("--preset", default="small", help="the recipe's preset (tiny: the CPU rehearsal)")
    a = ap.parse_args(argv)
    out = Path(os.environ.get("OUT") or a.work / "out")
    out.mkdir(parents=True, exist_ok=True)
    res = train(a) if a.mode == "train" else evaluate(a, out)
    (out / f"arms_{a.mode}.json").write_text(json.dumps(res, indent=1, default=str))
    print(train_table(res) if a.mode == "train" else eval_table(res))
    return res


if __name__ == "__main__":
    main()
