"""Speech content with the timbre removed: WHAT is said, per 10 ms step, and how loud, not WHO says it.

The representation (issue 19), one row per log-mel step (models/audio.py: step j is centred at clip
sample j * hop, hop = 10 ms at 16 kHz):
- `phone`: one of PHONES, the 39 ARPAbet phones of CMUdict (pocketsphinx's en-us set) and SIL, the
  phone sounding at the step's centre. Visemes (VISEME_OF, the synthetic world's 15) follow from it.
- `loud`: loudness per video frame (25 fps: steps 4k .. 4k + 3 share frame k's value), 0 where the
  phone is SIL: each step's level (dB, 400-sample window centred on it) averaged over the frame,
  smoothed over frames by a Gaussian of sigma SMOOTH_FRAMES, standardised over the clip's speech
  frames (so neither gain nor a voice's own level and spread count) and mapped to 0.5 + 0.25 z in
  [0, 1] (over the whole clip given: a stream needs a trailing window, not built yet). Why so
  coarse: a speaker probe (stages/synth/voice.py) on 8 voices x 120 texts (chance
  0.125) told voices apart from phones plus a per-frame level under a running AGC at 0.25 (phones
  alone: 0.127); smoothed and standardised per clip: 0.17-0.19 (benchmarks/voice_foundation.py).
`features(phone, loud)` -> [T, len(PHONES) + 1] float32 (one-hot phone, loudness): the conditioning
row a model reads at the mel rate; `latent_rows` frames them per latent frame (models.audio.per_latent).

Where the phones come from:
- TTS speech: espeak-ng's own phoneme events (`from_espeak`: its mnemonics mapped by
  `espeak_to_arpabet`), the ground truth; stages/synth/voice.py makes it.
- Real speech (`recognise`): pocketsphinx, whose wheel ships the en-us acoustic model. method="words"
  recognises words (language model + CMUdict) then force-aligns their phones (stages.sense.lipsync.phones);
  method="allphone" decodes phones directly under the shipped phonetic language model, without words.
  Their agreement with the espeak truth on TTS speech is in benchmarks/RESULTS.md (2026-12-04,
  session 41), measured by benchmarks/voice_foundation.py.
Timbre: a voice classifier (stages/synth/voice.py) on these rows made from the espeak truth is at
chance on the phones (0.127-0.135, 8 voices, chance 0.125) and near it with the loudness (0.17-0.19),
where on log-mel it is at 1.00 (tests/test_voice.py). Made by the pocketsphinx front end from the same
audio, the phones tell the voices apart at 0.79: its errors depend on the voice (allphone agreement
0.11 on the child-like "zac" variant, 0.29-0.53 on the others), so real-speech content still carries
the driving speaker; a recogniser of our own trained on TTS truth (benchmarks/phone_recogniser_probe.py)
leaks less (0.20 / 0.30 on heard / unheard voices) but does not transfer to real speech.
"""
from __future__ import annotations

import numpy as np

HOP_S = 0.01  # one step: the log-mel hop (models.config.AudioConfig: 160 samples at 16 kHz)
SR = 16000
PHONES = ("SIL AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW "
          "V W Y Z ZH").split()
PHONE_ID = {p: i for i, p in enumerate(PHONES)}
FRAME_STEPS = 4  # steps per 25 fps video frame
FLOOR_DB = 60.0  # steps quieter than the clip's loudest by more read as this much under it
SMOOTH_FRAMES = 2.0  # Gaussian sigma of the loudness contour, video frames (80 ms; it reads 3 sigma ahead)
DITHER_DB = -40.0  # seeded white noise this far under the clip's RMS before pocketsphinx: TTS has digital
                   # silence (12 % of its samples), where its features break (allphone on 16 held-out en-us
                   # utterances: 0.377 / 0.418 / 0.451 phone agreement with no dither / -60 dB / -40 dB)
PS_CENTRE_S = 0.0125  # pocketsphinx frame i's 25.6 ms window is centred at i * 10 ms + 12.5 ms

# The synthetic world's visemes (stages/synth/speech.py VISEMES) of each phone.
VISEME_OF = {"SIL": "sil", "P": "PP", "B": "PP", "M": "PP", "F": "FF", "V": "FF", "TH": "TH", "DH": "TH",
             "T": "DD", "D": "DD", "K": "kk", "G": "kk", "NG": "kk", "HH": "kk", "CH": "CH", "JH": "CH",
             "SH": "CH", "ZH": "CH", "S": "SS", "Z": "SS", "N": "nn", "L": "nn", "R": "RR", "ER": "RR",
             "AA": "aa", "AE": "aa", "AH": "aa", "AY": "aa", "AW": "aa", "EH": "E", "EY": "E", "IH": "ih",
             "IY": "ih", "Y": "ih", "AO": "oh", "OY": "oh", "OW": "oh", "UH": "ou", "UW": "ou", "W": "ou"}
VISEMES = tuple(dict.fromkeys(VISEME_OF.values()))

