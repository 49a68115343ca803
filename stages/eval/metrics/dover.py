"""DOVER (Wu et al., ICCV 2023, "Exploring Video Quality Assessment on User Generated Contents from
Aesthetic and Technical Perspectives") run from a user's ONNX export (`--dover PATH`).

The model file is what DOVER's `convert_to_onnx.py` writes (we cannot ship the weights): two float
inputs, `aes_view` [1, 3, 32, 224, 224] and `tech_view` [N, 3, 32, 224, 224] (clips, RGB,
frames, height, width; the official script fixes N = 4, an export with a dynamic first axis gets
dover.yml's 3), and two outputs, the aesthetic then the technical branch score per clip. PATH is
that file or a folder holding it (every `*.onnx` there is tried in name order, the first that
matches is used).

Views, as DOVER's test-time sampling (dover.yml, the `val-*` sets) builds them from the native
frames of the file (every decoded frame of the first video stream, at full resolution):

- aesthetic: the video's N frames cut into 32 equal parts (N // 32 frames each); one frame from
  each, at a random offset inside the part when the part is longer than 2 frames (else its first
  frame; indices wrap modulo N); each frame resized to 224 x 224 (aspect not kept, bilinear without
  antialiasing, rounded to uint8, as torchvision's Resize did on tensors for the torch 1.13 DOVER
  pins).
- technical: the video cut into one equal part per clip; in each, 32 frames 2 apart from a random
  start inside the part when it is longer than 64 frames (else from its first frame; wrapping modulo
  N). Each clip is turned into "fragments": the frame is split into a 7 x 7 grid of cells
  (H // 7 by W // 7 px, the cell start clamped so a patch stays inside the frame), one 32 x 32 patch
  is copied unresized from each cell at a random offset inside it (0 when the cell is not larger
  than 32 px), and the 49 patches are tiled in grid order into a 224 x 224 frame. Patch positions
  are drawn once per clip and shared by its 32 frames (temporally aligned fragments). A frame whose
  shorter side (relative to 224) is too small is first upscaled bilinearly so that it is not.
- both views: (x - mean) / std per RGB channel on 0..255 values, mean (123.675, 116.28, 103.53),
  std (58.395, 57.12, 57.375).

Scores: each output is averaged over its clips (`dover_aesthetic`, `dover_technical`: the raw branch
scores), and fused as DOVER's `fuse_results` does: x = 0.6104 (t - 0.1107) / 0.07355 +
0.3896 (a + 0.08285) / 0.03774, `dover` = 1 / (1 + exp(-x)) in (0, 1), higher is better.
`dover_model` is the file name. Random draws use numpy's generator seeded with SEED, so a video
always gets the same views. Deviations from the reference code: stages/eval/metrics/quality.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from stages.eval.metrics import EvalError

AES_INPUT, TECH_INPUT = "aes_view", "tech_view"
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
CLIP_LEN = 32  # frames per clip, both views
INTERVAL = 2  # frame step inside a technical clip (and the aesthetic sampler's run length)
TECH_CLIPS = 3  # dover.yml; used when the model's tech_view has a dynamic first axis
GRID, PATCH = 7, 32  # fragments: GRID x GRID patches of PATCH x PATCH px
SIZE = GRID * PATCH  # 224, the side of both views
SEED = 42
# fuse_results: each raw branch score standardised, weighted, and squashed by a logistic
TECH_MEAN, TECH_SD, TECH_WEIGHT = 0.1107, 0.07355, 0.6104
AES_MEAN, AES_SD, AES_WEIGHT = -0.08285, 0.03774, 0.3896


def fuse(aesthetic: float, technical: float) -> float:
    """DOVER's overall score in (0, 1) from the two raw branch scores."""
    x = TECH_WEIGHT * (technical - TECH_MEAN) / TECH_SD + AES_WEIGHT * (aesthetic - AES_MEAN) / AES_SD
    return float(1.0 / (1.0 + np.exp(-x)))


