"""Measure the synthetic world's speech (stages/synth/speech.py) on CPU: TTS speed, whether silero-vad
hears the held-out TTS clips, and whether the viseme mouth moves with the audio.

    python benchmarks/synth_speech.py [--clips 24] [--real-dir ../shared/media/speech]

Prints a markdown section for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from scipy.signal import butter, sosfilt

from stages.sense.speech import load_vad, speech_segments
from stages.synth import speech as S

FPS = 25


def lag_and_r(mouth: np.ndarray, env: np.ndarray, max_lag: int = 6) -> tuple[int, float]:
    """Frames by which the mouth trails the envelope at the cross-correlation peak, and the peak's r."""
    m, e = mouth - mouth.mean(), env - env.mean()
    n = len(m)
    score = [np.sum(m[max(0, k):n + min(0, k)] * e[max(0, -k):n + min(0, -k)]) for k in range(-max_lag, max_lag + 1)]
    k = int(np.argmax(score))
    return k - max_lag, float(score[k] / np.sqrt(np.sum(m * m) * np.sum(e * e) + 1e-12))


def band_db(audio: np.ndarray, a: float, b: float) -> float:
    x = sosfilt(butter(2, [300, 3000], "bandpass", fs=S.SR, output="sos"), audio)[int(a * S.SR):int(b * S.SR) + 1]
    return float(10 * np.log10(np.mean(x ** 2) + 1e-12))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--real-dir", default=None)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    voices, texts = S.voices("eval"), S.texts("eval")

    audio_s = tts_cpu = 0.0
    lags, rs, closure_gap = [], [], []
    for i in range(40):
        voice, text = voices[rng.integers(len(voices))], texts[i % len(texts)]
        t0 = time.process_time()
        u = S.tts(text, voice, int(rng.integers(120, 231)), int(rng.integers(20, 81)), int(rng.integers(20, 91)))
        tts_cpu += time.process_time() - t0
        audio_s += len(u.audio) / S.SR
        T = int(len(u.audio) / S.SR * FPS)
        vis = S.visemes_of(u.phonemes)
        mouth = S.mouth_tracks(S.Speech(u.audio, [u.span], vis, f"tts:{voice}", text), T, FPS)["mouth"]
        lag, r = lag_and_r(mouth, S.envelope(u.audio, FPS, T))
        lags.append(lag)
        rs.append(r)
        pp = [band_db(u.audio, a, b) for a, b, v in vis if v == "PP"]
        vowel = [band_db(u.audio, a, b) for a, b, v in vis if v in ("aa", "oh")]
        if pp and vowel:
            closure_gap.append(np.mean(vowel) - np.mean(pp))

    vad = load_vad()
    true_s = found_s = quiet_s = false_s = 0.0
    clips = speak_audio_s = 0
    seed, speak_cpu = 0, 0.0
    while clips < args.clips:
        c0 = time.process_time()
        sp = S.speak(np.random.default_rng(seed), args.seconds, "eval", args.real_dir)
        speak_cpu += time.process_time() - c0
        speak_audio_s += args.seconds
        seed += 1
        if not sp.source.startswith("tts"):
            continue
        clips += 1
        heard = speech_segments(vad, sp.audio)
        overlap = sum(max(0.0, min(e, b) - max(s, a)) for s, e in sp.segments for a, b in heard)
        true_s += sum(e - s for s, e in sp.segments)
        found_s += overlap
        quiet_s += args.seconds - sum(e - s for s, e in sp.segments)
        false_s += sum(b - a for a, b in heard) - overlap

    lags = np.array(lags)
    print(f"## 2026-12-01 synthetic-world speech (CPU: {platform.processor() or platform.machine()}, "
          f"`python benchmarks/synth_speech.py`)\n")
    print(f"- espeak-ng TTS (`tts`, library reloaded per utterance for determinism, 22.05 -> 16 kHz): "
          f"{audio_s / tts_cpu:.0f} s of audio per CPU second over 40 held-out utterances ({audio_s:.0f} s); "
          f"`speak` (mixing, augmentation, silent and real clips included): {speak_audio_s / speak_cpu:.0f} s per CPU s.")
    print(f"- silero-vad on {clips} held-out augmented TTS clips of {args.seconds:g} s (eval voices and texts; "
          f"noise 0-30 dB SNR, reverb, music bed as drawn): finds {found_s / true_s:.1%} of the true speech time; "
          f"{false_s / max(quiet_s, 1e-9):.1%} of the non-speech time flagged.")
    print(f"- viseme mouth vs RMS envelope (25 fps, 40 clean held-out utterances): cross-correlation peak lag "
          f"0 in {np.mean(lags == 0):.0%}, |lag| <= 1 in {np.mean(np.abs(lags) <= 1):.0%} (lags {sorted(set(lags.tolist()))}); "
          f"median peak r {np.median(rs):.2f}.")
    print(f"- bilabial closures (m b p) are {np.mean(closure_gap):.1f} dB quieter (300-3000 Hz) than open vowels "
          f"(aa, oh) on average; quieter in {np.mean(np.array(closure_gap) > 0):.0%} of utterances.")


if __name__ == "__main__":
    main()
