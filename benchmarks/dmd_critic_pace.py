"""How fast must DMD's critic (the fake score) follow the student? The CPU rehearsal of issue 17's
GPU question (sessions 30-32: the DMD loss does not trend, and a warm student gets worse with more
steps), on tests/test_distill_gap.py's world: the tiny teacher trained in that test, its 16-step ODE
samples as the reference, the Fréchet gap of a fixed random projection (384 frames a side).

Runs (200 DMD steps each from the teacher unless warm; student lr 3e-5, batch 1, 3-chunk rollouts):
- critic lr / student lr = 67 (the test's 2e-3), 2 (the GPU recipe's old ratio: 6e-5), 4 (its new one) and 10;
  critic updates per generator step 1 or 5 (DMD2's two-time-scale rule);
- warm: the 67x student after 200 steps continued for 200 more with a fresh critic (the teacher's
  copy) and a fresh optimizer, with and without 50 critic-only steps first (what the GPU recipe's
  --init-student does).

    python benchmarks/dmd_critic_pace.py [--steps 200] [--out results.json]

Prints the gap at every 50 steps and a table last. One thread (as the test), ~1 min a run on a
2-core CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.distill.dmd import DMDSettings  # noqa: E402
from stages.distill.loop import Distiller, DistillSettings  # noqa: E402
from stages.train.sample import sampling_record  # noqa: E402
from tests.test_distill import TINY, conditions  # noqa: E402
from tests.test_distill_gap import CHUNKS, features, frechet, trained_teacher  # noqa: E402

STUDENT_LR = 3e-5
EVERY = 50


def run(teacher, record, target, steps: int, critic_lr: float, updates: int, tmp: Path, warm: dict | None = None,
        critic_warmup: int = 0) -> tuple[list, Distiller]:
    ref, text, audio = conditions(chunks=CHUNKS, batch=1)
    batch = {"ref": ref, "text": text, "audio": audio}
    st = DistillSettings(steps=steps + critic_warmup, batch=1, chunks=CHUNKS, warmup=10, lr=STUDENT_LR,
                         critic_lr=critic_lr, critic_updates=updates, critic_warmup=critic_warmup,
                         dmd=DMDSettings(guidance=1.0))
    dst = Distiller(teacher, TINY, record, st, tmp, lambda step: batch)
    if warm is not None:                     # the previous student and its EMA, as --init-student loads them
        dst.student.load_state_dict(warm)
        dst.ema = {k: v.detach().clone().float() for k, v in dst.student.named_parameters()}
    gaps = [(0, frechet(target, features(dst.student, dst.stream, seed=2)))]
    while dst.step < st.steps:
        dst.train_step()
        if dst.step % EVERY == 0:
            gaps.append((dst.step, frechet(target, features(dst.student, dst.stream, seed=2))))
            print(f"  step {dst.step}: gap {gaps[-1][1]:.3f}", flush=True)
    return gaps, dst


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    record = sampling_record(TINY, "causal", 2.0, 1, 0.5, None)
    teacher = trained_teacher(record)
    tmp = Path(tempfile.mkdtemp())
    probe = Distiller(teacher, TINY, record, DistillSettings(steps=1, batch=1, chunks=CHUNKS), tmp / "p",
                      lambda s: None)
    many = dataclasses.replace(probe.stream, steps=16, sampler="euler", twin=False)
    target = features(teacher, many, seed=1)
    floor = frechet(target, features(teacher, many, seed=2))
    rows = []
    base = None
    for ratio, updates in ((67, 1), (2, 1), (2, 5), (4, 5), (10, 1), (10, 5)):
        t0 = time.perf_counter()
        print(f"critic lr {ratio}x, {updates} update(s)", flush=True)
        gaps, dst = run(teacher, record, target, args.steps, ratio * STUDENT_LR, updates, tmp / f"r{ratio}-{updates}")
        rows.append({"run": f"fresh, critic {ratio}x, {updates} update(s)", "gaps": gaps, "s": time.perf_counter() - t0})
        if (ratio, updates) == (67, 1):
            base = {k: v.detach().clone() for k, v in dst.student.state_dict().items()}
    for cw in (0, 50):
        t0 = time.perf_counter()
        print(f"warm from the 67x student, {cw} critic-only steps", flush=True)
        gaps, _ = run(teacher, record, target, args.steps, 67 * STUDENT_LR, 1, tmp / f"warm{cw}", warm=base,
                      critic_warmup=cw)
        rows.append({"run": f"warm (+{args.steps}), critic 67x, {cw} critic-only steps", "gaps": gaps,
                     "s": time.perf_counter() - t0})
    res = {"floor": floor, "steps": args.steps, "student_lr": STUDENT_LR, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    steps = sorted({s for r in rows for s, _ in r["gaps"]})
    print(f"\nFréchet gap to the teacher's 16-step samples (floor {floor:.3f}); student lr {STUDENT_LR:g}")
    print("| run | " + " | ".join(f"step {s}" for s in steps) + " | s |")
    print("|---|" + "---|" * (len(steps) + 1))
    for r in rows:
        g = dict(r["gaps"])
        print(f"| {r['run']} | " + " | ".join(f"{g[s]:.3f}" if s in g else "" for s in steps) + f" | {r['s']:.0f} |")
    return res


if __name__ == "__main__":
    main()