def sample_frames(n: int, parts: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Frame indices: [0, n) cut into `parts` equal parts, in each `length` frames INTERVAL apart from
    a random offset when the part is longer than length * INTERVAL; wrapped modulo n ([parts * length])."""
    part, span = n // parts, length * INTERVAL
    offset = rng.integers(0, part - span, parts) if part > span else np.zeros(parts, np.int64)
    starts = np.arange(parts) * part + offset
    return ((starts[:, None] + INTERVAL * np.arange(length)).ravel() % n).astype(np.int64)


def _interpolate(rgb: np.ndarray, **how):
    import torch

    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    return torch.nn.functional.interpolate(x, mode="bilinear", align_corners=False, **how)[0].permute(1, 2, 0)


def resize224(rgb: np.ndarray) -> np.ndarray:
    """An aesthetic frame: bilinear to SIZE x SIZE without antialiasing, rounded."""
    import torch

    return _interpolate(rgb, size=(SIZE, SIZE), antialias=False).round().clamp(0, 255).to(torch.uint8).numpy()


def upscale(rgb: np.ndarray, factor: float) -> np.ndarray:
    """DOVER's fallback for frames too small for the grid: bilinear by `factor` on [0, 1] values,
    back to uint8 by truncation."""
    import torch

    y = _interpolate(rgb.astype(np.float32) / 255.0, scale_factor=factor) * 255.0
    return y.to(torch.uint8).numpy()


class Views:
    """DOVER's two views of one video, filled frame by frame (see the module doc). `n`: the number
    of frames of the video; `clips`: technical clips. `needed()` says which frame indices to `add`."""

    def __init__(self, n: int, clips: int = TECH_CLIPS, seed: int = SEED):
        if n < 1:
            raise EvalError("DOVER: the video has no frames")
        self.rng = np.random.default_rng(seed)
        self.n, self.clips = n, clips
        self.aes_index = sample_frames(n, CLIP_LEN, 1, self.rng)  # [32]
        self.tech_index = sample_frames(n, clips, CLIP_LEN, self.rng)  # [clips * 32]
        self.aesthetic = np.zeros((CLIP_LEN, SIZE, SIZE, 3), np.uint8)
        self.technical = np.zeros((clips * CLIP_LEN, SIZE, SIZE, 3), np.uint8)
        self.shape = None  # (H, W) of the first frame added
        self.factor = 1.0  # upscale before fragments (1: native)
        self.fragment_shape = None  # (H, W) the patches are cut from
        self.origins = None  # [clips, GRID, GRID, 2]: (y, x) of each patch in the (upscaled) frame
        self.filled = set()

    def needed(self) -> set[int]:
        return set(self.aes_index.tolist()) | set(self.tech_index.tolist())

    def _place(self, H: int, W: int) -> None:
        """Patch origins of every clip: cell starts min(cell * i, side - PATCH) plus a random offset
        in [0, cell - PATCH) when the cell is larger than a patch."""
        ratio = min(H / SIZE, W / SIZE)
        if ratio < 1:
            self.factor = 1 / ratio
            H, W = int(np.floor(H * self.factor)), int(np.floor(W * self.factor))
        self.fragment_shape = (H, W)
        origins = np.zeros((self.clips, GRID, GRID, 2), np.int64)
        for axis, side in enumerate((H, W)):
            cell = side // GRID
            start = np.minimum(cell * np.arange(GRID), side - PATCH)
            jitter = (self.rng.integers(0, cell - PATCH, (self.clips, GRID, GRID)) if cell > PATCH
                      else np.zeros((self.clips, GRID, GRID), np.int64))
            origins[..., axis] = (start[:, None] if axis == 0 else start[None, :]) + jitter
        self.origins = origins

    def fragments(self, rgb: np.ndarray, clip: int) -> np.ndarray:
        """The SIZE x SIZE mosaic of one frame's patches at the origins of `clip`."""
        src = upscale(rgb, self.factor) if self.factor != 1.0 else rgb
        out = np.empty((SIZE, SIZE, 3), np.uint8)
        for i in range(GRID):
            for j in range(GRID):
                y, x = self.origins[clip, i, j]
                out[i * PATCH:(i + 1) * PATCH, j * PATCH:(j + 1) * PATCH] = src[y:y + PATCH, x:x + PATCH]
        return out

    def add(self, index: int, rgb: np.ndarray) -> None:
        """Frame `index` of the video (RGB uint8 [H, W, 3], native size) into the views that use it."""
        if self.shape is None:
            self.shape = rgb.shape[:2]
            self._place(*self.shape)
        elif rgb.shape[:2] != self.shape:  # a stream that changes size: keep the first frame's
            import cv2

            rgb = cv2.resize(rgb, (self.shape[1], self.shape[0]), interpolation=cv2.INTER_AREA)
        for k in np.flatnonzero(self.aes_index == index):
            self.aesthetic[k] = resize224(rgb)
        for k in np.flatnonzero(self.tech_index == index):
            self.technical[k] = self.fragments(rgb, k // CLIP_LEN)
        self.filled.add(index)

    def tensors(self) -> dict[str, np.ndarray]:
        """The normalised model inputs: aes_view [1, 3, 32, 224, 224], tech_view [clips, 3, 32, 224, 224]."""
        missing = self.needed() - self.filled
        if missing:
            raise EvalError(f"DOVER: frames {sorted(missing)[:3]} of {self.n} could not be decoded")

        def norm(v: np.ndarray, clips: int) -> np.ndarray:
            x = (v.astype(np.float32) - MEAN) / STD  # [clips * 32, H, W, 3]
            return np.ascontiguousarray(x.reshape(clips, CLIP_LEN, SIZE, SIZE, 3).transpose(0, 4, 1, 2, 3))

        return {AES_INPUT: norm(self.aesthetic, 1), TECH_INPUT: norm(self.technical, self.clips)}


@dataclass
class DoverModel:
    session: object
    name: str  # the file name
    clips: int  # technical clips the model takes

    def __call__(self, views: Views) -> dict:
        aes, tech = self.session.run(None, views.tensors())[:2]
        a, t = float(np.mean(aes)), float(np.mean(tech))
        return {"dover": fuse(a, t), "dover_aesthetic": a, "dover_technical": t, "dover_model": self.name}


def _dims(shape) -> list:
    return [d if isinstance(d, int) else None for d in shape]  # None: a dynamic axis


def _mismatch(sess) -> str | None:
    """Why an ONNX session is not DOVER's export, or None."""
    ins = {i.name: i for i in sess.get_inputs()}
    if set(ins) != {AES_INPUT, TECH_INPUT}:
        return f"inputs {sorted(ins)}, not ['{AES_INPUT}', '{TECH_INPUT}']"
    for name, first in ((AES_INPUT, (1, None)), (TECH_INPUT, None)):
        dims = _dims(ins[name].shape)
        if (len(dims) != 5 or dims[1:] != [3, CLIP_LEN, SIZE, SIZE] or (first and dims[0] not in first)
                or ins[name].type != "tensor(float)"):
            want = f"[{'1' if first else 'N'}, 3, {CLIP_LEN}, {SIZE}, {SIZE}] float"
            return f"input {name} {ins[name].shape} {ins[name].type}, not {want}"
    if len(sess.get_outputs()) != 2:
        return f"{len(sess.get_outputs())} outputs, not 2 (aesthetic and technical scores)"
    return None


@lru_cache(maxsize=4)
def load_model(path: str) -> DoverModel:
    """The DOVER ONNX export at `path` (a file, or a folder: its first matching *.onnx)."""
    p = Path(path)
    if not p.exists():
        raise EvalError(f"--dover {path}: no such file or folder")
    files = sorted(p.glob("*.onnx")) if p.is_dir() else [p]
    if not files:
        raise EvalError(f"--dover {path}: no .onnx file in this folder")
    try:
        import onnxruntime as ort
    except ImportError:
        raise EvalError(f"--dover {path}: onnxruntime is not installed (pip install onnxruntime)") from None
    ort.set_default_logger_severity(3)  # a foreign file: our one line, not ORT's log
    last = ""
    for f in files:
        try:
            sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
        except Exception as e:  # not ONNX, or broken: try the next, then say what failed
            last = f"{f.name}: not a loadable ONNX model ({type(e).__name__})"
            continue
        why = _mismatch(sess)
        if why is None:
            first = _dims(next(i for i in sess.get_inputs() if i.name == TECH_INPUT).shape)[0]
            return DoverModel(sess, f.name, first or TECH_CLIPS)
        last = f"{f.name}: {why}; not DOVER's convert_to_onnx.py export"
    raise EvalError(f"--dover {path}: {last}")


def count_frames(path: str | Path) -> int:
    """Frames of the first video stream (its demuxed packets with a timestamp)."""
    from stages.sense.media import MediaError, open_container

    try:
        with open_container(path) as c:
            v = c.streams.video[0]
            return sum(1 for p in c.demux(v) if p.pts is not None)
    except (MediaError, IndexError) as e:
        raise EvalError(f"{path}: {e or 'no video stream'}") from None


def file_views(path: str | Path, clips: int = TECH_CLIPS, seed: int = SEED) -> Views:
    """DOVER's views of a video file: its frames decoded in order at native size with PyAV (as
    stages.sense.media.clip_frames reads them), only the sampled ones kept."""
    from stages.sense.media import MediaError, open_container

    views = Views(count_frames(path), clips, seed)
    need, last, i = views.needed(), None, 0
    try:
        with open_container(path) as c:
            v = c.streams.video[0]
            v.thread_type = "AUTO"
            for frame in c.decode(v):
                if frame.time is None:
                    continue
                if i in need:
                    views.add(i, frame.to_ndarray(format="rgb24"))
                last, i = frame, i + 1
                if i >= views.n:
                    break
            missing = sorted(need - views.filled)
            if missing and last is not None:  # fewer decodable frames than packets: the last one stands in
                rgb = last.to_ndarray(format="rgb24")
                for j in missing:
                    views.add(j, rgb)
    except MediaError as e:
        raise EvalError(f"{path}: {e}") from None
    return views


def array_views(frames: np.ndarray, clips: int = TECH_CLIPS, seed: int = SEED) -> Views:
    """DOVER's views of decoded frames [T, H, W, 3] uint8 (native size)."""
    views = Views(len(frames), clips, seed)
    for i in sorted(views.needed()):
        views.add(i, frames[i])
    return views


def score_file(path: str | Path, dover: str) -> dict:
    """dover, dover_aesthetic, dover_technical, dover_model of a video file."""
    model = load_model(dover)
    return model(file_views(path, model.clips))


def score_frames(frames: np.ndarray, dover: str) -> dict:
    model = load_model(dover)
    return model(array_views(frames, model.clips))
