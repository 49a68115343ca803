"""`vidu clip`: split each kept video into single-shot clips that never cut inside speech.

Shots come from PySceneDetect (AdaptiveDetector by default); speech from silero-vad on the
16 kHz mono audio. A shot longer than `max_len` is split at silent frames, as evenly as
possible (fewest pieces, then least squared deviation from equal lengths, by dynamic
programming over candidate cut frames); when no split through silence exists the shot is cut at
its longest pause (flagged `longest_pause`), or, with no pause at all, at the middle (flagged
`forced_in_speech`). Pieces shorter than `min_len` stay in the manifest as rejected `too_short`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from stages.sense.media import ffmpeg_exe, keyframe_times, load_audio, video_frame_count
from stages.run import Stage, base_row
from stages.sense.speech import load_vad, speech_segments

DETECTORS = ("adaptive", "content", "threshold", "histogram", "hash")


def _detector(name: str, threshold: float | None):
    import scenedetect as sd

    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    cls, arg = {"adaptive": (sd.AdaptiveDetector, "adaptive_threshold"), "content": (sd.ContentDetector, "threshold"),
                "threshold": (sd.ThresholdDetector, "threshold"), "histogram": (sd.HistogramDetector, "threshold"),
                "hash": (sd.HashDetector, "threshold")}[name]
    return cls(**({arg: threshold} if threshold is not None else {}))


def detect_shots(path: str, detector: str = "adaptive", threshold: float | None = None) -> tuple[list[tuple[int, int]], float]:
    """Shots as [start_frame, end_frame) and the frame rate PySceneDetect counts frames at."""
    import scenedetect as sd

    video = sd.open_video(path, backend="opencv")
    manager = sd.SceneManager()
    manager.add_detector(_detector(detector, threshold))
    manager.detect_scenes(video)
    fps = float(video.frame_rate)
    total = video.frame_number  # frames actually read
    cuts = [s.frame_num for s, _ in manager.get_scene_list(start_in_scene=True)[1:]]
    bounds = [0] + [c for c in cuts if 0 < c < total] + [total]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a], fps


def silent_intervals(start: int, end: int, fps: float, speech: list[tuple[float, float]],
                     margin: float) -> list[tuple[int, int]]:
    """Frame ranges [a, b] strictly inside (start, end) at least `margin` seconds from any speech."""
    out = []
    edges = [(-math.inf, start / fps - margin)] + sorted(speech) + [(end / fps + margin, math.inf)]
    for (_, prev_end), (next_start, _) in zip(edges, edges[1:]):
        a = max(start + 1, math.ceil((prev_end + margin) * fps - 1e-9))
        b = min(end - 1, math.floor((next_start - margin) * fps + 1e-9))
        if a <= b:
            out.append((a, b))
    return out


def _even_cuts(start: int, end: int, cands: list[int], max_frames: int) -> list[int] | None:
    """Fewest pieces of at most max_frames, then least sum of squared lengths; None if impossible."""
    pts = [start] + sorted(set(c for c in cands if start < c < end)) + [end]
    best: list[tuple[int, float] | None] = [None] * len(pts)
    prev = [-1] * len(pts)
    best[0] = (0, 0.0)
    lo = 0
    for j in range(1, len(pts)):
        while pts[j] - pts[lo] > max_frames:
            lo += 1
        for i in range(lo, j):
            if best[i] is not None:
                cand = (best[i][0] + 1, best[i][1] + float(pts[j] - pts[i]) ** 2)
                if best[j] is None or cand < best[j]:
                    best[j], prev[j] = cand, i
    if best[-1] is None:
        return None
    cuts, j = [], prev[-1]
    while j > 0:
        cuts.append(pts[j])
        j = prev[j]
    return sorted(cuts)


def plan_cuts(start: int, end: int, fps: float, speech: list[tuple[float, float]], max_len: float,
              margin: float = 0.1) -> list[tuple[int, str]]:
    """Cut frames inside (start, end) that make every piece at most max_len seconds, with the
    reason of each cut: silence | longest_pause | forced_in_speech."""
    max_frames = max(1, int(math.floor(max_len * fps + 1e-9)))
    length = end - start
    if length <= max_frames:
        return []
    gaps = silent_intervals(start, end, fps, speech, margin)
    cands: list[int] = []
    m_min = math.ceil(length / max_frames)
    for a, b in gaps:
        cands += [a, b, (a + b) // 2]
        for m in (m_min, m_min + 1, m_min + 2):
            cands += [min(b, max(a, round(start + k * length / m))) for k in range(1, m)]
    cuts = _even_cuts(start, end, cands, max_frames)
    if cuts is not None:
        return [(c, "silence") for c in cuts]
    # no split through silence: cut at the longest pause between speech (or mid-shot) and recurse
    inner = [(s, e) for s, e in sorted(speech) if e > start / fps and s < end / fps]
    pauses = [(b_s - a_e, (a_e + b_s) / 2) for (_, a_e), (b_s, _) in zip(inner, inner[1:]) if b_s > a_e]
    pauses = [(w, t) for w, t in pauses if start < round(t * fps) < end]
    if pauses:
        cut, reason = round(max(pauses)[1] * fps), "longest_pause"
    else:
        cut, reason = start + length // 2, "forced_in_speech"
    return (plan_cuts(start, cut, fps, speech, max_len, margin) + [(cut, reason)]
            + plan_cuts(cut, end, fps, speech, max_len, margin))


def _overlap(segments: list[tuple[float, float]], a: float, b: float) -> list[tuple[float, float]]:
    return [(max(s, a), min(e, b)) for s, e in segments if min(e, b) > max(s, a)]


@dataclass
class Clip(Stage):
    name: ClassVar[str] = "clip"
    kind: ClassVar[str] = "clips"
    version: ClassVar[str] = "1"
    reads: ClassVar[tuple[str, ...]] = ("id", "path")
    writes: ClassVar[tuple[str, ...]] = (
        "clip_index", "shot_index", "start_s", "end_s", "start_frame", "end_frame", "fps", "duration_s", "speech_s",
        "speech_coverage", "speech_segments", "cut_reasons", "clip_path", "cut_method")

    detector: str = "adaptive"
    threshold: float | None = None
    max_len: float = 60.0
    min_len: float = 3.0
    cut_margin: float = 0.1  # seconds of silence kept between a cut and the nearest speech
    vad_threshold: float = 0.5
    materialize: str | None = None

    def setup(self) -> None:
        _detector(self.detector, self.threshold)  # fail early on a bad option
        self._vad = load_vad()

    def error_row(self, item: dict, message: str) -> dict:
        return base_row("clips", id=f"{item['id']}_error", parent_id=item["id"], video_path=item["path"],
                        clip_index=-1, shot_index=-1, start_s=0.0, end_s=0.0, start_frame=0, end_frame=0,
                        fps=0.0, duration_s=0.0)

    def process(self, item: dict) -> list[dict]:
        path = item["path"]
        shots, fps = detect_shots(path, self.detector, self.threshold)
        speech = speech_segments(self._vad, load_audio(path), threshold=self.vad_threshold)
        rows = []
        for shot_index, (s, e) in enumerate(shots):
            cuts = plan_cuts(s, e, fps, speech, self.max_len, self.cut_margin)
            bounds = [(s, "video_start" if s == 0 else "shot_boundary")] + cuts
            bounds += [(e, "video_end" if shot_index == len(shots) - 1 else "shot_boundary")]
            for (a, why_a), (b, why_b) in zip(bounds, bounds[1:]):
                rows.append(self._row(item, len(rows), shot_index, a, b, fps, speech, [why_a, why_b]))
        if self.materialize:
            self._materialize(path, [r for r in rows if r["status"] == "ok"])
        return rows

    def _row(self, item, index, shot_index, a, b, fps, speech, why) -> dict:
        t0, t1 = a / fps, b / fps
        inside = _overlap(speech, t0, t1)
        speech_s = sum(e - s for s, e in inside)
        row = base_row("clips", id=f"{item['id']}_{index:04d}", parent_id=item["id"], video_path=item["path"],
                       clip_index=index, shot_index=shot_index, start_s=t0, end_s=t1, start_frame=a, end_frame=b,
                       fps=fps, duration_s=t1 - t0, speech_s=speech_s, speech_coverage=speech_s / max(t1 - t0, 1e-9),
                       speech_segments=[{"start": s, "end": e} for s, e in inside], cut_reasons=why)
        if t1 - t0 < self.min_len - 1e-9:
            row.update(status="rejected", reasons=["too_short"])
        return row

    def _materialize(self, path: str, rows: list[dict]) -> None:
        """Write each clip with exactly its frames: stream copy when both ends fall on keyframes
        and the copy has the right frame count, else a re-encode cut at the exact frame."""
        out_dir = Path(self.materialize)
        out_dir.mkdir(parents=True, exist_ok=True)
        keys = keyframe_times(path)
        for r in rows:
            n, half = r["end_frame"] - r["start_frame"], 0.5 / r["fps"]
            at_key = any(abs(k - r["start_s"]) < half for k in keys)
            end_ok = r["cut_reasons"][1] == "video_end" or any(abs(k - r["end_s"]) < half for k in keys)
            target, tmp = out_dir / f"{r['id']}.mp4", out_dir / f".{r['id']}.tmp.mp4"
            method = "copy"
            if not (at_key and end_ok and _cut(path, tmp, r, "copy") == n):
                method = "reencode"
                got = _cut(path, tmp, r, "reencode")
                if got != n:
                    tmp.unlink(missing_ok=True)
                    raise RuntimeError(f"clip {r['id']}: ffmpeg wrote {got} frames, expected {n}")
            os.replace(tmp, target)
            r.update(clip_path=str(target), cut_method=method)


def _cut(path: str, out: Path, r: dict, method: str) -> int:
    """Cut one clip with ffmpeg; returns the number of video frames written."""
    import ffmpeg

    stream = ffmpeg.input(path, ss=f"{r['start_s']:.6f}")
    if method == "copy":
        stream = stream.output(str(out), t=f"{r['duration_s']:.6f}", c="copy", avoid_negative_ts="make_zero")
    else:
        stream = stream.output(str(out), t=f"{r['duration_s']:.6f}", **{
            "frames:v": r["end_frame"] - r["start_frame"], "c:v": "libx264", "preset": "veryfast", "crf": 18,
            "pix_fmt": "yuv420p", "c:a": "aac"})
    try:
        stream.overwrite_output().run(cmd=ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as e:
        out.unlink(missing_ok=True)
        last = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["ffmpeg failed"]
        raise RuntimeError(f"ffmpeg could not cut {r['id']}: {last[0]}") from None
    return video_frame_count(out)
