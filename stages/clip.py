"""`vidu clip`: split each kept video into single-shot clips that never cut inside speech.

Shots come from PySceneDetect (AdaptiveDetector by default); speech from silero-vad on the
16 kHz mono audio. A shot longer than `max_len` is split at silent frames, as evenly as
possible (fewest pieces, then least squared deviation from equal lengths, by dynamic
programming over candidate cut frames); when no split through silence exists the shot is cut at
its longest pause (flagged `longest_pause`), or, with no pause at all, at the middle (flagged
`forced_in_speech`). Pieces shorter than `min_len` stay in the manifest as rejected `too_short`.

Frame i is the i-th decoded frame in presentation order (PySceneDetect's count); a clip's
`start_s` / `end_s` are the presentation times of its first frame and of the frame after its last
(stages.sense.media.VideoIndex: start offsets and variable frame rates included). `--materialize`
writes exactly those frames: a packet copy when the clip starts on a keyframe and ends on one (or
at the end) and the copy decodes to the same frames, else a re-encode of the decoded frames at
their own timestamps; the audio under them goes along.
"""
from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import ClassVar

import av
import numpy as np

from stages.sense.media import VideoIndex, VideoWriter, load_audio, open_container, video_index
from stages.run import Stage, base_row, ranged
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


@contextmanager
def _utf8_name(path: str):
    """`path`, or a symlink to it with a UTF-8 name: OpenCV crashes on a name that is not UTF-8
    (b"caf\\xe9.mp4", which arrives surrogate-escaped)."""
    try:
        path.encode("utf-8")
        utf8 = True
    except UnicodeEncodeError:
        utf8 = False
    if utf8:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="vidu-") as d:
        link = os.path.join(d, "video")
        os.symlink(os.path.abspath(path), link)
        yield link


def detect_shots(path: str, detector: str = "adaptive", threshold: float | None = None) -> tuple[list[tuple[int, int]], float]:
    """Shots as [start_frame, end_frame) and the frame rate PySceneDetect counts frames at."""
    import scenedetect as sd

    with _utf8_name(path) as name:
        video = sd.open_video(name, backend="opencv")
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

    detector: str = ranged("adaptive", choices=DETECTORS)
    threshold: float | None = ranged(None, min=0)
    max_len: float = ranged(60.0, min=0)
    min_len: float = ranged(3.0, min=0)
    cut_margin: float = ranged(0.1, min=0)  # seconds of silence kept between a cut and the nearest speech
    vad_threshold: float = ranged(0.5, min=0, max=1)
    materialize: str | None = None

    def __post_init__(self):
        if not self.min_len < self.max_len:
            raise ValueError(f"--min-len ({self.min_len:g} s) must be below --max-len ({self.max_len:g} s)")

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
        index = video_index(path)
        if shots and shots[-1][1] != len(index):
            raise RuntimeError(f"PySceneDetect read {shots[-1][1]} frames, the video stream holds {len(index)}")
        speech = speech_segments(self._vad, load_audio(path), threshold=self.vad_threshold)
        rows = []
        for shot_index, (s, e) in enumerate(shots):
            cuts = plan_cuts(s, e, fps, speech, self.max_len, self.cut_margin)
            bounds = [(s, "video_start" if s == 0 else "shot_boundary")] + cuts
            bounds += [(e, "video_end" if shot_index == len(shots) - 1 else "shot_boundary")]
            for (a, why_a), (b, why_b) in zip(bounds, bounds[1:]):
                rows.append(self._row(item, len(rows), shot_index, a, b, index, fps, speech, [why_a, why_b]))
        if self.materialize:
            self._materialize(path, index, [r for r in rows if r["status"] == "ok"])
        return rows

    def _row(self, item, n, shot_index, a, b, index: VideoIndex, fps, speech, why) -> dict:
        t0, t1 = index.time(a), index.time(b)
        inside = _overlap(speech, t0, t1)
        speech_s = sum(e - s for s, e in inside)
        row = base_row("clips", id=f"{item['id']}_{n:04d}", parent_id=item["id"], video_path=item["path"],
                       clip_index=n, shot_index=shot_index, start_s=t0, end_s=t1, start_frame=a, end_frame=b,
                       fps=fps, duration_s=t1 - t0, speech_s=speech_s, speech_coverage=speech_s / max(t1 - t0, 1e-9),
                       speech_segments=[{"start": s, "end": e} for s, e in inside], cut_reasons=why)
        if t1 - t0 < self.min_len - 1e-9:
            row.update(status="rejected", reasons=["too_short"])
        return row

    def _materialize(self, path: str, index: VideoIndex, rows: list[dict]) -> None:
        out_dir = Path(self.materialize)
        out_dir.mkdir(parents=True, exist_ok=True)
        for r in rows:
            target, tmp = out_dir / f"{r['id']}.mp4", out_dir / f".{r['id']}.tmp.mp4"
            try:
                method = cut_clip(path, index, r["start_frame"], r["end_frame"], tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, target)
            r.update(clip_path=str(target), cut_method=method)