# espeak-ng mnemonics (stress marks and the variant suffixes 2 and # removed) -> ARPAbet; r-coloured
# vowels and syllabic l are two phones, the first taking 60 % of the span.
_ESPEAK = {
    "p": "P", "b": "B", "t": "T", "d": "D", "k": "K", "g": "G", "f": "F", "v": "V", "T": "TH", "D": "DH",
    "s": "S", "z": "Z", "S": "SH", "Z": "ZH", "h": "HH", "x": "HH", "tS": "CH", "dZ": "JH", "m": "M",
    "n": "N", "N": "NG", "l": "L", "r": "R", "R": "R", "w": "W", "W": "W", "j": "Y", ";": "Y", "*": "D",
    "?": "T", "a": "AE", "aa": "AE", "A": "AA", "A:": "AA", "0": "AA", "O": "AO", "O:": "AO", "V": "AH",
    "@": "AH", "@5": "AH", "E": "EH", "e": "EH", "I": "IH", "i": "IY", "i:": "IY", "U": "UH", "u": "UW",
    "u:": "UW", "y": "UW", "3": "ER", "3:": "ER", "VR": "ER", "aI": "AY", "aU": "AW", "eI": "EY",
    "oU": "OW", "o": "OW", "@U": "OW", "OI": "OY", "o:": "OW",
    "@L": ("AH", "L"), "A@": ("AA", "R"), "o@": ("AO", "R"), "O@": ("AO", "R"), "e@": ("EH", "R"),
    "i@": ("IH", "R"), "i@3": ("IH", "R"), "U@": ("UH", "R"), "aI@": ("AY", "ER"), "aU@": ("AW", "ER"),
}


def mnemonic_core(name: str) -> str | None:
    """An espeak-ng phoneme mnemonic without its stress marks; None for a pause."""
    core = name.lstrip("'%,=")
    return None if not core or core.startswith("_") else core


def span_cuts(a: float, b: float, parts: int) -> list[float]:
    """The cut points of a phoneme's span [a, b] shared by its `parts` (1 or 2) sounds: of two
    (a diphthong, an r-coloured vowel), the first takes 60 %."""
    return [a, a + 0.6 * (b - a), b] if parts == 2 else [a, b]


def espeak_to_arpabet(name: str) -> tuple[str, ...]:
    """The ARPAbet phone(s) of an espeak-ng mnemonic: ("SIL",) for pauses, by the first letter when
    the mnemonic is not in the table (other languages' phonemes)."""
    core = mnemonic_core(name)
    if core is None:
        return ("SIL",)
    for key in (core, core.rstrip("2#"), core.rstrip("2#").rstrip(":")):
        if key in _ESPEAK:
            hit = _ESPEAK[key]
            return hit if isinstance(hit, tuple) else (hit,)
    hit = _ESPEAK.get(core[0], "AH")
    return hit if isinstance(hit, tuple) else (hit,)


def from_espeak(phonemes: list[tuple[float, float, str]], offset: float = 0.0) -> list[tuple[str, float, float]]:
    """espeak-ng's timed phonemes (start s, end s, mnemonic) -> (ARPAbet phone, start s, end s),
    shifted by `offset` s."""
    out = []
    for a, b, name in phonemes:
        ps = espeak_to_arpabet(name)
        cuts = span_cuts(a, b, len(ps))
        out += [(p, s + offset, e + offset) for p, s, e in zip(ps, cuts, cuts[1:]) if e > s]
    return out


def phone_steps(segments: list[tuple[str, float, float]], T: int) -> np.ndarray:
    """[T] int64 PHONE_ID of the phone sounding at each step's centre j * HOP_S (SIL where none;
    unknown names, e.g. pocketsphinx's +NSN+ noise, are SIL)."""
    out = np.zeros(T, np.int64)
    for p, s, e in segments:
        a, b = max(0, int(np.ceil(s / HOP_S - 1e-9))), min(T, int(np.ceil(e / HOP_S - 1e-9)))
        if b > a:
            out[a:b] = PHONE_ID.get(p, 0)
    return out


def step_level(audio: np.ndarray, T: int, sr: int = SR) -> np.ndarray:
    """[T] float64: the level of each step, dB (RMS of the 400 samples centred on j * HOP_S)."""
    x = np.asarray(audio, np.float64)
    hop, half = round(HOP_S * sr), 200
    c = np.concatenate([[0.0], np.cumsum(x * x)])
    centre = np.arange(T) * hop
    a, b = np.clip(centre - half, 0, len(x)), np.clip(centre + half, 0, len(x))
    return 10 * np.log10((c[b] - c[a]) / np.maximum(b - a, 1) + 1e-10)


