"""One frame-sampling convention (issue 20): the frame that stands for time t is the frame shown at t,
the last frame whose presentation time is at or before t (the first frame for a t before it), and
filter, diarize (the mouth track), caption, embed and `vidu eval` all sample through the one function
that implements it, stages.sense.media.frames_at.

Checked on a generated variable-frame-rate video whose frames are solid grey levels (frame i has
level 10 + 15 i, so a decoded frame names its index) and on ../shared's retalking_1.mp4 (VFR: a
30 fps clock with every third frame missing, first frame at 33 ms), whose frames are named by
their nearest source frame."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from stages.sense.media import VideoWriter, clip_frames, frames_at, video_index

PTS_MS = [20, 50, 70, 150, 170, 260, 270, 340, 420, 490, 530, 620, 650, 720, 800]  # irregular; none at 0
GRID = np.arange(20) / 25  # 0 .. 0.76 s on the 25 fps grid
# the frame shown at each GRID time: before 20 ms the first frame; 0.72 s is exactly frame 13's start
SHOWN = [0, 0, 2, 2, 3, 4, 4, 6, 6, 7, 7, 8, 8, 9, 10, 10, 11, 12, 13, 13]
REAL = "talking/retalking_1.mp4"
REAL_GRID = np.arange(50) / 25  # its first 2 s
REAL_SHOWN = [0, 0, 0, 1, 2, 3, 4, 5, 6, 6, 8, 9, 9, 10, 11, 12, 13, 14, 14, 15, 17, 17, 18, 19, 20,
              21, 22, 23, 23, 24, 25, 26, 27, 28, 28, 30, 31, 31, 32, 33, 34, 35, 36, 37, 37, 39, 39, 40, 41, 42]


class Sampled(Exception):
    """Raised by a stage's measuring step with the frames its sampling path gave it."""

    def __init__(self, frames: np.ndarray, times: np.ndarray | None = None):
        super().__init__("sampled")
        self.frames, self.times = frames, times


