"""The lip-sync proxy of `vidu eval` (stages/eval/metrics/sync.py) on the five real talking-head clips
of ../shared/media/talking: each clip's video against its own audio, its audio delayed by 0.5 s, and
the next clip's audio (clip 5: clip 1's; zero-padded to length); and, with `--derived`, the clip made
9:16 portrait by padding, upscaled to 1080p (1080 x 1080 pillarboxed to 1920 x 1080), and re-timed to
30 fps, each scored against its own audio. The video goes through the same path as `vidu eval`
(25 fps grid, analysis size 320, stages/sense/mouth.py track).

Run: nice .venv/bin/python benchmarks/sync_proxy.py [--derived] [--json out.json]
Prints one row per clip: offset (frames, + = audio late), confidence (peak - median r), distance.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.eval.metrics.sync import PROXY, score_sync  # noqa: E402
from stages.eval.video import EvalOptions, analysis_size, decode_video, load_wave  # noqa: E402
from stages.sense.mouth import FACE_FPS, track_face  # noqa: E402

TALKING = Path(__file__).resolve().parents[2] / "shared" / "media" / "talking"
DELAY = 8000  # samples: 0.5 s at 16 kHz


def landmarks(frames: np.ndarray) -> np.ndarray:
    return track_face(analysis_size(frames, EvalOptions().max_side), small_faces=True).landmarks


def portrait(frames: np.ndarray) -> np.ndarray:
    H, W = frames.shape[1:3]
    Hp = (W * 16 // 9) // 2 * 2
    top = (Hp - H) // 2
    return np.pad(frames, ((0, 0), (top, Hp - H - top), (0, 0), (0, 0)))


def upscaled(frames: np.ndarray) -> np.ndarray:
    """Each frame to 1080 x 1080, pillarboxed to 1920 x 1080, then to the analysis size (one at a time)."""
    import cv2

    out = [analysis_size(np.pad(cv2.resize(f, (1080, 1080), interpolation=cv2.INTER_CUBIC),
                                ((0, 0), (420, 420), (0, 0)))[None], EvalOptions().max_side)[0] for f in frames]
    return np.stack(out)


def retimed(frames: np.ndarray) -> np.ndarray:
    """25 -> 30 fps (frames repeated) and back onto the 25 fps grid as score_frames does (latest shown)."""
    T = len(frames)
    f30 = frames[np.minimum(np.arange(int(T / 25 * 30)) * 25 // 30, T - 1)]
    n = int(np.floor(len(f30) / 30 * FACE_FPS + 1e-6))
    return f30[np.minimum(np.floor(np.arange(n) / FACE_FPS * 30 + 1e-6).astype(int), len(f30) - 1)]


def fields(s: dict) -> dict:
    return {k: s[k] for k in ("sync_offset_frames", "sync_confidence", "sync_distance")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--derived", action="store_true", help="also the portrait, 1080p and 30 fps versions")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    clips = sorted(TALKING.glob("retalking_*.mp4"))
    waves = [load_wave(c) for c in clips]
    rows = []
    t0 = time.time()
    for i, clip in enumerate(clips):
        frames, _ = decode_video(clip, 1500)  # native size
        lm = landmarks(frames)
        wave, other = waves[i], waves[(i + 1) % len(clips)]
        foreign = np.zeros_like(wave)
        foreign[: min(len(wave), len(other))] = other[: len(wave)]
        row = {"clip": clip.name, "frames": len(frames),
               "own": fields(score_sync(lm, wave)),
               "delayed": fields(score_sync(lm, np.r_[np.zeros(DELAY, np.float32), wave])),
               "foreign": fields(score_sync(lm, foreign))}
        if args.derived:
            row["portrait"] = fields(score_sync(landmarks(portrait(frames)), wave))
            row["1080p"] = fields(score_sync(landmarks(upscaled(frames)), wave))
            row["30fps"] = fields(score_sync(landmarks(retimed(frames)), wave))
        rows.append(row)
        show(row)
    print(f"{PROXY}: {time.time() - t0:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def show(row: dict) -> None:
    def f(d: dict) -> str:
        if d["sync_offset_frames"] is None:
            return "none"
        return f"{d['sync_offset_frames']:+3d} c{d['sync_confidence']:.2f} d{d['sync_distance']:.2f}"
    cols = [k for k in ("own", "delayed", "foreign", "portrait", "1080p", "30fps") if k in row]
    print(f"{row['clip']:18s} " + " | ".join(f"{k} {f(row[k])}" for k in cols), flush=True)


if __name__ == "__main__":
    main()
