"""Talking-avatar test media with known facts: shots of world characters (the one renderer, a new
random character and backdrop per shot) with hard cuts, speaking espeak-ng sentences (clean, no
augmentation), written with stages.sense.media.write_video. Used by `vidu demo`, the tests and the
benchmarks."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from stages.sense.media import load_audio, write_video
from stages.synth.render import render_clip
from stages.synth.speech import SR, Speech, mouth_tracks, texts, tts, visemes_of, voices
from stages.synth.world import animate, random_identity, random_scene

CHUNK = 50  # frames rendered at a time: a 30 s video at 640 x 360 is never held whole


def talking_speech(rng: np.random.Generator, duration: float, pause: tuple[float, float] = (0.6, 1.5),
                   level: float = 0.5) -> Speech:
    """One TTS voice reading sentences separated by pauses over a faint noise floor, filling
    `duration` seconds; segments are the sentences' spoken spans, visemes their ground truth."""
    pool, said = voices("train"), texts("train")
    voice = pool[rng.integers(len(pool))]
    rate, pitch = int(rng.integers(140, 200)), int(rng.integers(30, 70))
    audio = np.zeros(round(duration * SR), np.float32)
    segments, vis, spoken = [], [], []
    t, misses = rng.uniform(*pause), 0
    while t < duration - pause[0] - 0.5 and misses < 4:
        text = said[rng.integers(len(said))]
        u = tts(text, voice, rate, pitch)
        s0, s1 = u.span
        if s1 <= s0 or t + (s1 - s0) > duration - pause[0]:
            misses += 1
            continue
        src = u.audio[round(s0 * SR):round(s1 * SR)]
        a = round(t * SR)
        audio[a:a + len(src)] = level * src / (np.abs(src).max() + 1e-9)
        vis += [v for v in visemes_of(u.phonemes, t - s0) if v[2] != "sil" and t <= v[0] < t + s1 - s0]
        segments.append((round(t, 4), round(t + len(src) / SR, 4)))
        spoken.append(text)
        t += (s1 - s0) + rng.uniform(*pause)
    audio += 0.003 * rng.standard_normal(len(audio)).astype(np.float32)
    return Speech(audio, segments, vis, f"tts:{voice}", " ".join(spoken))


def talking_video(path: str | Path, rng: np.random.Generator, shots: list[float], fps: int = 25,
                  size: tuple[int, int] = (640, 360), with_audio: bool = True) -> dict:
    """A talking-avatar video with hard cuts between shots of the given lengths (s).

    Returns the facts: cut times (s), cut frames, and the true speech intervals."""
    duration = sum(shots)
    speech = talking_speech(rng, duration)
    n = int(round(duration * fps))
    mouth = mouth_tracks(speech, n, fps)
    cut_frames = [int(c) for c in np.cumsum([int(round(s * fps)) for s in shots])[:-1]]
    bounds = list(zip([0] + cut_frames, cut_frames + [n]))
    cast = []
    for _ in bounds:
        identity = random_identity(rng)
        cast.append((identity, random_scene(rng, identity)))

    def frames():
        for (a, b), (identity, scene) in zip(bounds, cast):
            tracks = animate(rng, b - a, fps, mouth["mouth"][a:b], [], mouth["round"][a:b])
            for c in range(a, b, CHUNK):
                part = {k: v[c - a:min(b, c + CHUNK) - a] for k, v in tracks.items()}
                yield from render_clip(identity, part, *size, scene)

    write_video(path, frames(), fps, speech.audio if with_audio else None)
    return {"cut_frames": cut_frames, "cut_times": [c / fps for c in cut_frames], "speech": speech.segments,
            "duration": duration, "fps": fps}


def transcode(src: str | Path, dst: str | Path, width: int, height: int, crf: int = 28) -> Path:
    """Re-encode a video at another size (a near-duplicate), keeping its audio."""
    with av.open(str(src)) as c:
        fps = int(round(float(c.streams.video[0].average_rate)))
        has_audio = bool(c.streams.audio)
        frames = [f.to_ndarray(width=width, height=height, format="rgb24") for f in c.decode(video=0)]
    audio = load_audio(src, SR) if has_audio else None
    return write_video(dst, frames, fps, audio, crf=crf)