@pytest.fixture(scope="module")
def vfr(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vfr") / "vfr.mp4"
    with VideoWriter(path, 25, 64, 48, time_base=Fraction(1, 1000)) as w:
        for i, p in enumerate(PTS_MS):
            w.write(np.full((48, 64, 3), 10 + 15 * i, np.uint8), pts=p)
    return path


def grey_index(frames: np.ndarray) -> list[int]:
    return np.round((frames.reshape(len(frames), -1).mean(1) - 10) / 15).astype(int).tolist()


def frame_numbers(path: Path, shown_s: np.ndarray) -> list[int]:
    """Index (presentation order) of the frames starting at the given times."""
    ix = video_index(path)
    pts = ix.pts * float(ix.time_base)
    i = np.abs(pts[None, :] - np.asarray(shown_s)[:, None]).argmin(1)
    assert np.allclose(pts[i], shown_s, atol=1e-6)
    return i.tolist()


def old_rule(path: Path, times: np.ndarray) -> list[int]:
    """The retired convention: the first frame starting at or after each time."""
    ix = video_index(path)
    return np.searchsorted(ix.pts * float(ix.time_base), np.asarray(times) - 1e-6, side="left").tolist()


def stage_samples(path: Path, grid: np.ndarray, monkeypatch) -> dict[str, np.ndarray]:
    """The frames each stage's own sampling path gives for the 25 fps grid `grid` from 0 (the
    stage functions run; only the step after sampling is replaced by a catch)."""
    import stages.caption as caption
    import stages.sense.mouth as mouth
    from stages.embed import decode_grid
    from stages.eval.bench.runner import ORACLE, EvalBench
    from stages.eval.video import decode_video
    from stages.filter import Filter

    n, end = len(grid), len(grid) / 25
    item = {"id": "c", "video_path": str(path), "start_s": 0.0, "end_s": end, "speech_segments": []}
    out = {}

    f = Filter(sample_fps=25.0, max_side=1024)
    f.measure = lambda frames, times, native: (_ for _ in ()).throw(Sampled(frames, times))
    with pytest.raises(Sampled) as got:
        f.process(dict(item))
    out["filter"] = got.value.frames
    assert np.allclose(got.value.times, grid)  # each frame stands for its grid time

    def measure_frames(frames):
        raise Sampled(frames)
    monkeypatch.setattr(caption, "measure_frames", measure_frames)
    with pytest.raises(Sampled) as got:
        caption.Caption(frames=n).process(dict(item))
    out["caption"] = got.value.frames

    seen = []

    def track_face(frames, face_box=None, **kw):  # the tracker sees what mouth_landmarks sampled
        seen.append(frames)
        T = len(frames)
        return mouth.FaceTrack(np.full((T, 68, 2), np.nan, np.float32), np.ones(T, bool), np.ones(T, bool),
                               [(0, 0, 400, 400)] * T)
    monkeypatch.setattr(mouth, "track_face", track_face)
    times, _ = mouth.mouth_landmarks(str(path), 0.0, end, None)  # diarize's mouth track
    out["diarize"] = seen[0]
    assert np.allclose(times, grid)

    W, H = clip_frames(path, 0.0, 0.2)[0].shape[1:3][::-1]  # embed's crop: the whole frame at its own size
    frames, picked, _, _ = decode_grid(str(path), list(grid), end, lambda W, H: (0, 0, W, H), W, H)
    out["embed"] = frames
    assert frame_numbers(path, picked) == frame_numbers(path, frames_at(path, grid, end)[1])

    out["eval"] = decode_video(path, n)[0]
    out["eval_oracle"] = EvalBench(system=ORACLE)._oracle({"video": str(path)}, np.zeros(int(end * 16000), np.float32))[0]
    for name, frames in out.items():
        assert len(frames) == n, name
    return out


def test_frames_at_picks_the_frame_shown_on_a_generated_vfr_video(vfr):
    frames, shown = frames_at(vfr, GRID)
    assert grey_index(frames) == SHOWN
    assert frame_numbers(vfr, shown) == SHOWN
    assert np.allclose(shown, np.asarray(PTS_MS)[SHOWN] / 1000)
    # before the first frame (20 ms): the first frame; exactly at a frame's start: that frame
    assert grey_index(frames_at(vfr, [0.0, 0.019, 0.02, 0.0499, 0.05, 0.7199, 0.72])[0]) == [0, 0, 0, 0, 1, 12, 13]
    # past the last frame it holds; frames starting at or after end_s are not used
    assert grey_index(frames_at(vfr, [0.79, 0.81, 5.0])[0]) == [13, 14, 14]
    assert grey_index(frames_at(vfr, [0.5, 0.6, 0.7], end_s=0.53)[0]) == [9, 9, 9]
    # a grid starting mid-stream (seek) picks the same frames as the full decode
    assert grey_index(frames_at(vfr, GRID[10:])[0]) == SHOWN[10:]


def test_the_old_first_at_or_after_rule_picks_other_frames_on_vfr(vfr, shared_media):
    """Negative control: the retired rule differs on both VFR videos, so the checks above can fail."""
    old = old_rule(vfr, GRID)
    assert old != SHOWN and sum(a != b for a, b in zip(old, SHOWN)) >= 10
    real = shared_media / REAL
    old = old_rule(real, REAL_GRID)
    assert old != REAL_SHOWN and sum(a != b for a, b in zip(old, REAL_SHOWN)) >= 30


def test_frames_at_on_the_real_vfr_clip(shared_media):
    path = shared_media / REAL
    assert frame_numbers(path, frames_at(path, REAL_GRID)[1]) == REAL_SHOWN
    # 0.9997 s starts frame 21: shown at 1.0 s (the old rule took frame 22, at 1.033 s)
    assert frame_numbers(path, frames_at(path, [0.0, 0.04, 0.1, 1.0, 2.0, 3.5])[1]) == [0, 0, 1, 21, 43, 76]
    assert frame_numbers(path, frames_at(path, REAL_GRID[25:])[1]) == REAL_SHOWN[25:]


def test_clip_frames_samples_the_grid_with_the_frame_shown(vfr):
    frames, times = clip_frames(vfr, 0.0, 0.8, fps=25)
    assert grey_index(frames) == SHOWN and np.allclose(times, GRID)
    frames, times = clip_frames(vfr, 0.4, 0.8, fps=12.5)  # a clip from 0.4 s: its own grid
    assert grey_index(frames) == [7, 8, 10, 11, 13] and np.allclose(times, 0.4 + np.arange(5) / 12.5)
    frames, times = clip_frames(vfr, 0.1, 0.5)  # no fps: every frame starting in the span
    assert grey_index(frames) == [3, 4, 5, 6, 7, 8, 9] and np.allclose(times, np.asarray(PTS_MS[3:10]) / 1000)


def test_every_stage_samples_the_same_frames_on_the_generated_vfr_video(vfr, monkeypatch):
    for name, frames in stage_samples(vfr, GRID, monkeypatch).items():
        assert grey_index(frames) == SHOWN, name


def test_every_stage_samples_the_same_frames_on_the_real_vfr_clip(shared_media, monkeypatch):
    """Each stage's frames equal, pixel for pixel, frames_at's at the stage's own analysis size, and
    those are the frames REAL_SHOWN names (consecutive source frames differ, so equal pixels are
    the same frame)."""
    path = shared_media / REAL
    native, shown = frames_at(path, REAL_GRID)
    assert frame_numbers(path, shown) == REAL_SHOWN
    change = np.flatnonzero(np.diff(REAL_SHOWN)) + 1
    assert all(not np.array_equal(native[i - 1], native[i]) for i in change)
    for name, frames in stage_samples(path, REAL_GRID, monkeypatch).items():
        side = max(frames.shape[1:3])
        expected = native if side == max(native.shape[1:3]) else frames_at(path, REAL_GRID, max_side=side)[0]
        assert frames.shape == expected.shape and np.array_equal(frames, expected), name


def test_video_index_is_demuxed_once_per_file_version(tmp_path, monkeypatch):
    """Stages ask for a source's index per clip: the same unchanged file is demuxed once; a file
    rewritten in place (another size or time) gets its new index; the cached arrays are read-only."""
    import os

    import stages.sense.media as media
    demuxed = []
    real_open = media.open_container
    monkeypatch.setattr(media, "open_container", lambda p: demuxed.append(p) or real_open(p))
    path = tmp_path / "v.mp4"

    def write(pts_ms):
        with VideoWriter(path, 25, 64, 48, time_base=Fraction(1, 1000)) as w:
            for i, p in enumerate(pts_ms):
                w.write(np.full((48, 64, 3), 10 + 15 * i, np.uint8), pts=p)

    write(PTS_MS)
    first = video_index(path)
    assert video_index(str(path)) is first and len(demuxed) == 1
    ms = lambda ix: [round(ix.time(i) * 1000) for i in range(len(ix))]   # noqa: E731
    assert ms(first) == PTS_MS and not first.pts.flags.writeable
    write(PTS_MS[:5])
    os.utime(path, ns=(1, 1))                                       # even with an old modification time
    assert ms(video_index(path)) == PTS_MS[:5] and len(demuxed) == 2
    with pytest.raises(media.MediaError):
        video_index(tmp_path / "missing.mp4")
