"""Curation throughput on the CPU: prefilter and clip over ../shared/media repeated to >= 5 min.

Run: .venv/bin/python benchmarks/curation.py [--repeat 5] [--workers 1] [--out results.json]
Reports videos per minute and seconds of video processed per CPU-second (per core), from the
process's and its children's CPU time, with one thread per worker.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from manifests.io import read_manifest, workspace  # noqa: E402
from stages.clip import Clip  # noqa: E402
from stages.prefilter import Prefilter, discover, fingerprint  # noqa: E402
from stages.runner import run_stage  # noqa: E402

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def measure(name, fn):
    w0, c0 = time.perf_counter(), cpu_seconds()
    out = fn()
    return out, time.perf_counter() - w0, cpu_seconds() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    videos = sorted(p for p in MEDIA.rglob("*") if p.suffix in (".mp4", ".webm"))
    if not videos:
        sys.exit(f"no media under {MEDIA}")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "media"
        src.mkdir()
        for k in range(args.repeat):
            for v in videos:
                (src / f"{k}_{v.name}").symlink_to(v)
        root = workspace(Path(tmp) / "w")
        items = discover([str(src)])
        pre, pre_wall, pre_cpu = measure("prefilter", lambda: run_stage(
            Prefilter(min_short_side=0), items, fingerprint(items), [str(src)], root, workers=args.workers, quiet=True))
        rows = read_manifest(pre.path)[0].to_pylist()
        seconds = sum(r["video_duration_s"] for r in rows)
        clip_items = [{"id": r["id"], "path": r["path"]} for r in rows]  # all copies, duplicates included
        clip, clip_wall, clip_cpu = measure("clip", lambda: run_stage(
            Clip(), clip_items, ["bench"], ["bench"], root, workers=args.workers, quiet=True))
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "workers": args.workers, "videos": len(items), "video_seconds": round(seconds, 1),
        "prefilter": {"wall_s": round(pre_wall, 2), "cpu_s": round(pre_cpu, 2),
                      "videos_per_min": round(60 * len(items) / pre_wall, 1),
                      "x_realtime_per_core": round(seconds / pre_cpu, 1)},
        "clip": {"wall_s": round(clip_wall, 2), "cpu_s": round(clip_cpu, 2),
                 "videos_per_min": round(60 * len(items) / clip_wall, 1),
                 "x_realtime_per_core": round(seconds / clip_cpu, 1)},
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(f"{len(items)} videos, {seconds:.0f} s of video, {args.workers} worker(s)")
    print(f"{'stage':<10} {'wall s':>8} {'cpu s':>8} {'videos/min':>11} {'x realtime/core':>16}")
    for k in ("prefilter", "clip"):
        r = result[k]
        print(f"{k:<10} {r['wall_s']:>8} {r['cpu_s']:>8} {r['videos_per_min']:>11} {r['x_realtime_per_core']:>16}")


if __name__ == "__main__":
    main()