# ---------------------------------------------------------------------------------------------
# materializing: frames [a, b) of the decoder's count, exactly

CRF = 18  # x264 quality of re-encoded clips: visually lossless for training data
AUDIO_LEAD_S = 0.5  # audio decoded ahead of a clip so the decoder has settled at its start


def cut_clip(path: str, index: VideoIndex, a: int, b: int, out: Path) -> str:
    """Write frames [a, b) of `path` and the audio under them to `out` (mp4). Returns "copy" when
    packets were copied (a starts a keyframe, b is a keyframe or the end, and the copy decodes to
    exactly those frames), else "reencode"."""
    if not 0 <= a < b <= len(index):
        raise ValueError(f"frames [{a}, {b}) are not inside the video's {len(index)} frames")
    want = (index.pts[a:b] - index.pts[a]) * index.time_base  # [n] frame times in the clip
    if index.is_keyframe(a) and (b == len(index) or index.is_keyframe(b)):
        _copy_packets(path, index, a, b, out)
        if _same_times(video_index(out), want):
            return "copy"
    _reencode(path, index, a, b, out)
    got = video_index(out)
    if not _same_times(got, want):
        raise RuntimeError(f"the re-encoded clip holds {len(got)} frames, expected {b - a}")
    return "reencode"


def _same_times(got: VideoIndex, want: np.ndarray) -> bool:
    """Same frame count and frame times within a millisecond (relative to the first frame)."""
    times = (got.pts - got.pts[0]) * got.time_base
    return len(times) == len(want) and all(abs(float(x - y)) < 1e-3 for x, y in zip(times, want))


def _copy_packets(path: str, index: VideoIndex, a: int, b: int, out: Path) -> None:
    """Video packets of frames [a, b) and audio packets starting in that span, timestamps moved to 0."""
    lo, hi = index.pts_at(a), index.pts_at(b)
    t0, t1 = lo * index.time_base, hi * index.time_base
    with open_container(path) as src, av.open(str(out), "w", format="mp4") as dst:
        v = src.streams.video[0]
        sa = src.streams.audio[0] if src.streams.audio else None
        ov = dst.add_stream_from_template(v)
        oa = dst.add_stream_from_template(sa) if sa is not None else None
        if a > 0:
            src.seek(int(max(0, t0 - AUDIO_LEAD_S) / v.time_base), stream=v, backward=True, any_frame=False)
        video_done, audio_done = False, sa is None
        for pkt in src.demux([s for s in (v, sa) if s is not None]):
            if pkt.pts is None or not pkt.size:
                continue
            if pkt.stream is v:
                if pkt.dts is not None and pkt.dts >= hi:
                    video_done = True  # later packets all show after hi
                elif lo <= pkt.pts < hi and not pkt.is_discard:
                    _move(pkt, ov, lo)
                    dst.mux(pkt)
            else:
                t = pkt.pts * sa.time_base
                if t >= t1:
                    audio_done = True
                elif t >= t0:
                    _move(pkt, oa, round(t0 / sa.time_base))
                    dst.mux(pkt)
            if video_done and audio_done:
                break


