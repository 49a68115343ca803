"""Procedural media with known facts: speech-like audio that silero-vad detects as speech,
rendered talking-avatar frames with hard cuts, and files written through PyAV.

Used by `vidu demo`, the tests and the benchmarks; the synthetic avatar world builds on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from scipy.signal import lfilter

SR = 16000
# (F1, F2, F3) formants of a few vowels, Hz
VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410),
          (440, 1020, 2240), (660, 1720, 2410)]


def _resonate(x: np.ndarray, freq: float, bandwidth: float, sr: int) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / sr)
    theta = 2 * np.pi * freq / sr
    return lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], x)


def utterance(rng: np.random.Generator, duration: float, sr: int = SR) -> np.ndarray:
    """A voiced utterance: glottal pulses with drifting pitch through vowel formants, in
    syllables of 150-300 ms (a 3-7 Hz envelope, as in speech)."""
    n = int(duration * sr)
    t = np.arange(n) / sr
    f0 = rng.uniform(100, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 0.8) * t + rng.uniform(0, 6)))
    pulses = (np.diff(np.floor(np.cumsum(f0 / sr)), prepend=0) > 0).astype(np.float64)
    pulses += 0.02 * rng.standard_normal(n)
    out = np.zeros(n)
    a = 0
    while a < n:
        b = min(n, a + int(rng.uniform(0.15, 0.3) * sr))
        formants = VOWELS[rng.integers(len(VOWELS))]
        seg = sum(_resonate(pulses[a:b], f, 80 + 40 * k, sr) / (k + 1) for k, f in enumerate(formants))
        out[a:b] = seg * np.sin(np.linspace(0, np.pi, b - a)) ** 0.7
        a = b
    return out / (np.abs(out).max() + 1e-9)


def speech_track(rng: np.random.Generator, duration: float, sr: int = SR, pause: tuple[float, float] = (0.6, 1.5),
                 talk: tuple[float, float] = (1.0, 3.0), level: float = 0.5) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Utterances separated by pauses, filling `duration` seconds; returns audio and the true
    utterance intervals (s)."""
    audio = np.zeros(int(duration * sr))
    segments = []
    t = rng.uniform(*pause)
    while t + talk[0] < duration - pause[0]:
        d = min(rng.uniform(*talk), duration - pause[0] - t)
        s = int(t * sr)
        u = level * utterance(rng, d, sr)
        audio[s:s + len(u)] = u
        segments.append((t, t + d))
        t += d + rng.uniform(*pause)
    audio += 0.003 * rng.standard_normal(len(audio))
    return audio.astype(np.float32), segments


def envelope(audio: np.ndarray, fps: float, n_frames: int, sr: int = SR) -> np.ndarray:
    """RMS level per video frame, scaled to [0, 1]."""
    hop = sr / fps
    rms = np.array([np.sqrt(np.mean(audio[int(i * hop):int((i + 1) * hop)] ** 2) + 1e-12) for i in range(n_frames)])
    return np.clip(rms / (rms.max() + 1e-9), 0, 1)


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


def write_video(path: str | Path, frames, fps: int, audio: np.ndarray | None = None, sr: int = SR,
                crf: int = 23) -> Path:
    """Encode RGB uint8 frames (an iterable) with libx264 and optional mono float audio with AAC."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        vs = None
        if audio is not None:
            aus = c.add_stream("aac", rate=sr, layout="mono")
        for i, frame in enumerate(frames):
            if vs is None:
                vs = c.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "veryfast"})
                vs.height, vs.width = frame.shape[:2]
                vs.pix_fmt = "yuv420p"
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = i
            vf.time_base = Fraction(1, fps)
            c.mux(vs.encode(vf))
        c.mux(vs.encode())
        if audio is not None:
            for k, s in enumerate(range(0, len(audio), 1024)):
                chunk = np.zeros((1, 1024), np.float32)
                part = audio[s:s + 1024]
                chunk[0, :len(part)] = part
                af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                af.sample_rate, af.pts, af.time_base = sr, s, Fraction(1, sr)
                c.mux(aus.encode(af))
            c.mux(aus.encode())
    return path


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
        frames = [f.to_ndarray(width=width, height=height, format="rgb24") for f in c.decode(video=0)]
    with av.open(str(src)) as c:
        audio = None
        if c.streams.audio:
            rs = av.AudioResampler(format="flt", layout="mono", rate=SR)
            audio = np.concatenate([g.to_ndarray().reshape(-1) for f in c.decode(audio=0) for g in rs.resample(f)])
    return write_video(dst, frames, fps, audio, crf=crf)
