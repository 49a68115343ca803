"""SyncNet lip sync (Chung & Zisserman, "Out of time", ACCV 2016 workshops), scored on the official
`syncnet_v2.model` weights of joonson/syncnet_python given with `vidu eval --syncnet PATH`.

Network. Two towers that map 0.2 s of speech and 5 video frames to 1024-d embeddings. Layer order and
sizes follow the published state dict (strict: every key, every shape):
- audio `netcnnaud` (Conv2d 3x3 blocks: conv, batch norm, ReLU; max pools (1,1)/(1,1), (3,3)/(1,2),
  (3,3)/(2,2)): 1x13x20 MFCC -> 64 -> 192 -> 384 -> 256 -> 256 -> 512 (a final 5x4 conv to 1x1);
- lips `netcnnlip` (Conv3d): 3x5x224x224 -> 96 (5x7x7, stride 1,2,2) -> 256 (1x5x5, stride 1,2,2,
  pad 0,1,1) -> 256 -> 256 -> 256 (1x3x3) -> 512 (1x6x6 to 1x1x1), max pools (1,3,3)/(1,2,2) after the
  first, second (pad 0,1,1) and fifth blocks;
- `netfcaud` / `netfclip`: Linear 512-512, BatchNorm1d, ReLU, Linear 512-1024.
The weights are read with torch.load(weights_only=True); the file must hold exactly these keys with
these shapes. `num_batches_tracked` (added by PyTorch 0.4.1, unused in evaluation) may be absent, as
in state dicts saved by older PyTorch.

Inputs (as the reference feeds them):
- video on the 25 fps grid; per frame a 224x224 face crop, channels in OpenCV's B, G, R order with
  values 0-255 (no normalisation); a window is 5 consecutive crops, [3, 5, 224, 224];
- audio: 16 kHz mono on the int16 scale (the wave times 32768, rounded, as from a s16 WAV);
  python_speech_features.mfcc with its defaults (25 ms windows every 10 ms, 13 cepstra, 26 filters,
  512-point FFT, pre-emphasis 0.97, lifter 22, log energy as the first coefficient), 4 MFCC frames
  per video frame; video frame i pairs with MFCC frames 4i .. 4i + 20 (0.2 s), [1, 13, 20];
- windows start at frames 0 .. n - 6 of an n-frame face track (n - 5 windows, as the reference).

Face crop (run_pipeline.py): per frame a face box gives its centre (x, y) and half-size
s = max(width, height) / 2; the three tracks are median-filtered over 13 frames (zero-padded ends,
scipy.signal.medfilt); with crop_scale c = 0.4 the crop is rows y - s .. y + s (1 + 2c), columns
x - s (1 + c) .. x + s (1 + c) (a square of 2.8 s, mouth-biased), grey 110 outside the frame, resized
to 224x224 (bilinear). Frames between face detections take the linearly interpolated box; a track
runs from the first to the last frame with a face.

Offsets: video embedding i against audio embedding i + d, d = -15 .. 15, the audio sequence padded
with 15 zero vectors at each end (so shifted-out pairs count against a zero embedding, as in the
reference); D(d) = mean over i of the Euclidean distance (torch's pairwise_distance, eps 1e-6).
Sync-D (`sync_distance`) = min D, Sync-C (`sync_confidence`) = median D - min D, and
`sync_offset_frames` = the argmin d: positive = audio late (video frame i matches sound heard d frames
later), the proxy's convention. SyncNet's own printed "AV offset" is 15 - argmin index = -d, so
`sync_offset_frames` = -(SyncNet's AV offset). `sync_curve` keeps D(d). A long video scored in runs
averages the runs' curves, weighted by their windows (as one track's frames would be).

Deviations from the reference protocol (syncnet_python run_pipeline.py + SyncNetInstance.py):
- faces: dlib's HOG boxes (stages/sense/mouth.py track_face on the analysis-size frames, detection
  every 5 frames, the main face only) instead of S3FD on every frame; dlib's box is tighter (brow to
  chin) than S3FD's, so the crop shows less forehead and the mouth sits a little lower in it; the box
  is scaled from the analysis size to the frames the crop is cut from (native size, or at most
  FRAME_SIDE px on the longer side);
- no shot detection and no face-track minimum of 100 frames (min_track): one track per scored run,
  scored when it spans at least MIN_FRAMES frames; no min_face_size (100 px);
- crops are passed on directly; the reference writes them to an XVID AVI and reads them back as JPEGs
  (two lossy steps);
- grid frames: at each 25 fps time the latest frame shown (stages/eval/video.py), not ffmpeg's -r 25;
- the per-frame confidence (median-filtered framewise) the reference prints is not reported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from stages.eval.metrics import EvalError

METHOD = "syncnet"
MAX_OFFSET = 15  # frames each way (the reference's vshift)
WINDOW = 5  # video frames per lip window
MFCC_PER_FRAME = 4  # 10 ms MFCC hop at 25 fps
MFCC_WINDOW = WINDOW * MFCC_PER_FRAME  # 20
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = SAMPLE_RATE // 25  # 640
CROP = 224
CROP_SCALE = 0.4
PAD_GREY = 110
SMOOTH = 13  # frames: median filter of the box tracks
MIN_FRAMES = 2 * MAX_OFFSET + WINDOW  # face-track frames needed to score a run
FRAME_SIDE = 1280  # longest side of the frames crops are cut from (video files)
BATCH = 20  # windows per forward pass (the reference's batch size)

# (kind, in, out, kernel, stride, padding): a conv is followed by batch norm and ReLU; a pool is max.
AUDIO_TOWER = [("conv", 1, 64, (3, 3), (1, 1), (1, 1)), ("pool", (1, 1), (1, 1), 0),
               ("conv", 64, 192, (3, 3), (1, 1), (1, 1)), ("pool", (3, 3), (1, 2), 0),
               ("conv", 192, 384, (3, 3), (1, 1), (1, 1)),
               ("conv", 384, 256, (3, 3), (1, 1), (1, 1)),
               ("conv", 256, 256, (3, 3), (1, 1), (1, 1)), ("pool", (3, 3), (2, 2), 0),
               ("conv", 256, 512, (5, 4), (1, 1), (0, 0))]
LIP_TOWER = [("conv", 3, 96, (5, 7, 7), (1, 2, 2), 0), ("pool", (1, 3, 3), (1, 2, 2), 0),
             ("conv", 96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), ("pool", (1, 3, 3), (1, 2, 2), (0, 1, 1)),
             ("conv", 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)),
             ("conv", 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)),
             ("conv", 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)), ("pool", (1, 3, 3), (1, 2, 2), 0),
             ("conv", 256, 512, (1, 6, 6), (1, 1, 1), 0)]
EMBED = 1024

_cache: dict = {}


def _tower(spec: list, dims: int):
    import torch.nn as nn

    conv, norm, pool = ((nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if dims == 2
                        else (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d))
    layers = []
    for kind, *args in spec:
        if kind == "conv":
            cin, cout, k, s, p = args
            layers += [conv(cin, cout, kernel_size=k, stride=s, padding=p), norm(cout), nn.ReLU()]
        else:
            k, s, p = args
            layers.append(pool(kernel_size=k, stride=s, padding=p))
    return nn.Sequential(*layers)


def _head():
    import torch.nn as nn

    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, EMBED))


def build():
    """SyncNet with the published module names (netcnnaud, netfcaud, netcnnlip, netfclip), random init."""
    import torch.nn as nn

    class SyncNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.netcnnaud = _tower(AUDIO_TOWER, 2)
            self.netfcaud = _head()
            self.netfclip = _head()
            self.netcnnlip = _tower(LIP_TOWER, 3)

        def audio(self, mfcc):  # [N, 1, 13, 20] -> [N, 1024]
            return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

        def lips(self, clips):  # [N, 3, 5, 224, 224] BGR 0-255 -> [N, 1024]
            return self.netfclip(self.netcnnlip(clips).flatten(1))

    return SyncNet()


def check_state(state, path: str | Path) -> dict:
    """The tensors of a loaded object that is a SyncNet state dict; EvalError (one line, naming the
    first missing, misshapen or unexpected key) otherwise."""
    import torch

    bad = f"--syncnet {path}: not a SyncNet state dict"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvalError(f"{bad} (a {type(state).__name__}, not a dict of tensors)")
    want = build().state_dict()
    for key, ref in want.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue
            raise EvalError(f"{bad}: key {key} is missing")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise EvalError(f"{bad}: key {key} has shape {tuple(state[key].shape)}, SyncNet's is {tuple(ref.shape)}")
    for key in state:
        if key not in want:
            raise EvalError(f"{bad}: unexpected key {key}")
    return {k: v.to(want[k].dtype) for k, v in state.items()}


def load(path: str | Path):
    """The SyncNet of a state-dict file, in eval mode on the CPU (cached per file and modification time)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise EvalError(f"--syncnet {path}: no such file")
    key = (str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size)
    if key not in _cache:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, or pickled objects other than tensors
            raise EvalError(f"--syncnet {path}: not a SyncNet state dict (torch.load: {type(e).__name__})") from None
        net = build()
        # keys and shapes checked above; only num_batches_tracked may be absent
        net.load_state_dict(check_state(state, path), strict=False)
        _cache.clear()
        _cache[key] = net.eval()
    return _cache[key]


