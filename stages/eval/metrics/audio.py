"""Audio metrics of generated speech (issue 19): seams at chunk edges, and how far a waveform's log-mel
is from the log-mel it was made from.

- `spectral_flux(wave)`: per STFT frame (n_fft 256, hop 64 at 16 kHz: 16 ms windows, 4 ms apart) the
  mean over bins of |log|X_t| - log|X_t-1||, magnitudes floored at 1e-4 of the clip's largest (so
  silence does not count as change); frames more than 50 dB under the loudest are marked inactive.
- `edge_flux_ratio(wave, edges)`: mean flux of the active frames whose window holds a chunk edge
  over the mean flux of the other active frames. ~1: nothing happens at the edges that does not
  happen elsewhere; a click or a phase jump at each edge lifts it (per-chunk Griffin-Lim: see
  benchmarks/RESULTS.md, 2026-12-04 session 41).
- `logmel_l1(wave, log_mel)`: mean |log-mel(wave) - log_mel| over the steps both have (models/audio.py's
  mel, steps centred at j * hop).

A generated audio track against the speech that drove it (`score_generated`, `vidu eval --driving`):
- envelope: loudness per 25 fps frame (ENVELOPE_FPS: the video's rate), dB of the mean power of the
  frame's 10 ms steps (stages.sense.content.step_level), floored ENVELOPE_FLOOR_DB under the clip's
  loudest frame (silence levels do not count); `envelope_r` = Pearson r of the two envelopes over
  the frames both have, `envelope_r_control` the same against the driving envelope rotated by half
  its length (a mismatched control: what r is for speech that is not this one), `envelope_lag_frames`
  the lag in -12..12 frames (+ = generated late) with the highest r.
- intelligibility: pocketsphinx (stages.sense.lipsync's "words" decoder: en-us acoustic model,
  language model, CMUdict, shipped in the wheel; the input dithered at stages.sense.content.DITHER_DB
  as its front end does) transcribes both tracks; `wer_generated` / `wer_driving` = word error rate
  (word-level edit distance / reference words, case and punctuation ignored) against `text` when
  given, else `wer_generated` is against the driving speech's transcript (`wer_driving` None).
- voice similarity: resemblyzer's VoiceEncoder (its weights ship in the wheel) embeds the generated
  track and, once per process, one reference sentence (VOICE_REFERENCE) in each stages.synth.voice
  VOICES voice at default prosody; `voice_similarity` = cosine to the chosen voice's embedding,
  `voice_similarity_other` = the highest cosine to another voice, `voice_nearest` the closest voice.
- `edge_flux_ratio` at the chunk edges: after the first chunk's `first_frames` video frames, then
  every `chunk_frames` (25 fps, 640 samples a frame). `vidu stream`'s layout with the tiny and small
  presets (TAEHV pad_start: a chunk's first latent frame of the stream decodes to one frame, the others
  to four): chunk_frames = 4 x latent frames per chunk, first_frames = chunk_frames - 3 (starter
  `small`, 3 latent frames: 12 and 9; `tiny`, 1: 4 and 1).
- `pair_sync`: the audio/video sync of a generated pair whose speech no recogniser reads (the lip-sync
  proxy of stages/eval/metrics/sync.py, `vidu eval --video`, needs recognised words): Pearson r between
  the video's mouth-opening track and the track's loudness envelope, both per video frame, at lags
  -MAX_LAG_FRAMES..MAX_LAG_FRAMES (mouth frame t against envelope frame t + k: positive k = audio late);
  `av_offset_frames` = argmax r(k), `av_r` = r(0).
"""
from __future__ import annotations

import numpy as np

N_FFT, HOP = 256, 64
ACTIVE_DB = 50.0
SR = 16000
ENVELOPE_FPS = 25.0
ENVELOPE_FLOOR_DB = 40.0
MAX_LAG_FRAMES = 12
CHUNK_FRAMES = 12  # video frames per chunk of the starter's stream: 3 latent frames x 4
VOICE_REFERENCE = "Anna bought a new bike this morning and rode it across the bridge to the quiet station."