def loudness(audio: np.ndarray, phone: np.ndarray, sr: int = SR) -> np.ndarray:
    """[T] float32 in [0, 1] (module docstring): per-frame level, smoothed, standardised over the
    speech frames, 0 where `phone` is SIL (all 0 without speech)."""
    from scipy.ndimage import gaussian_filter1d

    T = len(phone)
    speech = phone > 0
    if not speech.any():
        return np.zeros(T, np.float32)
    n = -(-T // FRAME_STEPS) * FRAME_STEPS
    level = step_level(audio, T, sr)
    level = np.maximum(level, level.max() - FLOOR_DB)  # a floor under the peak, not absolute: gain does not count
    frames = np.pad(level, (0, n - T), mode="edge").reshape(-1, FRAME_STEPS).mean(1)
    level = np.repeat(gaussian_filter1d(frames, SMOOTH_FRAMES, mode="nearest"), FRAME_STEPS)[:T]
    z = (level - level[speech].mean()) / (level[speech].std() + 0.5)  # + 0.5 dB: a flat contour stays 0.5
    return (np.clip(0.5 + 0.25 * z, 0, 1) * speech).astype(np.float32)


def features(phone: np.ndarray, loud: np.ndarray) -> np.ndarray:
    """[T] phone ids and [T] loudness -> [T, len(PHONES) + 1] float32 (one-hot, loudness)."""
    if len(phone) != len(loud):
        raise ValueError(f"{len(phone)} phone steps but {len(loud)} loudness steps")
    out = np.zeros((len(phone), len(PHONES) + 1), np.float32)
    out[np.arange(len(phone)), phone] = 1
    out[:, -1] = loud
    return out


def latent_rows(phone: np.ndarray, loud: np.ndarray, n_latent: int, before: int = 0):
    """`features` on the model's latent timeline: torch [n_latent, mel_per_latent, len(PHONES) + 1]
    (models.audio.per_latent: the lead-in and missing steps are SIL at loudness 0), the content
    counterpart of models.audio.audio_features' log-mel rows."""
    import torch

    from models.audio import per_latent

    rows = per_latent(torch.as_tensor(features(phone, loud)), n_latent, pad_value=0.0, before=before)
    rows[..., 0] += (rows[..., :-1].sum(-1) == 0).to(rows.dtype)
    return rows


def steps_for(samples: int, sr: int = SR) -> int:
    """Steps of a clip of `samples` samples: centres 0, hop, ... inside it."""
    return (samples - 1) // round(HOP_S * sr) + 1 if samples > 0 else 0


# --- the front end for real speech -------------------------------------------------------------------

_allphone: list = []


def _allphone_decoder():
    if not _allphone:
        import os

        import pocketsphinx

        model = pocketsphinx.get_model_path()
        d = pocketsphinx.Decoder(loglevel="FATAL", lm=None, allphone=os.path.join(model, "en-us", "en-us-phone.lm.bin"),
                                 lw=1.0, beam=1e-20, pbeam=1e-20)  # lw 1 / 2 / 4 / 8: 0.385 / 0.364 / 0.350 / 0.223 agreement (no dither)
        d.config["remove_noise"] = False  # as stages.sense.lipsync.decoder: no carry-over between utterances
        d.reinit_feat()
        _allphone.append(d)
    return _allphone[0]


def allphone(wave: np.ndarray) -> list[tuple[str, float, float]]:
    """(phone, start s, end s) of 16 kHz speech from pocketsphinx's phone loop (no words)."""
    d = _allphone_decoder()
    d.start_utt()
    d.process_raw((np.clip(wave, -1, 1) * 32767).astype(np.int16).tobytes(), full_utt=True)
    d.end_utt()
    return [(s.word, s.start_frame * HOP_S, (s.end_frame + 1) * HOP_S) for s in d.seg()]


def _centred(segments: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    return [(p, a + PS_CENTRE_S, b + PS_CENTRE_S) for p, a, b in segments]


def recognise(wave: np.ndarray, method: str = "words") -> list[tuple[str, float, float]]:
    """Timed phones of real 16 kHz speech: method "words" (recognised words force-aligned to phones)
    or "allphone" (the phone loop); times are the centres of pocketsphinx's analysis windows, so a step
    gets the phone whose frames are centred on it (+12.5 ms raised agreement by 0.02-0.03 on both)."""
    x = np.asarray(wave, np.float64)
    rms = np.sqrt(np.mean(x * x)) if x.size else 0.0
    x = (x + 10 ** (DITHER_DB / 20) * rms * np.random.default_rng(0).standard_normal(x.size)).astype(np.float32)
    if method == "words":
        from stages.sense.lipsync import phones
        return _centred(phones(x))
    if method == "allphone":
        return _centred(allphone(x))
    raise ValueError(f"method is 'words' or 'allphone', not {method!r}")


def content(wave: np.ndarray, method: str = "words", segments: list[tuple[str, float, float]] | None = None) -> dict:
    """{"phone": [T] ids, "loud": [T]} of 16 kHz speech, T = steps_for(len(wave)); the phones from
    `segments` when given (e.g. the TTS truth), else `recognise(wave, method)`."""
    T = steps_for(len(wave))
    segs = recognise(wave, method) if segments is None else segments
    phone = phone_steps(segs, T)
    return {"phone": phone, "loud": loudness(wave, phone)}