# ---------------------------------------------------------------- audio


def mfcc(wave: np.ndarray) -> np.ndarray:
    """[13, F] MFCC of a 16 kHz float wave (-1..1) on the int16 scale, python_speech_features defaults."""
    import python_speech_features

    pcm = np.clip(np.round(np.asarray(wave, np.float64) * 32768), -32768, 32767)
    return python_speech_features.mfcc(pcm, SAMPLE_RATE).T


def audio_windows(wave: np.ndarray, n_frames: int):
    """[n_frames - 5, 1, 13, 20] float32 tensor: the MFCC window of each lip window's first frame."""
    import torch

    m = mfcc(wave)
    n = n_frames - WINDOW
    if m.shape[1] < MFCC_PER_FRAME * (n - 1) + MFCC_WINDOW:
        raise ValueError(f"{m.shape[1]} MFCC frames are too few for {n} windows")
    return torch.from_numpy(np.stack([m[:, MFCC_PER_FRAME * i:MFCC_PER_FRAME * i + MFCC_WINDOW]
                                      for i in range(n)])[:, None].astype(np.float32))


# ---------------------------------------------------------------- video


def crop_track(boxes: Sequence[tuple | None]) -> tuple[int, np.ndarray] | None:
    """(first frame, [n, 3] smoothed centre x, centre y, half-size s) of the face track from the
    first to the last frame with a box ((x0, y0, x1, y1) or None); None without any box."""
    from scipy.signal import medfilt

    have = np.flatnonzero([b is not None for b in boxes])
    if not len(have):
        return None
    first, last = int(have[0]), int(have[-1])
    b = np.array([boxes[i] for i in have], np.float64)
    t = np.arange(first, last + 1)
    x0, y0, x1, y1 = (np.interp(t, have, b[:, j]) for j in range(4))
    tracks = [(x0 + x1) / 2, (y0 + y1) / 2, np.maximum(x1 - x0, y1 - y0) / 2]
    return first, np.stack([medfilt(v, kernel_size=SMOOTH) for v in tracks], axis=1)


