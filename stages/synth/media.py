"""Talking-avatar test media with known facts: rendered shots with hard cuts and speech, written with
stages.sense.media.write_video. Used by `vidu demo`, the tests and the benchmarks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from stages.sense.media import load_audio, write_video
from stages.synth.speech import SR, envelope, speech_track


@dataclass
class Look:
    """Colours and geometry of one rendered shot."""

    background: tuple[int, int, int]
    face: tuple[int, int, int]
    x: float  # face centre, fraction of width
    radius: float  # fraction of height
    drift: float  # pixels per frame of horizontal sway


def random_look(rng: np.random.Generator) -> Look:
    return Look(tuple(int(c) for c in rng.integers(0, 256, 3)), tuple(int(c) for c in rng.integers(60, 256, 3)),
                float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.25, 0.35)), float(rng.uniform(0.5, 2.0)))


def render_avatar(look: Look, mouth: float, frame_index: int, width: int, height: int) -> np.ndarray:
    """One RGB frame: a face (circle, eyes, a mouth opened by `mouth` in [0, 1]) on a textured
    background."""
    x = np.arange(width, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)[:, None]
    stripes = 0.15 * np.outer(np.cos(y[:, 0] / 23.0), np.sin((x + 3 * frame_index) / 17.0))  # [H, W]
    img = np.array(look.background, np.float32) / 255 + stripes[..., None]
    cx = look.x * width + 20 * np.sin(frame_index * look.drift / 25)
    cy, r = 0.5 * height, look.radius * height
    dx2, dy2 = (x - cx) ** 2, (y - cy) ** 2
    img[dx2 + dy2 < r ** 2] = np.array(look.face, np.float32) / 255
    for ex in (-0.35, 0.35):
        img[(x - (cx + ex * r)) ** 2 + (y - (cy - 0.25 * r)) ** 2 < (0.1 * r) ** 2] = 0.05
    mh = 0.02 * r + 0.3 * r * mouth
    img[((x - cx) / (0.35 * r)) ** 2 + ((y - (cy + 0.4 * r)) / mh) ** 2 < 1] = (0.4, 0.05, 0.05)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def talking_video(path: str | Path, rng: np.random.Generator, shots: list[float], fps: int = 25,
                  size: tuple[int, int] = (640, 360), with_audio: bool = True) -> dict:
    """A talking-avatar video with hard cuts between shots of the given lengths (s).

    Returns the facts: cut times (s), cut frames, and the true speech intervals."""
    duration = sum(shots)
    audio, segments = speech_track(rng, duration)
    n = int(round(duration * fps))
    mouth = envelope(audio, fps, n)
    cut_frames = list(np.cumsum([int(round(s * fps)) for s in shots])[:-1])
    looks = [random_look(rng) for _ in shots]

    def frames():
        shot = 0
        for i in range(n):
            while shot < len(cut_frames) and i >= cut_frames[shot]:
                shot += 1
            yield render_avatar(looks[shot], mouth[i], i, *size)

    write_video(path, frames(), fps, audio if with_audio else None)
    return {"cut_frames": [int(c) for c in cut_frames], "cut_times": [c / fps for c in cut_frames],
            "speech": segments, "duration": duration, "fps": fps}


def transcode(src: str | Path, dst: str | Path, width: int, height: int, crf: int = 28) -> Path:
    """Re-encode a video at another size (a near-duplicate), keeping its audio."""
    with av.open(str(src)) as c:
        fps = int(round(float(c.streams.video[0].average_rate)))
        has_audio = bool(c.streams.audio)
        frames = [f.to_ndarray(width=width, height=height, format="rgb24") for f in c.decode(video=0)]
    audio = load_audio(src, SR) if has_audio else None
    return write_video(dst, frames, fps, audio, crf=crf)
