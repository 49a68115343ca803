"""Issue 15's evidence precondition: at the model's native size (256x256, 25 fps), does the scorer find
the ground-truth faces (>= 0.99 of frames) and does its mouth measure follow the ground-truth mouth
track (r >= 0.9)? Scored on held-out world clips (split "eval", seeds from the synth bench's
HELD_OUT_BASE), per character style, by the two readers the eval code has:

- dlib: `vidu eval`'s path (stages/eval/video.py `_score`: track_face(small_faces=True) on frames
  at analysis size <= 320, face_found over detection frames; mouth = sync.lip_aperture, the
  outer-lip height over the eye distance, r over the frames with a face);
- synth: the synth bench's path (stages/eval/bench/synthscore.py: stages.synth.analyze knowing the
  identity; found per frame; mouth r with frames without a face as a closed mouth).

    nice -n 10 python benchmarks/eval_precondition.py --per-style 8 --seconds 8     # ~minutes on 2 cores

Prints one JSON line per clip on stdout (progress on stderr), then a table per style.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def dlib_reading(frames: np.ndarray) -> tuple[float, np.ndarray]:
    """(face_found as vidu eval reports it, mouth per frame (nan without a face))."""
    from stages.eval.metrics.sync import lip_aperture
    from stages.eval.video import analysis_size
    from stages.sense.mouth import track_face
    small = analysis_size(frames, 320)  # EvalOptions.max_side
    t = track_face(small, small_faces=True)
    mouth = lip_aperture(t.landmarks.astype(np.float64))
    mouth[~np.isfinite(mouth)] = np.nan
    return float(t.found[t.detected].mean()), mouth


def r_over(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = np.isfinite(a)
    if ok.sum() < 3 or np.std(a[ok]) < 1e-9 or np.std(b[ok]) < 1e-9:
        return None
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def score_clip(seed: int, style: str, seconds: float) -> dict:
    from stages.eval.bench.synthscore import _finite, pearson
    from stages.synth import analyze, make_sample
    t0 = time.perf_counter()
    s = make_sample(seed, 256, 256, 25, seconds, style=style, split="eval")
    gt = np.asarray(s.tracks["mouth"], np.float64)
    t1 = time.perf_counter()
    found_d, mouth_d = dlib_reading(s.frames)
    t2 = time.perf_counter()
    m = analyze(s.frames, s.identity)
    t3 = time.perf_counter()
    return {"seed": seed, "style": style, "frames": len(s.frames), "gt_mouth_std": float(gt.std()),
            "dlib_face_found": found_d, "dlib_mouth_r": r_over(mouth_d, gt),
            "synth_face_found": float(np.mean(m["found"])), "synth_mouth_r": pearson(_finite(m["mouth"]), gt),
            "secs": {"render": round(t1 - t0, 1), "dlib": round(t2 - t1, 1), "synth": round(t3 - t2, 1)}}


def summary(rows: list[dict]) -> list[str]:
    def stat(vals):
        v = np.array([x for x in vals if x is not None], np.float64)
        return f"{v.mean():.3f} / {v.min():.3f} ({len(v)})" if len(v) else "n/a"

    out = [("| style | clips | dlib face_found mean / min | dlib mouth r mean / min (clips) | "
            "synth face_found mean / min | synth mouth r mean / min (clips) |"), "|---|---|---|---|---|---|"]
    for style in sorted({r["style"] for r in rows}) + ["all"]:
        rs = [r for r in rows if style in ("all", r["style"])]
        out.append(f"| {style} | {len(rs)} | {stat([r['dlib_face_found'] for r in rs])} | "
                   f"{stat([r['dlib_mouth_r'] for r in rs])} | {stat([r['synth_face_found'] for r in rs])} | "
                   f"{stat([r['synth_mouth_r'] for r in rs])} |")
    return out


def main() -> None:
    from stages.eval.bench.cases import HELD_OUT_BASE
    from stages.synth import STYLES
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-style", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    a = ap.parse_args()
    rows = []
    for k, style in enumerate(STYLES):
        for i in range(a.per_style):
            r = score_clip(HELD_OUT_BASE + k * 1000 + i, style, a.seconds)
            rows.append(r)
            print(json.dumps(r), flush=True)
            print(f"{style} {i}: {r['secs']}", file=sys.stderr, flush=True)
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
