"""The lip-sync proxy estimator: measured lip aperture against the aperture the spoken phones predict,
r(k) over audio-visual lags k = -15..15 frames at 25 fps (positive k = audio late).

The method, its measurements on the real talking heads and the rejected alternatives are written in
stages/eval/metrics/sync.py, `vidu eval`'s lip-sync metric, which scores with it. It lives here, below
the stage modules, because curation (`vidu diarize`: stages/diarize.py, the A/V offset per clip) uses
the same estimator and the layer contracts (pyproject.toml) keep the stage modules independent.
"""
from __future__ import annotations

import numpy as np

from stages.sense.mouth import FACE_FPS, LEFT_EYE, RIGHT_EYE
from stages.sense.speech import SAMPLE_RATE

PROXY = "proxy:lip-aperture-phone-track"
MAX_OFFSET = 15  # frames each way
MIN_FRAMES = 25  # fitted frames with a face
PHONE_HOP = 0.01  # s: pocketsphinx frames; frame i's 25.6 ms window is centred at i * 10 ms + 12.5 ms
COARTICULATION = 0.04  # s: Gaussian sigma smoothing the phone targets
HIGHPASS = 6  # frames: Gaussian sigma of the slow trend removed from both tracks (keeps >~1 Hz)
UPPER_OUTER, LOWER_OUTER = [50, 51, 52], [58, 57, 56]  # 68-point layout: outer lip, top and bottom

# Lip aperture targets per ARPAbet phone (CMUdict set, pocketsphinx en-us): 0 = lips closed, 1 = open
# vowels. Bilabials close the lips, labiodentals nearly; vowels by height (open > mid > close);
# other consonants a middle value; silence and noise a rest position.
OPENNESS = {"AA": 1.0, "AE": 0.9, "AO": 0.9, "AW": 0.9, "AY": 0.9, "AH": 0.7, "EH": 0.7, "OY": 0.7,
            "EY": 0.6, "OW": 0.6, "ER": 0.5, "IH": 0.5, "UH": 0.5, "IY": 0.4, "UW": 0.35,
            "M": 0.0, "B": 0.0, "P": 0.0, "F": 0.15, "V": 0.15}
CONSONANT, REST = 0.35, 0.1

_decoders: dict = {}


def lip_aperture(landmarks: np.ndarray) -> np.ndarray:
    """[T, 68, 2] -> [T]: outer-lip height (mean of 3 point pairs) over the distance between the eye centres."""
    eyes = np.linalg.norm(landmarks[:, RIGHT_EYE].mean(1) - landmarks[:, LEFT_EYE].mean(1), axis=-1)
    height = np.linalg.norm(landmarks[:, UPPER_OUTER] - landmarks[:, LOWER_OUTER], axis=-1).mean(-1)
    return height / np.maximum(eyes, 1e-6)


def decoder(kind: str):
    """A cached pocketsphinx decoder: "words" (en-us acoustic model, language model and CMUdict, as
    shipped in the wheel) or "align" (the same without a language model, for forced alignment)."""
    if kind not in _decoders:
        import pocketsphinx

        d = (pocketsphinx.Decoder(loglevel="FATAL") if kind == "words"
             else pocketsphinx.Decoder(loglevel="FATAL", lm=None))
        # the model's feat.params turns on noise removal, whose noise estimate carries over from the
        # previous utterance: off, so a score does not depend on what was scored before
        d.config["remove_noise"] = False
        d.reinit_feat()
        _decoders[kind] = d
    return _decoders[kind]


def _decode(d, pcm: bytes) -> None:
    d.start_utt()
    d.process_raw(pcm, full_utt=True)
    d.end_utt()


