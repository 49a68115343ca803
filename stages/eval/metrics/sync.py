"""Lip sync.

SyncNet protocol (Chung & Zisserman 2016; syncnet_python): video at 25 fps, audio at 16 kHz, 0.2 s
MFCC windows against 5-frame mouth crops, offsets searched over +-15 frames; Sync-D = mean embedding
distance at the best offset, Sync-C = median - min of the distance curve. Local SyncNet weights
(`--syncnet PATH`) are refused with one line: this build does not define the SyncNet network, since
its layer-by-layer architecture and preprocessing could not be verified against reference outputs
here, and a score from an unverified port would be invented.

Default: an offline proxy with the same output fields, `sync_method` = PROXY (never Sync-C / Sync-D),
a canonical-correlation audio-visual synchrony measure (after Slaney & Covell 2000, "FaceSync"):
- mouth: the 20 lip points of dlib's 68 landmarks (stages/sense/mouth.py, 25 fps) relative to their
  centre, rotated to the eye line and divided by the distance between the eye centres (pose and face
  size removed); the video's first 2 principal components and their frame-to-frame velocity;
- speech: 20 log-mel bands (0-8 kHz) of 40 ms windows centred on the frame times, mean-removed; the
  first 3 principal components and their velocity;
- at each lag k in -15..15 frames (mouth frame t against speech frame t + k: positive k = audio late)
  the first canonical correlation rho(k) of the two feature sets (ridge 0.1 of the mean variance
  on each covariance), always over the same frames t in [15, T - 15) that show a face, so every lag
  is fitted on as many frames;
- `sync_offset_frames` = argmax rho, `sync_confidence` = max rho - median rho, `sync_distance` =
  2 (1 - max rho): the mean squared difference of the unit-variance canonical variates at the best
  offset (0 = locked, lower is better). `sync_curve` keeps rho(k).
Needs T >= 55 frames (2.2 s) with a face in 25 of the fitted frames; else the fields are None. A long
video scored in pieces (stages/eval/video.py) averages the pieces' rho curves (`sync_pieces`).

Measured through score_video (analysis size 320) on the five retalking clips (../shared/media/talking,
5-6 s each), clips 1-5: own audio, offsets -2, -9, +2, -2, -1; audio delayed 0.5 s: +11, +14, +13,
+10, +12; confidence own 0.22 0.11 0.13 0.22 0.15, with the next clip's audio 0.08 0.16 0.12 0.08
0.11; distance own 0.74 0.85 0.92 0.85 0.68, with the next clip's audio 1.00 0.99 1.02 1.20 0.83.
On 5 s clips the measure is weak: the offset is good to about +-2 frames (one clip of five is off by
9), the distance separates own from foreign audio on all five, the confidence on three. Simpler variants measured
worse: mouth opening (inner-lip gap over eye distance) against the voiced log-RMS envelope found the
own-audio offset within +-1 frame on 1 of 5 clips; the CCA restricted to voiced frames, or without
the velocities, was no better.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.eval.metrics import EvalError
from stages.sense.mouth import FACE_FPS, LEFT_EYE, RIGHT_EYE
from stages.sense.speech import SAMPLE_RATE

PROXY = "proxy:lip-landmarks-logmel-cca"
MAX_OFFSET = 15  # frames each way
MIN_FRAMES = 25  # fitted frames with a face
N_MOUTH, N_SPEECH = 2, 3  # principal components
N_MELS = 20
RIDGE = 0.1
LIPS = slice(48, 68)


def check_syncnet(path: str | Path) -> None:
    if not Path(path).exists():
        raise EvalError(f"--syncnet {path}: no such file")
    raise EvalError(f"--syncnet {path}: SyncNet is not supported by this build (its network is not defined "
                    "here, as it could not be verified); lip sync is scored with the named proxy")


def lip_shape(landmarks: np.ndarray) -> np.ndarray:
    """[T, 68, 2] -> [T, 40]: lip points about their centre, rotated to the eye line, over the eye distance."""
    axis = landmarks[:, RIGHT_EYE].mean(1) - landmarks[:, LEFT_EYE].mean(1)  # [T, 2]
    scale = np.maximum(np.linalg.norm(axis, axis=-1), 1e-6)
    c, s = axis[:, 0] / scale, axis[:, 1] / scale
    R = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)  # rotation by -angle: [T, 2, 2]
    lips = landmarks[:, LIPS] - landmarks[:, LIPS].mean(1, keepdims=True)
    return (np.einsum("tij,tpj->tpi", R, lips) / scale[:, None, None]).reshape(len(landmarks), -1)


def mel_filters(n_fft: int, n_mels: int = N_MELS, sr: int = SAMPLE_RATE) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters equally spaced on the HTK mel scale, 0 Hz-sr/2."""
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    hz = 700 * (10 ** (np.linspace(0, mel(sr / 2), n_mels + 2) / 2595) - 1)
    f = np.fft.rfftfreq(n_fft, 1 / sr)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    return np.maximum(0, np.minimum((f - lo) / (mid - lo), (hi - f) / (hi - mid)))