def _move(pkt, stream, offset: int) -> None:
    pkt.pts -= offset
    if pkt.dts is not None:
        pkt.dts -= offset
    pkt.stream = stream


def _reencode(path: str, index: VideoIndex, a: int, b: int, out: Path) -> None:
    """Decode frames [a, b) and encode them at their own timestamps (from 0), with the audio of
    [time(a), time(b)) interleaved as the video advances."""
    lo, hi = index.pts_at(a), index.pts_at(b)
    t0, t1 = float(lo * index.time_base), float(hi * index.time_base)
    audio, rate = _audio_between(path, t0, t1)
    fps = Fraction(b - a) / ((hi - lo) * index.time_base)
    writer, written = None, 0
    try:
        with open_container(path) as src:
            v = src.streams.video[0]
            v.thread_type = "AUTO"
            if a > 0:
                src.seek(lo, stream=v, backward=True, any_frame=False)
            for frame in src.decode(v):
                if frame.pts is None or frame.pts < lo:
                    continue
                if frame.pts >= hi:
                    break
                rel = frame.pts - lo
                if frame.rotation % 360:  # display matrix: write the frames upright
                    frame = np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), frame.rotation // 90 % 4))
                if writer is None:
                    h, w = frame.shape[:2] if isinstance(frame, np.ndarray) else (frame.height, frame.width)
                    writer = VideoWriter(out, fps, w, h, crf=CRF, time_base=index.time_base,
                                         audio_rate=rate if audio is not None else None,
                                         audio_channels=len(audio) if audio is not None else 1, format="mp4")
                writer.write(frame, rel)
                if audio is not None:
                    upto = min(audio.shape[1], round(float(rel * index.time_base) * rate) + rate // 2)
                    writer.write_audio(audio[:, written:upto])
                    written = max(written, upto)
        if writer is None:
            raise RuntimeError(f"no frames decoded in [{t0:.3f}, {t1:.3f}) s")
        if audio is not None:
            writer.write_audio(audio[:, written:])
    finally:
        if writer is not None:
            writer.close()


def _audio_between(path: str, t0: float, t1: float) -> tuple[np.ndarray | None, int]:
    """Audio of [t0, t1) s at its own rate as float32 [C, N] (C = 1 or 2; silence where the track
    has none), and the rate; (None, 0) without an audio stream."""
    with open_container(path) as c:
        if not c.streams.audio:
            return None, 0
        s = c.streams.audio[0]
        rate = s.rate
        channels = 1 if s.codec_context.channels == 1 else 2
        resampler = av.AudioResampler(format="fltp", layout="mono" if channels == 1 else "stereo", rate=rate)
        n0, n1 = round(t0 * rate), round(t1 * rate)
        out = np.zeros((channels, n1 - n0), np.float32)
        if t0 > AUDIO_LEAD_S:
            c.seek(int((t0 - AUDIO_LEAD_S) / s.time_base), stream=s, backward=True, any_frame=False)
        pos = None  # sample index (at `rate`) of the next resampled sample
        for frame in c.decode(s):
            start = None if frame.pts is None else round(frame.time * rate)
            if pos is None or start is not None and abs(start - pos) > 1:
                pos = start or 0  # the first frame, or a gap in the track
            for f in resampler.resample(frame):
                x = f.to_ndarray()  # [C, m]
                i, j = max(pos, n0), min(pos + x.shape[1], n1)
                if j > i:
                    out[:, i - n0:j - n0] = x[:, i - pos:j - pos]
                pos += x.shape[1]
            if pos >= n1:
                break
    return out, rate
