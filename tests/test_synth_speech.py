"""Speech of the synthetic world (stages/synth/speech.py): espeak-ng TTS whose phoneme events line up
with its audio, viseme mouths in step with the sound, a causal gain-normalised loudness, held-out
voices / texts / recordings, and augmentation that does what it says."""
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import butter, sosfilt

from stages.synth import speech as S

SHARED_SPEECH = Path(__file__).resolve().parents[2] / "shared" / "media" / "speech"
FPS = 25
ENGLISH = ["en-us+f3", "en-gb-x-rp+m1", "en-gb-scotland+f2", "en-us-nyc+m5"]


def _level_db(audio: np.ndarray, t0: float, t1: float, band: bool = True) -> float:
    x = sosfilt(butter(2, [300, 3000], "bandpass", fs=S.SR, output="sos"), audio) if band else audio
    seg = x[int(t0 * S.SR):max(int(t1 * S.SR), int(t0 * S.SR) + 1)]
    return float(10 * np.log10(np.mean(seg ** 2) + 1e-12))


def _lag(mouth: np.ndarray, env: np.ndarray, max_lag: int = 6) -> int:
    """Frames by which the mouth trails the envelope at the cross-correlation peak (< 0: it leads)."""
    m, e = mouth - mouth.mean(), env - env.mean()
    n = len(m)
    score = [np.sum(m[max(0, k):n + min(0, k)] * e[max(0, -k):n + min(0, -k)]) for k in range(-max_lag, max_lag + 1)]
    return int(np.argmax(score)) - max_lag


def _utterance_speech(u: S.Utterance, voice: str, text: str) -> S.Speech:
    return S.Speech(u.audio, [u.span], S.visemes_of(u.phonemes), f"tts:{voice}", text)


def test_tts_is_deterministic_16k_and_timed():
    text = "Please raise a hand, then blink twice."
    a, b = S.tts(text, "en-us+klatt3", 160, 40, 60), S.tts(text, "en-us+klatt3", 160, 40, 60)
    S.tts(text, "en+whisper")  # the library's state between calls must not leak into the next one
    c = S.tts(text, "en-us+klatt3", 160, 40, 60)
    assert a.audio.dtype == np.float32 and np.array_equal(a.audio, b.audio) and np.array_equal(a.audio, c.audio)
    assert a.phonemes == c.phonemes and 1.5 < len(a.audio) / S.SR < 4
    starts = [p[0] for p in a.phonemes]
    assert starts == sorted(starts) and all(e >= s for s, e, _ in a.phonemes)
    assert [w for _, w in a.words] == ["Please", "raise", "a", "hand", "then", "blink", "twice"]
    assert 0 < a.span[0] < 0.2 and a.span[1] <= len(a.audio) / S.SR
    assert not np.array_equal(S.tts(text, "en-us+f3").audio[:16000], a.audio[:16000])
    with pytest.raises(ValueError, match="variant"):
        S.tts(text, "en+nobody")


def test_tts_is_the_same_in_another_second(monkeypatch):
    """espeak-ng seeds its noise from time(): an utterance must not depend on the second it is said in
    (session 63's CI: a training clip rendered in a worker differed from the same clip rendered in-process)."""
    import time
    text = "Why is the blue door so heavy tomorrow?"

    def twice():
        a = S.tts(text, "en-us+f2").audio
        time.sleep(1.05 - time.time() % 1)                 # the next second of the clock
        return a, S.tts(text, "en-us+f2").audio
    a, b = twice()
    assert np.array_equal(a, b)
    monkeypatch.setattr(S, "NOISE_SEED", None)           # negative control: the library's own clock seed
    a, b = twice()
    assert len(a) == len(b) and not np.array_equal(a, b)


def test_every_voice_of_both_splits_exists():
    data = Path(S._espeak_paths()[1])
    for v in S.VARIANTS:
        assert (data / "voices" / "!v" / v).is_file(), v
    for lang in S.ACCENTS + S.READERS:
        assert len(S.tts("yes", f"{lang}+m1").audio) > 1000, lang


