"""Lip sync.

SyncNet protocol (Chung & Zisserman 2016; syncnet_python): video at 25 fps, audio at 16 kHz, 0.2 s
MFCC windows against 5-frame mouth crops, offsets searched over +-15 frames; Sync-D = mean embedding
distance at the best offset, Sync-C = median - min of the distance curve. With local SyncNet weights
(`--syncnet PATH`: the official syncnet_v2.model state dict) that protocol is run, `sync_method` =
"syncnet" (stages/eval/metrics/syncnet.py: network, inputs, offset sign and the deviations from the
reference, e.g. dlib face boxes instead of S3FD); a missing file or one that is not a SyncNet state
dict is refused with one line.

Default: an offline proxy with the same output fields, `sync_method` = PROXY (never Sync-C / Sync-D):
the measured lip aperture against the aperture the spoken phones predict.
- speech -> phones: pocketsphinx (the wheel ships its en-us acoustic model, language model and
  CMUdict) recognises the words, then force-aligns them to phones (10 ms frames); where the phone pass
  fails, a word's dictionary phones share its span equally. Each phone sets an aperture target
  (OPENNESS: bilabials m b p closed, f v nearly, vowels by height, other consonants 0.35, silence
  0.1), smoothed by a 40 ms Gaussian (coarticulation) and read at the frame times t / 25 s;
- mouth: outer-lip height (dlib's 68 points 50-52 against 58-56, stages/sense/mouth.py at 25 fps)
  over the distance between the eye centres;
- both tracks lose their slow trend (minus a Gaussian of sigma 6 frames: pauses and posture count
  less than syllables), then at each lag k in -15..15 frames (mouth frame t against speech frame
  t + k: positive k = audio late) the Pearson r(k) over the same frames t in [15, T - 15) that show
  a face. Nothing is fitted, so no lag is favoured by fitting;
- `sync_offset_frames` = argmax r, `sync_confidence` = max r - median r, `sync_distance` = 2 (1 - max r):
  the mean squared difference of the standardised tracks at the best offset (0 = locked, lower is
  better). `sync_curve` keeps r(k).
Needs T >= 55 frames (2.2 s) with a face in 25 of the fitted frames, and recognised speech; else the
fields are None. A long video scored in pieces (stages/eval/video.py) averages the pieces' r curves
(`sync_pieces`). Costs about one second of CPU per second of audio (the word search); the phone
model is English, so other languages give rougher phones (timings still follow the sound).

Measured with benchmarks/sync_proxy.py (the `vidu eval` path: 25 fps grid, analysis size 320) on the
five retalking clips (../shared/media/talking, 5-6.6 s); offset / confidence / distance, and the
offsets of the derived shapes against their own audio:

    clip  own audio         audio +0.5 s   next clip's audio   portrait 9:16  1080p  30 fps
    1     -1  0.56  0.97    +11            +3   0.17  1.64     -2             -2     -2
    2     +1  0.42  1.07    +14             0   0.30  1.45     +1             +1      0
    3     +1  0.77  0.70    +13            -10  0.30  1.31     +1             +1      0
    4      0  0.41  1.25    +12            +15  0.30  1.47      0              0     -1
    5      0  0.46  1.05    +12            -4   0.39  1.20     -1              0     -1

Own audio: |offset| <= 1 on all five. The 0.5 s delay (12.5 frames) moves the peak by 12 or 13 on all
five, so it reads 12-13 where the own offset reads 0 or +1 (clips 3-5), and 11 / 14 on clips 1 / 2:
searched in 10 ms steps, those two sit at -1.5 / +1.25 frames (delayed +11.25 / +13.5); the five
shifts measure 12.25-12.75 frames, so what is off there is the clip (or the proxy's reading of that
speaker), not the lag search. Derived shapes: within 1 frame of the original on all 15; clip 1's
-1.5 rounds to -2 in all three. Every clip's video against each of the 4 other clips' audio (20
pairs): confidence lower and distance higher than with its own audio in 20 of 20, though by as little
as 0.03 in confidence (clip 5's video with clip 4's audio: 0.43 vs 0.46; distance 1.19 vs 1.05).
Measured and rejected (all five clips x own / delayed / next clip's audio): the previous
canonical-correlation proxy (lip shape vs log-mel, a CCA fitted per lag: own within +-1 on 2 of 5,
delayed 12-13 on 3, foreign confidence lower on 4); inner-lip gap against 300-3000 Hz log energy, raw,
as velocities or band-passed 1-8 Hz (own within +-1 on at most 2); pocketsphinx's phone loop without
words (2 of 5); the recognised phones against the inner-lip gap without trend removal (own 5, delayed
4, foreign lower 3); trend sigma 10 or 15 frames instead of 6 (own 4-5, foreign lower 3-4).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.eval.metrics import EvalError
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


def check_syncnet(path: str | Path) -> None:
    """Load (and cache) the SyncNet weights at `path`: EvalError when missing or not a SyncNet state dict."""
    from stages.eval.metrics import syncnet

    syncnet.load(path)


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
    words = [(s.word, s.start_frame, s.end_frame + 1) for s in d.seg()
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


def score_sync(landmarks: np.ndarray, wave: np.ndarray | None, syncnet: str | None = None,
               frames: np.ndarray | None = None, boxes: list | None = None) -> dict:
    """The sync fields of one contiguous video from its face track's landmarks ([T, 68, 2] at 25 fps,
    nan: no face) and its 16 kHz wave. With `syncnet` (weights file): SyncNet on crops of the RGB
    `frames` [T, H, W, 3] uint8 around the track's `boxes` (per frame, in those frames' pixels)."""
    if syncnet:
        from stages.eval.metrics import syncnet as syncnet_m

        if frames is None or boxes is None:
            raise EvalError("SyncNet scoring needs the frames and their face boxes")
        net = syncnet_m.load(syncnet)
        return syncnet_m.sync_fields([syncnet_m.run_curve(net, boxes, frames.shape[2],
                                                          lambda a, n: frames[a:a + n], wave)])
    return sync_fields([sync_curve(landmarks, wave)])