def cut(frame: np.ndarray, x: float, y: float, s: float) -> np.ndarray:
    """The 224x224 crop (same channel order as `frame`) of the face centred at (x, y) with half-size s:
    rows y - s .. y + 1.8 s, columns x - 1.4 s .. x + 1.4 s, grey outside the frame."""
    import cv2

    H, W = frame.shape[:2]
    r0, r1 = int(np.floor(y - s)), int(np.floor(y + s * (1 + 2 * CROP_SCALE)))
    c0, c1 = int(np.floor(x - s * (1 + CROP_SCALE))), int(np.floor(x + s * (1 + CROP_SCALE)))
    if r1 <= r0 or c1 <= c0:
        return np.full((CROP, CROP, 3), PAD_GREY, np.uint8)
    out = np.full((r1 - r0, c1 - c0, 3), PAD_GREY, np.uint8)
    a0, a1, b0, b1 = max(r0, 0), min(r1, H), max(c0, 0), min(c1, W)
    if a1 > a0 and b1 > b0:
        out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = frame[a0:a1, b0:b1]
    return cv2.resize(out, (CROP, CROP))


def face_crops(boxes: Sequence[tuple | None], box_width: int, read: Callable[[int, int], np.ndarray],
               chunk: int = 125) -> tuple[int, np.ndarray] | None:
    """(first frame, [n, 224, 224, 3] uint8 crops in the frames' channel order) of a run's face track.
    `boxes` per frame in the pixels of frames `box_width` wide; `read(a, n)` gives frames a .. a + n - 1
    (any size of the same aspect: the boxes are scaled to it), `chunk` at a time."""
    track = crop_track(boxes)
    if track is None:
        return None
    first, xys = track
    out = []
    for a in range(0, len(xys), chunk):
        frames = read(first + a, min(chunk, len(xys) - a))
        scale = frames.shape[2] / box_width
        for j, f in enumerate(frames):
            x, y, s = xys[a + min(j, len(xys) - 1)] * scale
            out.append(cut(f, x, y, s))
        out += [out[-1]] * (min(chunk, len(xys) - a) - len(frames))  # a short read: the last crop held
    return first, np.stack(out)


