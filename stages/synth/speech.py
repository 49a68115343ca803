"""Speech for the synthetic world: speech-like formant audio that silero-vad detects, and the mouth
track that follows it."""
from __future__ import annotations

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


def voice(rng: np.random.Generator, duration: float, f0: float, sr: int = SR, block: float = 0.02) -> np.ndarray:
    """A more speech-like utterance than `utterance`, for a speaker of pitch `f0` (Hz): syllables of
    120-250 ms ending in consonant-like closures, formants gliding from one vowel to the next,
    a pitch accent per syllable with declination, and a -6 dB/octave source tilt. silero-vad finds
    about 99 % of these in runs of utterances and pauses, against about 80 % of `utterance`s
    after the first."""
    n = int(duration * sr)
    bounds = [0]
    while bounds[-1] < n:
        bounds.append(min(n, bounds[-1] + int(rng.uniform(0.12, 0.25) * sr)))
    targets = np.array([VOWELS[i] for i in rng.integers(len(VOWELS), size=len(bounds))], np.float64)  # [S + 1, 3]
    accent, env, F = np.zeros(n), np.zeros(n), np.zeros((n, 3))
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        m = b - a
        accent[a:b] = rng.uniform(-0.08, 0.12) * np.sin(np.linspace(0, np.pi, m))
        glide = np.clip(np.linspace(0, 1, m) / 0.4, 0, 1)[:, None]  # over the first 40 % of the syllable
        F[a:b] = targets[s] * (1 - glide) + targets[s + 1] * glide
        voiced = max(1, m - int(0.06 * sr * rng.uniform(0.5, 1.5)))  # then a closure
        env[a:a + voiced] = rng.uniform(0.5, 1.0) * np.sin(np.linspace(0, np.pi, voiced)) ** 0.7
    pitch = f0 * (1 + accent) * (1 - 0.12 * np.arange(n) / max(n, 1))
    pulses = (np.diff(np.floor(np.cumsum(pitch / sr)), prepend=0) > 0).astype(np.float64)
    source = lfilter([1], [1, -0.9], pulses) + 0.02 * rng.standard_normal(n)
    out, hop = np.zeros(n), max(1, int(block * sr))
    for k in range(3):  # time-varying resonators, coefficients updated every `block` seconds
        r = np.exp(-np.pi * (80 + 40 * k) / sr)
        zi = np.zeros(2)
        for a in range(0, n, hop):
            theta = 2 * np.pi * F[a, k] / sr
            y, zi = lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], source[a:a + hop], zi=zi)
            out[a:a + hop] += y / (k + 1)
    out *= env
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



def random_speech(rng: np.random.Generator, duration: float) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """16 kHz audio of one speaker's utterances (0.6-2.2 s) and pauses (0.35-1.1 s) over a noise
    floor; one clip in ten is silent. Returns the audio and the utterance intervals (s)."""
    audio = 0.005 * rng.standard_normal(int(round(duration * SR)))
    segments = []
    if rng.random() < 0.1:
        return audio.astype(np.float32), segments
    f0, level = rng.uniform(90, 230), rng.uniform(0.3, 0.6)
    t = rng.uniform(0.0, min(0.8, 0.3 * duration))
    while t + 0.6 <= duration - 0.05:
        d = min(rng.uniform(0.6, 2.2), duration - 0.05 - t)
        s = int(round(t * SR))
        u = level * voice(rng, d, f0)
        audio[s:s + len(u)] += u
        segments.append((round(t, 4), round(t + len(u) / SR, 4)))
        t += d + rng.uniform(0.35, 1.1)
    return audio.astype(np.float32), segments


def mouth_track(audio: np.ndarray, speech: list[tuple[float, float]], T: int, fps: float) -> np.ndarray:
    """Mouth opening per frame: the loudness envelope inside utterances, closed outside them."""
    env = envelope(audio, fps, T)
    centre = (np.arange(T) + 0.5) / fps
    talking = np.zeros(T, bool)
    for s, e in speech:
        talking |= (centre >= s) & (centre < e)
    return np.where(talking, np.clip(1.25 * env, 0, 1), 0.0)


