"""Curation throughput on the CPU: the whole chain prefilter | clip | filter | diarize | caption |
embed over ../shared/media repeated `--repeat` times.

Run: .venv/bin/python benchmarks/curation.py [--repeat 5] [--workers 1] [--out results.json]
Reports, per stage, items per minute and seconds of media processed per CPU-second (per core),
from the process's and its children's CPU time, with one thread per worker. prefilter and clip
count the source videos' seconds; the later stages the seconds of the clips they were given.
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
from stages.caption import Caption  # noqa: E402
from stages.clip import Clip  # noqa: E402
from stages.diarize import Diarize  # noqa: E402
from stages.embed import Embed  # noqa: E402
from stages.filter import Filter  # noqa: E402
from stages.prefilter import Prefilter, discover, fingerprint  # noqa: E402
from stages.run import run_stage  # noqa: E402

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
        result = {"date": time.strftime("%Y-%m-%d"),
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  "workers": args.workers, "stages": {}}
        stats = result["stages"]
        stats["prefilter"] = _stats(len(items), seconds, pre_wall, pre_cpu, pre.counts)
        stats["clip"] = _stats(len(clip_items), seconds, clip_wall, clip_cpu, clip.counts)
        previous = clip
        for stage in (Filter(), Diarize(), Caption(), Embed(preset="tiny", out=str(Path(tmp) / "samples"))):
            todo = [r for r in read_manifest(previous.path)[0].to_pylist() if r["status"] == "ok"]
            clip_seconds = sum(r["end_s"] - r["start_s"] for r in todo)
            previous, wall, cpu = measure(stage.name, lambda: run_stage(
                stage, todo, [stage.name], ["bench"], root, workers=args.workers, quiet=True))
            stats[stage.name] = _stats(len(todo), clip_seconds, wall, cpu, previous.counts)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(f"{len(items)} videos, {seconds:.0f} s of video, {args.workers} worker(s)")
    print(f"{'stage':<10} {'items':>6} {'media s':>8} {'wall s':>8} {'cpu s':>8} {'items/min':>10} {'x realtime/core':>16}  out")
    for k, r in stats.items():
        print(f"{k:<10} {r['items']:>6} {r['media_s']:>8} {r['wall_s']:>8} {r['cpu_s']:>8} {r['items_per_min']:>10} "
              f"{r['x_realtime_per_core']:>16}  {r['out']}")


def _stats(items: int, media_s: float, wall: float, cpu: float, counts: dict) -> dict:
    return {"items": items, "media_s": round(media_s, 1), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "items_per_min": round(60 * items / wall, 1), "x_realtime_per_core": round(media_s / cpu, 2),
            "out": dict(sorted(counts.items()))}


if __name__ == "__main__":
    main()