def lip_windows(crops: np.ndarray):
    """[n - 5, 3, 5, 224, 224] uint8 tensor (a view: `embed` makes each batch float, 0-255) of n RGB
    crops [n, 224, 224, 3] uint8: window i holds frames i .. i + 4 as B, G, R planes."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).permute(3, 0, 1, 2)  # [3 (BGR), n, 224, 224]
    return x.unfold(1, WINDOW, 1)[:, :len(crops) - WINDOW].permute(1, 0, 4, 2, 3)


def embed(net, clips, mfccs, batch: int = BATCH) -> tuple:
    """Video and audio embeddings [N, 1024] of lip windows (uint8 or float, 0-255) and MFCC windows
    (the same N), `batch` windows a pass."""
    import torch

    v, a = [], []
    with torch.inference_mode():
        for i in range(0, len(clips), batch):
            v.append(net.lips(clips[i:i + batch].float()))
            a.append(net.audio(mfccs[i:i + batch]))
    return torch.cat(v), torch.cat(a)


# ---------------------------------------------------------------- offsets


def distance_curve(video, audio, max_offset: int = MAX_OFFSET) -> np.ndarray:
    """D(d), d = -max_offset..max_offset: mean over i of |video[i] - audio[i + d]| with the audio
    embeddings zero-padded by max_offset at both ends ([N, E] each, the same N)."""
    import torch
    import torch.nn.functional as F

    video, audio = torch.as_tensor(video, dtype=torch.float32), torch.as_tensor(audio, dtype=torch.float32)
    n = len(video)
    padded = F.pad(audio, (0, 0, max_offset, max_offset))
    d = torch.stack([F.pairwise_distance(video, padded[k:k + n]) for k in range(2 * max_offset + 1)])
    return d.mean(1).double().numpy()


def offset_fields(curve: np.ndarray) -> dict:
    """offset (argmin d, positive = audio late), Sync-C (median - min) and Sync-D (min) of a D(d) curve."""
    m = len(curve) // 2
    j = int(np.argmin(curve))
    return {"sync_offset_frames": j - m, "sync_confidence": float(np.median(curve) - curve[j]),
            "sync_distance": float(curve[j])}


def run_curve(net, boxes: Sequence[tuple | None], box_width: int, read: Callable[[int, int], np.ndarray],
              wave: np.ndarray | None) -> tuple[np.ndarray, int] | None:
    """(D curve, windows) of one contiguous run: its per-frame face boxes, frames through `read` (RGB),
    and its 16 kHz wave from its first frame; None without a face track of MIN_FRAMES or audio for it."""
    if wave is None:
        return None
    crops = face_crops(boxes, box_width, read)
    if crops is None:
        return None
    first, crops = crops
    n = min(len(crops), (len(wave) - first * SAMPLES_PER_FRAME) // SAMPLES_PER_FRAME)  # whole frames of audio
    if n < MIN_FRAMES:
        return None
    clips = lip_windows(crops[:n])
    mfccs = audio_windows(wave[first * SAMPLES_PER_FRAME:(first + n) * SAMPLES_PER_FRAME], n)
    v, a = embed(net, clips, mfccs)
    return distance_curve(v, a), len(v)


def sync_fields(curves: list[tuple[np.ndarray, int] | None]) -> dict:
    """The sync fields from the (D curve, windows) of one or more runs (window-weighted mean curve)."""
    curves = [c for c in curves if c is not None]
    out = {"sync_method": METHOD, "sync_offset_frames": None, "sync_confidence": None, "sync_distance": None,
           "sync_curve": None, "sync_pieces": len(curves)}
    if not curves:
        return out
    D = np.average([c for c, _ in curves], axis=0, weights=[w for _, w in curves])
    out.update(offset_fields(D), sync_curve=[round(float(v), 4) for v in D])
    return out
