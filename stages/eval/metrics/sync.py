"""Lip sync.

SyncNet protocol (Chung & Zisserman 2016; syncnet_python): video at 25 fps, audio at 16 kHz, 0.2 s
MFCC windows against 5-frame mouth crops, offsets searched over +-15 frames; Sync-D = mean embedding
distance at the best offset, Sync-C = median - min of the distance curve. Local SyncNet weights
(`--syncnet PATH`) are refused with one line: this build does not define the SyncNet network, since
its layer-by-layer architecture and preprocessing could not be verified against reference outputs
here, and a score from an unverified port would be invented.

Default: an offline proxy with the same output fields, `sync_method` = PROXY (never Sync-C / Sync-D):
- mouth: inner-lip gap over the distance between the eye centres per frame (dlib 68 landmarks,
  stages/sense/mouth.py), 25 fps; frames without a face are left out;
- speech: log RMS of the 16 kHz audio per 40 ms frame bin, floored (-80 dBFS) outside the voiced
  regions silero-vad finds;
- both tracks are z-scored and cross-correlated (Pearson r over the frames both have) at every lag
  k in -15..15 frames, r(k) = corr(mouth[t], speech[t + k]): positive k = audio late;
- `sync_offset_frames` = argmax r, `sync_confidence` = max r - median r (the peak over the search),
  `sync_distance` = 2 (1 - max r): the mean squared difference of the z-scored tracks at the best
  offset (0 = identical, 2 = unrelated; lower is better).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.eval.metrics import EvalError
from stages.sense.mouth import FACE_FPS, RMS_FLOOR, frame_level
from stages.sense.speech import SAMPLE_RATE

PROXY = "proxy:dlib68-mouth-vs-speech-level-xcorr"
MAX_OFFSET = 15  # frames each way
MIN_FRAMES = 25  # frames both tracks need at an offset


def check_syncnet(path: str | Path) -> None:
    if not Path(path).exists():
        raise EvalError(f"--syncnet {path}: no such file")
    raise EvalError(f"--syncnet {path}: SyncNet is not supported by this build (its network is not defined "
                    "here, as it could not be verified); lip sync is scored with the named proxy")


def speech_track(wave: np.ndarray, T: int, fps: float = FACE_FPS) -> np.ndarray:
    """Log RMS per frame bin, floored outside silero-vad speech ([T])."""
    from stages.sense.speech import load_vad, speech_segments

    times = np.arange(T) / fps
    level = frame_level(wave, times, fps)
    voiced = np.zeros(T, bool)
    for a, b in speech_segments(_vad(), wave):
        voiced |= (times + 0.5 / fps >= a) & (times + 0.5 / fps < b)
    return np.where(voiced, level, np.log(RMS_FLOOR))


_VAD = []


def _vad():
    from stages.sense.speech import load_vad

    if not _VAD:
        _VAD.append(load_vad())
    return _VAD[0]


def _lagged(x: np.ndarray, k: int) -> np.ndarray:
    """out[t] = x[t + k] (nan outside)."""
    out = np.full(len(x), np.nan)
    if k >= 0:
        out[:len(x) - k] = x[k:]
    else:
        out[-k:] = x[:len(x) + k]
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if len(x) < MIN_FRAMES or x.std() < 1e-9 or y.std() < 1e-9:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def xcorr(mouth: np.ndarray, speech: np.ndarray, max_offset: int = MAX_OFFSET) -> np.ndarray:
    """r(k) for k = -max_offset..max_offset (nan where too few frames overlap)."""
    r = [pearson(mouth, _lagged(speech, k)) for k in range(-max_offset, max_offset + 1)]
    return np.array([np.nan if v is None else v for v in r])


def score_sync(mouth: np.ndarray, wave: np.ndarray | None, syncnet: str | None = None) -> dict:
    """The sync fields of one video from its mouth track ([T] at 25 fps, nan: no face) and wave."""
    if syncnet:
        check_syncnet(syncnet)
    none = {"sync_method": PROXY, "sync_offset_frames": None, "sync_confidence": None, "sync_distance": None,
            "sync_curve": None}
    if wave is None or len(wave) < SAMPLE_RATE // 2 or (~np.isnan(mouth)).sum() < MIN_FRAMES:
        return none
    r = xcorr(mouth, speech_track(wave, len(mouth)))
    if np.isnan(r).all():
        return none
    k = int(np.nanargmax(r))
    return {"sync_method": PROXY, "sync_offset_frames": k - MAX_OFFSET,
            "sync_confidence": float(r[k] - np.nanmedian(r)), "sync_distance": float(2 * (1 - r[k])),
            "sync_curve": [None if np.isnan(v) else round(float(v), 4) for v in r]}