def test_phonemes_of_every_language_map_to_visemes():
    assert [S.phoneme_visemes(p) for p in ("m", "b", "f", "'aI", "'u:", "_:", "s", "w", "tS")] == [
        ("PP",), ("PP",), ("FF",), ("aa", "ih"), ("ou",), ("sil",), ("SS",), ("ou",), ("CH",)]
    names = [p for lang in S.ACCENTS + S.READERS for t in S.texts("train")[:2]
             for _, _, p in S.tts(t, f"{lang}+m1").phonemes]
    unknown = [p for p in names if p.lstrip("'%,=")[:1] not in S._FIRST_LETTER and not p.startswith("_")
               and p.lstrip("'%,=") not in S._PHONEME_VISEMES]
    assert len(names) > 300 and len(unknown) <= 0.01 * len(names), unknown


def test_phoneme_events_line_up_with_the_audio():
    """Onset and end of the spoken phonemes are where the audio starts and stops, the pause at a
    comma is quiet, and bilabial closures (m b p) are quieter than open vowels."""
    closures, vowels = [], []
    for voice in ENGLISH:
        u = S.tts("My puppy, Bob, ate a big apple.", voice)
        db = np.array([_level_db(u.audio, t, t + 0.01, band=False) for t in np.arange(0, len(u.audio) / S.SR, 0.01)])
        loud = np.nonzero(db > db.max() - 35)[0] * 0.01
        assert abs(loud[0] - u.span[0]) < 0.03 and abs(loud[-1] + 0.01 - u.span[1]) < 0.08, voice
        pauses = [(a, b) for a, b, v in S.visemes_of(u.phonemes) if v == "sil" and u.span[0] < a and b < u.span[1]]
        assert len(pauses) >= 2, voice  # the two commas
        for a, b in pauses:
            assert _level_db(u.audio, a + 0.02, b - 0.02, band=False) < db.max() - 30, voice
        for a, b, v in S.visemes_of(u.phonemes):
            (closures if v == "PP" else vowels if v in ("aa", "oh") else []).append(_level_db(u.audio, a, b))
    assert np.mean(closures) < np.mean(vowels) - 8