def spectral_flux(wave: np.ndarray, n_fft: int = N_FFT, hop: int = HOP) -> tuple[np.ndarray, np.ndarray]:
    """(flux [F], active [F] bool) for frames 1 .. F of `wave`; frame t covers samples t * hop .. t * hop + n_fft."""
    x = np.asarray(wave, np.float64)
    if len(x) < n_fft + hop:
        raise ValueError(f"need at least {n_fft + hop} samples, got {len(x)}")
    idx = np.arange(n_fft)[None] + hop * np.arange((len(x) - n_fft) // hop + 1)[:, None]
    mag = np.abs(np.fft.rfft(x[idx] * np.hanning(n_fft), axis=1))
    floor = 1e-4 * mag.max() + 1e-12
    logm = np.log(np.maximum(mag, floor))
    flux = np.abs(np.diff(logm, axis=0)).mean(1)
    energy = 10 * np.log10((mag ** 2).sum(1) + 1e-20)
    active = energy[1:] > energy.max() - ACTIVE_DB
    return flux, active


def edge_flux_ratio(wave: np.ndarray, edges, n_fft: int = N_FFT, hop: int = HOP) -> float:
    """Mean flux at frames whose window holds an edge sample over the mean flux elsewhere (active frames)."""
    flux, active = spectral_flux(wave, n_fft, hop)
    start = (np.arange(len(flux)) + 1) * hop
    at = np.zeros(len(flux), bool)
    for e in edges:
        at |= (start <= e) & (e < start + n_fft)
    a, b = at & active, ~at & active
    if not a.any() or not b.any() or flux[b].mean() <= 0:
        raise ValueError("no active frames at the edges or away from them (a silent or constant track)")
    return float(flux[a].mean() / flux[b].mean())


def logmel_l1(wave: np.ndarray, log_mel: np.ndarray) -> float:
    """Mean |log-mel(wave) - log_mel| (natural log, [T, n_mels]) over their common steps."""
    from stages.synth.voice import log_mel as mel_of

    m = mel_of(np.asarray(wave, np.float32))
    T = min(len(m), len(log_mel))
    return float(np.abs(m[:T] - log_mel[:T]).mean())


# --- a generated track against its driving speech --------------------------------------------------

def envelope(wave: np.ndarray, fps: float = ENVELOPE_FPS) -> np.ndarray:
    """[F] dB per video frame (F = whole frames in `wave`): mean power of the frame's 10 ms steps,
    floored ENVELOPE_FLOOR_DB under the loudest frame."""
    from stages.sense.content import HOP_S, step_level

    x = np.asarray(wave, np.float64)
    per = 1.0 / (fps * HOP_S)  # steps per frame
    F = int(len(x) / SR * fps + 1e-9)
    if F < 2:
        raise ValueError(f"audio of {len(x) / SR:.2f} s is too short for a loudness envelope")
    T = int(round(F * per))
    power = 10 ** (step_level(x, T) / 10)
    idx = np.minimum((np.arange(T) / per).astype(int), F - 1)
    db = 10 * np.log10(np.bincount(idx, power, F) / np.bincount(idx, None, F) + 1e-10)
    return np.maximum(db, db.max() - ENVELOPE_FLOOR_DB)


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson r; None when either is flat (under 0.01 dB of spread: silence, a constant tone)."""
    if a.std() < 1e-2 or b.std() < 1e-2:
        return None
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def envelope_correlation(generated: np.ndarray, driving: np.ndarray, fps: float = ENVELOPE_FPS,
                         max_lag: int = MAX_LAG_FRAMES) -> dict:
    """{envelope_r, envelope_r_control, envelope_lag_frames, envelope_frames} (module docstring)."""
    g, d = envelope(generated, fps), envelope(driving, fps)
    n = min(len(g), len(d))
    if n < 2 * max_lag + 4:
        raise ValueError(f"need {(2 * max_lag + 4) / fps:.2f} s of audio in both tracks for the envelope, got {n / fps:.2f} s")
    g, d = g[:n], d[:n]
    lags = np.arange(-max_lag, max_lag + 1)
    r = [_pearson(g[max(k, 0):n + min(k, 0)], d[max(-k, 0):n - max(k, 0)]) for k in lags]
    r = np.array([np.nan if v is None else v for v in r])
    return {"envelope_r": _pearson(g, d), "envelope_r_control": _pearson(g, np.roll(d, n // 2)),
            "envelope_lag_frames": None if np.all(np.isnan(r)) else int(lags[int(np.nanargmax(r))]),
            "envelope_frames": int(n), "envelope_fps": float(fps)}


def transcribe(wave: np.ndarray) -> str:
    """Words pocketsphinx recognises in 16 kHz speech (lower case, fillers and noise dropped)."""
    from stages.sense.content import DITHER_DB
    from stages.sense.lipsync import decoder

    x = np.asarray(wave, np.float64)
    rms = np.sqrt(np.mean(x * x)) if x.size else 0.0
    x = x + 10 ** (DITHER_DB / 20) * rms * np.random.default_rng(0).standard_normal(x.size)
    d = decoder("words")
    d.start_utt()
    d.process_raw((np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes(), full_utt=True)
    d.end_utt()
    return " ".join(s.word.split("(")[0] for s in d.seg() or () if not s.word.startswith(("<", "[", "+")))


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance (substitutions, insertions, deletions) over the reference's words."""
    ref, hyp = _words(reference), _words(hypothesis)
    if not ref:
        raise ValueError("the reference text has no words")
    row = np.arange(len(hyp) + 1)
    for i, w in enumerate(ref, 1):
        prev, row = row, np.empty_like(row)
        row[0] = i
        for j, h in enumerate(hyp, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (w != h))
    return float(row[-1] / len(ref))


def intelligibility(generated: np.ndarray, driving: np.ndarray, text: str | None = None) -> dict:
    """{wer_generated, wer_driving, transcript_generated, transcript_driving, wer_reference} (module docstring)."""
    tg, td = transcribe(generated), transcribe(driving)
    if text is not None:
        return {"wer_generated": word_error_rate(text, tg), "wer_driving": word_error_rate(text, td),
                "transcript_generated": tg, "transcript_driving": td, "wer_reference": "text"}
    wer = word_error_rate(td, tg) if _words(td) else None
    return {"wer_generated": wer, "wer_driving": None, "transcript_generated": tg, "transcript_driving": td,
            "wer_reference": "driving transcript"}


_voice_refs: dict = {}


def _encoder():
    if "encoder" not in _voice_refs:
        from resemblyzer import VoiceEncoder

        _voice_refs["encoder"] = VoiceEncoder("cpu", verbose=False)
    return _voice_refs["encoder"]


def voice_embedding(wave: np.ndarray) -> np.ndarray:
    """[256] L2-normed resemblyzer embedding of 16 kHz speech (its own preprocessing: VAD trim, -30 dBFS)."""
    from resemblyzer import preprocess_wav

    if not np.any(wave):
        raise ValueError("a silent track: too little speech for a voice embedding")
    x = preprocess_wav(np.asarray(wave, np.float32), SR)
    if len(x) < SR // 2:
        raise ValueError(f"only {len(x) / SR:.2f} s of speech: too little for a voice embedding")
    return _encoder().embed_utterance(x)


def voice_references() -> dict[str, np.ndarray]:
    """{voice: embedding} of VOICE_REFERENCE spoken in every VOICES voice (rate 175, its base pitch), cached."""
    if "refs" not in _voice_refs:
        from stages.synth.speech import tts
        from stages.synth.voice import VOICES

        _voice_refs["refs"] = {v: voice_embedding(tts(VOICE_REFERENCE, e, 175, p, 50).audio)
                               for v, (e, p) in sorted(VOICES.items())}
    return _voice_refs["refs"]


def voice_similarity(generated: np.ndarray, voice: str) -> dict:
    """{voice, voice_similarity, voice_similarity_other, voice_nearest, voice_similarities} (module docstring)."""
    refs = voice_references()
    if voice not in refs:
        raise ValueError(f"no voice {voice!r}; voices: {', '.join(refs)}")
    e = voice_embedding(generated)
    sims = {v: float(e @ r) for v, r in refs.items()}
    return {"voice": voice, "voice_similarity": sims[voice],
            "voice_similarity_other": max(s for v, s in sims.items() if v != voice),
            "voice_nearest": max(sims, key=sims.get), "voice_similarities": sims}


def chunk_edges(samples: int, chunk_frames: int = CHUNK_FRAMES, first_frames: int | None = None,
                fps: float = ENVELOPE_FPS) -> list[int]:
    """Sample indices of the chunk edges of a track: after `first_frames` frames (default `chunk_frames`),
    then every `chunk_frames` frames; edges in the last 512 samples left out."""
    if chunk_frames < 1 or (first_frames is not None and first_frames < 1):
        raise ValueError(f"chunk frames must be >= 1, not {chunk_frames} / {first_frames}")
    first = chunk_frames if first_frames is None else first_frames
    per = SR / fps
    out, f = [], first
    while f * per < samples - 512:
        out.append(int(round(f * per)))
        f += chunk_frames
    return out


def pair_sync(mouth: np.ndarray, wave: np.ndarray, fps: float = ENVELOPE_FPS, max_lag: int = MAX_LAG_FRAMES) -> dict:
    """{av_r, av_offset_frames} of a mouth track [T] (per video frame at `fps`; NaN where no
    face: a closed mouth) against the envelope of `wave` (module docstring); None where a track is flat."""
    m = np.nan_to_num(np.asarray(mouth, np.float64))
    e = envelope(wave, fps)
    n = min(len(m), len(e))
    if n < 2 * max_lag + 4:
        raise ValueError(f"need {(2 * max_lag + 4) / fps:.2f} s of video and audio for their sync, got {n / fps:.2f} s")
    m, e = m[:n], e[:n]
    lags = np.arange(-max_lag, max_lag + 1)
    r = np.array([np.nan if v is None else v for v in
                  (_pearson(m[max(-k, 0):n - max(k, 0)], e[max(k, 0):n + min(k, 0)]) for k in lags)])
    return {"av_r": _pearson(m, e), "av_offset_frames": None if np.all(np.isnan(r)) else int(lags[int(np.nanargmax(r))])}


def score_generated(generated: np.ndarray, driving: np.ndarray, text: str | None = None, voice: str | None = None,
                    chunk_frames: int | None = CHUNK_FRAMES, first_frames: int | None = None) -> dict:
    """The audio metrics of a generated track against its driving speech (16 kHz mono arrays): the
    envelope, intelligibility, voice similarity (with `voice`) and chunk-edge flux (with `chunk_frames`)."""
    if not np.any(np.asarray(driving)):
        raise ValueError("the driving speech is silent")
    out = {"audio_seconds": len(generated) / SR, "driving_seconds": len(driving) / SR}
    out.update(envelope_correlation(generated, driving))
    out.update(intelligibility(generated, driving, text))
    if voice is not None:
        from stages.synth.voice import VOICES

        if voice not in VOICES:
            raise ValueError(f"no voice {voice!r}; voices: {', '.join(sorted(VOICES))}")
        try:
            out.update(voice_similarity(generated, voice))
        except ValueError as e:  # too little speech in the track: the voice is not measured, the rest is
            out.update(voice=voice, voice_similarity=None, voice_similarity_other=None, voice_nearest=None,
                       voice_note=str(e))
    if chunk_frames:
        edges = chunk_edges(len(generated), chunk_frames, first_frames)
        out["chunk_frames"] = int(chunk_frames)
        out["first_chunk_frames"] = int(chunk_frames if first_frames is None else first_frames)
        try:
            out["edge_flux_ratio"] = edge_flux_ratio(generated, edges) if edges else None
        except ValueError as e:
            out.update(edge_flux_ratio=None, edge_flux_note=str(e))
    return out