def phones(wave: np.ndarray) -> list[tuple[str, float, float]]:
    """(phone, start s, end s) of 16 kHz speech: words recognised with pocketsphinx's en-us model, then
    force-aligned to phones; where the phone pass fails, each word's dictionary phones share its span."""
    pcm = (np.clip(wave, -1, 1) * 32767).astype(np.int16).tobytes()
    d = decoder("words")
    _decode(d, pcm)
    words = [(s.word, s.start_frame, s.end_frame + 1) for s in d.seg() or ()
             if not s.word.startswith(("<", "[", "+"))]  # <s>, <sil>, [NOISE], +SPN+: rest
    if not words:
        return []
    a = decoder("align")
    try:
        a.set_align_text(" ".join(w.split("(")[0] for w, _, _ in words))
        _decode(a, pcm)
        a.set_alignment()
        _decode(a, pcm)
        return [(p.name, p.start * PHONE_HOP, (p.start + p.duration) * PHONE_HOP)
                for w in a.get_alignment() for p in w]
    except RuntimeError:  # the phone pass cannot always close the utterance (1 of the 15 measured waves)
        out = []
        for w, s, e in words:
            ph = (d.lookup_word(w) or "").split()
            edges = np.linspace(s, e, len(ph) + 1) * PHONE_HOP
            out += [(p, float(a0), float(a1)) for p, a0, a1 in zip(ph, edges[:-1], edges[1:])]
        return out


def phone_track(segments: list[tuple[str, float, float]], T: int, fps: float = FACE_FPS) -> np.ndarray:
    """[T] predicted lip aperture at the frame times t / fps: the phones' OPENNESS targets on the 10 ms
    grid (REST between phones), smoothed by a COARTICULATION Gaussian."""
    from scipy.ndimage import gaussian_filter1d

    n = int(np.ceil(max([T / fps] + [e for _, _, e in segments]) / PHONE_HOP)) + 2
    x = np.full(n, REST)
    for p, s, e in segments:
        target = OPENNESS.get(p, CONSONANT if p.isalpha() and p != "SIL" else REST)  # +SPN+, +NSN+: REST
        x[round(s / PHONE_HOP):round(e / PHONE_HOP)] = target
    x = gaussian_filter1d(x, COARTICULATION / PHONE_HOP)
    return np.interp(np.arange(T) / fps, np.arange(n) * PHONE_HOP + 0.0125, x)


def highpass(x: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter1d

    return x - gaussian_filter1d(x, HIGHPASS)


def lag_curve(mouth: np.ndarray, speech: np.ndarray, face: np.ndarray, max_offset: int = MAX_OFFSET) -> np.ndarray:
    """Pearson r(k) of mouth[t] and speech[t + k], k = -max_offset..max_offset, over the frames t in
    [max_offset, T - max_offset) with a face (the same frames at every lag)."""
    T = len(mouth)
    t = np.arange(max_offset, T - max_offset)
    t = t[face[t]]
    x = mouth[t] - mouth[t].mean()
    out = []
    for k in range(-max_offset, max_offset + 1):
        y = speech[t + k] - speech[t + k].mean()
        out.append(float(x @ y / max(np.sqrt((x @ x) * (y @ y)), 1e-12)))
    return np.array(out)


def sync_curve(landmarks: np.ndarray, wave: np.ndarray | None) -> np.ndarray | None:
    """r(k) of one contiguous piece: landmarks [T, 68, 2] at 25 fps (nan: no face) and the 16 kHz
    wave starting at its first frame; None when too short, without enough face, or without speech."""
    T = len(landmarks)
    face = ~np.isnan(landmarks).any(axis=(1, 2))
    if wave is None or len(wave) < SAMPLE_RATE // 2 or T < 2 * MAX_OFFSET + MIN_FRAMES \
            or face[MAX_OFFSET:T - MAX_OFFSET].sum() < MIN_FRAMES:
        return None
    segments = phones(wave[: int(T * SAMPLE_RATE / FACE_FPS)])
    if not segments:
        return None
    mouth = lip_aperture(np.where(face[:, None, None], landmarks, 0.0).astype(np.float64))
    mouth[~face] = mouth[face].mean()  # frames without a face are not fitted; this keeps the filter finite
    return lag_curve(highpass(mouth), highpass(phone_track(segments, T)), face)


def sync_fields(curves: list[np.ndarray | None]) -> dict:
    """The sync fields from the r curves of one or more pieces (averaged: pieces of a long video)."""
    curves = [c for c in curves if c is not None]
    out = {"sync_method": PROXY, "sync_offset_frames": None, "sync_confidence": None, "sync_distance": None,
           "sync_curve": None, "sync_pieces": len(curves)}
    if not curves:
        return out
    r = np.mean(curves, axis=0)
    k = int(np.argmax(r))
    out.update(sync_offset_frames=k - MAX_OFFSET, sync_confidence=float(r[k] - np.median(r)),
               sync_distance=float(2 * (1 - r[k])), sync_curve=[round(float(v), 4) for v in r])
    return out