def test_viseme_mouth_moves_with_the_audio_envelope():
    """Cross-correlation of the viseme mouth and the RMS envelope peaks at lag 0 +- 1 frame (25 fps);
    the control: the same audio 3 frames late puts the peak 3 frames early."""
    texts = S.texts("eval")
    for i, voice in enumerate(ENGLISH):
        u = S.tts(texts[i], voice)
        T = int(len(u.audio) / S.SR * FPS)
        mouth = S.mouth_tracks(_utterance_speech(u, voice, texts[i]), T, FPS)["mouth"]
        assert abs(_lag(mouth, S.envelope(u.audio, FPS, T))) <= 1, voice
        late = np.concatenate([np.zeros(3 * S.SR // FPS, np.float32), u.audio])[:len(u.audio)]
        assert abs(_lag(mouth, S.envelope(late, FPS, T)) + 3) <= 1, voice


def test_mouth_tracks_close_outside_speech_and_round_on_rounded_vowels():
    u = S.tts("Who knew you would move to the zoo?", "en-us+m2")
    T = int(len(u.audio) / S.SR * FPS) + 10
    sp = _utterance_speech(u, "en-us+m2", "")
    tracks = S.mouth_tracks(sp, T, FPS)
    assert set(tracks) == {"mouth", "round"} and all(x.shape == (T,) and x.dtype == np.float32 for x in tracks.values())
    centre = (np.arange(T) + 0.5) / FPS
    outside = (centre < u.span[0]) | (centre >= u.span[1])
    assert np.all(tracks["mouth"][outside] == 0) and np.all(tracks["round"][outside] == S.REST_ROUND)
    assert tracks["mouth"].max() > 0.4 and tracks["round"][~outside].mean() > 0.5  # oo everywhere
    spread = S.mouth_tracks(_utterance_speech(S.tts("See me eat cheese easily.", "en-us+m2"), "", ""), T, FPS)
    assert spread["round"][~outside].mean() < tracks["round"][~outside].mean() - 0.2
    # a short bilabial still closes the lips
    vis = [(0.0, 0.3, "aa"), (0.3, 0.36, "PP"), (0.36, 0.7, "aa")]
    fine, _ = S.viseme_tracks(vis, 70, 100)
    assert fine[33] < 0.15 and fine[15] > 0.9 and fine[55] > 0.9


def test_causal_loudness_never_reads_the_future_and_ignores_gain():
    rng = np.random.default_rng(0)
    u = S.tts("Honestly, the old piano is heavy.", "en-gb-x-rp+f2")
    audio = np.concatenate([np.zeros(S.SR // 2, np.float32), u.audio, u.audio]) + 1e-3 * rng.standard_normal(
        S.SR // 2 + 2 * len(u.audio)).astype(np.float32)
    T = int(len(audio) / S.SR * FPS)
    base = S.causal_loudness(audio, FPS, T)
    for k in (20, 37, T // 2):
        changed = audio.copy()
        changed[k * S.SR // FPS:] = rng.standard_normal(len(audio) - k * S.SR // FPS) * 0.5
        assert np.array_equal(S.causal_loudness(changed, FPS, T)[:k], base[:k])
    quiet = S.causal_loudness(audio * 0.1, FPS, T)
    onset = int((0.5 + u.span[0]) * FPS)
    assert np.max(np.abs(quiet[onset + 5:] - base[onset + 5:])) < 0.05 and np.mean(base[onset:] > 0.5) > 0.3
    assert 0.3 < base[onset:].mean() < 0.9 and base.min() >= 0 and base.max() <= 1


def test_splits_are_disjoint_and_held_out_items_never_reach_training():
    train, held = S.split_items("train", SHARED_SPEECH), S.split_items("eval", SHARED_SPEECH)
    for key in ("voices", "texts"):
        assert train[key] and held[key] and not set(train[key]) & set(held[key])
    assert len(train["texts"]) + len(held["texts"]) >= 300
    assert sum(any(a in t.lower() for a in S.INSTRUCTIONS) for t in train["texts"]) > 30
    assert S.split_items("train", SHARED_SPEECH) == train  # deterministic
    with pytest.raises(ValueError, match="split"):
        S.voices("test")
    real_dir = SHARED_SPEECH if SHARED_SPEECH.is_dir() else None
    if real_dir is not None:
        assert train["files"] and held["files"] and not set(train["files"]) & set(held["files"])
    seen_voices, seen_texts, seen_files = set(), set(), set()
    for seed in range(40):
        sp = S.speak(np.random.default_rng(seed), 3.0, "train", real_dir)
        kind, _, name = sp.source.partition(":")
        (seen_voices if kind == "tts" else seen_files).add(name)
        seen_texts |= {t for t in train["texts"] + held["texts"] if t in sp.text}
    assert not seen_voices & set(held["voices"]) and not seen_texts & set(held["texts"])
    assert len(seen_voices) > 15 and seen_texts
    if real_dir is not None:
        assert seen_files - {""} and not seen_files & set(held["files"])


def test_speak_contract_and_determinism():
    kinds = []
    for seed in range(30):
        sp = S.speak(np.random.default_rng(seed), 3.3, "eval")
        kinds.append(sp.source.split(":")[0])
        assert sp.audio.dtype == np.float32 and sp.audio.shape == (round(3.3 * S.SR),)
        assert np.abs(sp.audio).max() < 1
        assert all(0 <= s < e <= 3.3 for s, e in sp.segments)
        for a, b, v in sp.visemes:
            assert v in S.VISEMES and any(s - 1e-3 <= a and b <= e + 1e-3 for s, e in sp.segments)
        if sp.source.startswith("tts"):
            assert sp.segments and sp.visemes and sp.text
        tracks = S.mouth_tracks(sp, 82, FPS)
        assert tracks["mouth"].shape == (82,) and 0 <= tracks["mouth"].min() and tracks["mouth"].max() <= 1
    assert kinds.count("silence") >= 1 and kinds.count("tts") >= 20
    a, b = S.speak(np.random.default_rng(7), 5.0), S.speak(np.random.default_rng(7), 5.0)
    assert np.array_equal(a.audio, b.audio) and (a.segments, a.visemes, a.text) == (b.segments, b.visemes, b.text)


@pytest.mark.skipif(not SHARED_SPEECH.is_dir(), reason="needs ../shared/media/speech")
def test_real_speech_is_cut_from_the_recordings_with_a_loudness_mouth():
    for seed in range(40):
        sp = S.speak(np.random.default_rng(seed), 6.0, "train", SHARED_SPEECH)
        if sp.source.startswith("real:"):
            break
    assert sp.source == "real:silero_test.wav" and sp.segments and sp.visemes == [] and sp.text == ""
    both = S.real_files([SHARED_SPEECH, SHARED_SPEECH.parent / "talking", "/nonexistent"], "train")
    assert {p.name for p in S.real_files(SHARED_SPEECH, "train")} < {p.name for p in both}
    tracks = S.mouth_tracks(sp, 150, FPS)
    centre = (np.arange(150) + 0.5) / FPS
    inside = np.any([(centre >= s) & (centre < e) for s, e in sp.segments], axis=0)
    assert tracks["mouth"][inside].mean() > 0.2 and np.all(tracks["mouth"][~inside] == 0)


def test_silero_vad_hears_the_tts():
    from stages.sense.speech import load_vad, speech_segments

    vad, found, true = load_vad(), 0.0, 0.0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        sp = S.Speech(np.zeros(0), [], [], "", "")
        while not sp.source.startswith("tts"):
            sp = S.speak(rng, 6.0, "eval")
        heard = speech_segments(vad, sp.audio)
        for s, e in sp.segments:
            true += e - s
            found += sum(max(0.0, min(e, b) - max(s, a)) for a, b in heard)
    assert found / true > 0.8


def test_noise_reverb_and_music_augmentation():
    rng = np.random.default_rng(0)
    u = S.tts("We walked to the park this morning.", "en-us+f1")
    audio = np.concatenate([np.zeros(8000, np.float32), u.audio, np.zeros(8000, np.float32)])
    seg = [(0.5 + u.span[0], 0.5 + u.span[1])]
    for color in ("white", "pink", "brown"):
        for snr in (0.0, 12.5, 30.0):
            noisy = S.add_noise(rng, audio, snr, seg, color)
            achieved = 10 * np.log10(S._power(audio, seg) / S._power(noisy - audio))
            assert abs(achieved - snr) < 0.5, (color, snr)
    pink = S.colored_noise(rng, 1 << 16, "pink")
    spec = np.abs(np.fft.rfft(pink)) ** 2
    f = np.fft.rfftfreq(1 << 16, 1 / S.SR)
    assert 2 < np.mean(spec[(f > 200) & (f < 400)]) / np.mean(spec[(f > 1600) & (f < 3200)]) < 16  # ~8: 3 dB/octave
    # shaped over the next fast FFT length: where n is fast already, exactly the shaping over n; a prime-rich n
    # (7919 * 7: the cut of a longer circular shaping) keeps its length, unit RMS and the -3 dB/octave slope
    white = np.random.default_rng(9).standard_normal(1 << 16)
    f16 = np.maximum(np.fft.rfftfreq(1 << 16, 1 / S.SR), 20.0)
    direct = np.fft.irfft(np.fft.rfft(white) / f16 ** 0.5, 1 << 16)
    np.testing.assert_array_equal(S.colored_noise(np.random.default_rng(9), 1 << 16, "pink"), direct / np.sqrt(np.mean(direct ** 2)))
    odd = S.colored_noise(rng, 7919 * 7, "pink")
    spec, f = np.abs(np.fft.rfft(odd)) ** 2, np.fft.rfftfreq(len(odd), 1 / S.SR)
    assert len(odd) == 7919 * 7 and abs(np.sqrt(np.mean(odd ** 2)) - 1) < 1e-9
    assert 4 < np.mean(spec[(f > 200) & (f < 400)]) / np.mean(spec[(f > 1600) & (f < 3200)]) < 12
    burst = np.zeros(S.SR * 2, np.float32)
    burst[:1600] = rng.standard_normal(1600)
    wet = S.reverb(rng, burst, rt60=0.5, wet=0.5)
    tail = [_level_db(wet, t, t + 0.05, band=False) for t in (0.15, 0.25, 0.35, 0.45)]
    assert tail[0] > -60 and np.all(np.diff(tail) < 0)
    decay_per_s = (tail[0] - tail[-1]) / 0.3
    assert 60 / 0.5 * 0.7 < decay_per_s < 60 / 0.5 * 1.3  # -60 dB per RT60
    assert _level_db(wet, 1.2, 1.9, band=False) < -100
    bed = S.music_bed(np.random.default_rng(3), S.SR * 4)
    assert abs(np.sqrt(np.mean(bed ** 2)) - 1) < 1e-3 and np.array_equal(bed, S.music_bed(np.random.default_rng(3), S.SR * 4))
    a = S.augment(np.random.default_rng(5), audio, seg)
    assert np.array_equal(a, S.augment(np.random.default_rng(5), audio, seg)) and a.shape == audio.shape
    assert not np.array_equal(a, S.augment(np.random.default_rng(6), audio, seg))