def log_mel(wave: np.ndarray, T: int, fps: float = FACE_FPS) -> np.ndarray:
    """[T, N_MELS] log-mel energies of Hann windows of 1 / fps centred on the frame times (silence
    outside the wave)."""
    hop = int(round(SAMPLE_RATE / fps))
    x = np.zeros((T + 1) * hop, np.float64)
    n = min(len(wave), T * hop)
    x[hop // 2:hop // 2 + n] = wave[:n]  # frame t's window covers [t - 1/2, t + 1/2) frames
    frames = x[: T * hop].reshape(T, hop) * np.hanning(hop)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # [T, hop // 2 + 1]
    return np.log(power @ mel_filters(hop).T + 1e-6)


def components(X: np.ndarray, n: int) -> np.ndarray:
    """The first n principal-component scores and their velocities: [T, 2n]."""
    X = X - X.mean(0)
    U, S, _ = np.linalg.svd(X, full_matrices=False)
    P = U[:, :n] * S[:n]
    return np.concatenate([P, np.gradient(P, axis=0)], 1)


def first_canonical(X: np.ndarray, Y: np.ndarray, ridge: float = RIDGE) -> float:
    X, Y = X - X.mean(0), Y - Y.mean(0)
    n = len(X)
    Cxx, Cyy, Cxy = X.T @ X / n, Y.T @ Y / n, X.T @ Y / n
    Cxx = Cxx + ridge * np.trace(Cxx) / len(Cxx) * np.eye(len(Cxx))
    Cyy = Cyy + ridge * np.trace(Cyy) / len(Cyy) * np.eye(len(Cyy))
    Wx, Wy = np.linalg.inv(np.linalg.cholesky(Cxx)), np.linalg.inv(np.linalg.cholesky(Cyy))
    return float(np.linalg.svd(Wx @ Cxy @ Wy.T, compute_uv=False)[0])


def canonical_curve(mouth: np.ndarray, speech: np.ndarray, face: np.ndarray, max_offset: int = MAX_OFFSET) -> np.ndarray:
    """rho(k), k = -max_offset..max_offset, over the frames t in [max_offset, T - max_offset) with a face."""
    T = len(mouth)
    t = np.arange(max_offset, T - max_offset)
    t = t[face[t]]
    return np.array([first_canonical(mouth[t], speech[t + k]) for k in range(-max_offset, max_offset + 1)])


def sync_curve(landmarks: np.ndarray, wave: np.ndarray | None) -> np.ndarray | None:
    """rho(k) of one contiguous piece: landmarks [T, 68, 2] at 25 fps (nan: no face) and the 16 kHz
    wave starting at its first frame; None when too short or without enough face or sound."""
    T = len(landmarks)
    face = ~np.isnan(landmarks).any(axis=(1, 2))
    if wave is None or len(wave) < SAMPLE_RATE // 2 or T < 2 * MAX_OFFSET + MIN_FRAMES \
            or face[MAX_OFFSET:T - MAX_OFFSET].sum() < MIN_FRAMES:
        return None
    shape = lip_shape(np.where(face[:, None, None], landmarks, 0.0).astype(np.float64))
    shape[~face] = shape[face].mean(0)  # frames without a face are not fitted; this keeps the PCA finite
    mel = log_mel(wave, T)
    return canonical_curve(components(shape, N_MOUTH), components(mel - mel.mean(0), N_SPEECH), face)


def sync_fields(curves: list[np.ndarray | None]) -> dict:
    """The sync fields from the rho curves of one or more pieces (averaged: pieces of a long video)."""
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


def score_sync(landmarks: np.ndarray, wave: np.ndarray | None, syncnet: str | None = None) -> dict:
    """The sync fields of one contiguous video from its face track's landmarks ([T, 68, 2] at 25 fps,
    nan: no face) and its 16 kHz wave."""
    if syncnet:
        check_syncnet(syncnet)
    return sync_fields([sync_curve(landmarks, wave)])
