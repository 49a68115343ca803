"""Video quality proxies (named as what they are; none of them is DOVER), and DOVER itself (last item).

All on Rec.601 luma in [0, 1] (stages.sense.pixels.luma) of the scored frames at the analysis size
(longer side `EvalOptions.max_side`), except blockiness (native size):

- `sharpness`: median over frames of the variance of the 4-neighbour Laplacian (stages.filter.sharpness)
  on the whole frame; `face_sharpness` the same inside the face box. Depends on the analysis size:
  compare videos scored at the same `max_side`.
- `noise`: median over frames of Immerkaer's fast noise sigma (1996: |I * N| with the 3 x 3
  Laplacian-difference mask N, sigma = sqrt(pi / 2) / (6 (W - 2)(H - 2)) sum |I * N|), in luma units.
- `blockiness`: mean step across 8 x 8 coding-block boundaries over the mean step inside blocks, on
  a few frames at native size (stages.filter.blockiness; 1 = no blocking).
- `flicker`: mean |luma change| per pixel between consecutive frames (temporal instability: a
  static clip is 0, shuffled or jittering frames are high); `luma_flicker`: stages.filter.flicker,
  the median |second difference| of per-frame mean luma relative to the mean (brightness pumping).
- `exposure`: mean luma; `clipped`: share of pixels under 2 % or over 98 %.
- DOVER (`--dover PATH`, stages/eval/metrics/dover.py): the real model, from the user's ONNX export
  (DOVER's convert_to_onnx.py) run with onnxruntime on DOVER's aesthetic and technical views of the
  native frames; `dover` (fused overall, 0..1), `dover_aesthetic`, `dover_technical` (raw branch
  scores), `dover_model`. Without `--dover`, `dover` is "not_assessed". Where this differs from the
  reference code (VQAssessment/DOVER: dover_datasets.py, evaluate_one_video.py, onnx_inference.py):
  - random draws (clip starts, fragment offsets) come from numpy's generator seeded with 42; the
    reference draws from unseeded numpy and torch generators, so its score varies from run to run
    and ours is one fixed draw of the same distribution.
  - technical clips: convert_to_onnx.py exports `tech_view` with a fixed first axis of 4 (its dummy
    input) while dover.yml and onnx_inference.py sample 3 clips, which that model refuses; we
    sample as many clips as the model's input declares (4 parts of N // 4 frames for the official
    export, dover.yml's 3 when the axis is dynamic).
  - fusion: onnx_inference.py hands the outputs in the export's order (aesthetic, technical) to
    fuse_results, which takes (technical, aesthetic) as evaluate_one_video.py gives them, so its
    printed overall score swaps the two branches' constants; we fuse as evaluate_one_video.py -f does
    (technical: (t - 0.1107) / 0.07355, weight 0.6104; aesthetic: (a + 0.08285) / 0.03774, 0.3896).
  - `dover_aesthetic` / `dover_technical` are the raw branch scores (each output averaged over its
    clips); evaluate_one_video.py without -f prints them only as ranks and z-scores against its
    bundled dataset predictions (dover_predictions/*.pkl), which we do not ship.
  - decoding: PyAV (libswscale RGB) instead of decord; N = the stream's packets with a timestamp;
    should fewer frames decode, the last decoded frame stands in for the missing ones; a stream that
    changes size mid-way is resized to its first frame's size. `score_frames` samples the frames it
    is given (the caller's frame rate), not a file's.
  - aesthetic resize: bilinear without antialiasing, rounded to uint8 (torchvision's tensor Resize
    at the torch 1.13 DOVER pins, what the model was trained with); a current torchvision
    antialiases by default, so a reference run on a new install resizes slightly differently.
  - frames smaller than 224 px on a side are upscaled as in the reference (bilinear, truncated to
    uint8), but the fragment grid is laid on the upscaled frame; the reference lays it with the
    pre-upscale size, so its patches then come from the top-left part of the frame only.
"""
from __future__ import annotations

import numpy as np

from stages.filter import blockiness, exposure, flicker as luma_flicker, sharpness
from stages.sense.pixels import frame_sharpness, laplacian, luma

IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def noise_sigma(y: np.ndarray) -> float:
    from scipy.signal import convolve2d

    H, W = y.shape
    r = np.abs(convolve2d(y, IMMERKAER, mode="valid")).sum()
    return float(np.sqrt(np.pi / 2) * r / (6 * (W - 2) * (H - 2)))


def frame_change(Y: np.ndarray) -> np.ndarray:
    """Mean |luma change| per pixel between consecutive frames ([T, H, W] -> [T - 1])."""
    return np.abs(np.diff(Y, axis=0)).mean(axis=(1, 2)) if len(Y) > 1 else np.zeros(0)


def face_crop(Y: np.ndarray, box) -> np.ndarray | None:
    x0, y0, x1, y1 = (int(v) for v in box)
    H, W = Y.shape
    crop = Y[max(0, y0):min(H, y1), max(0, x0):min(W, x1)]
    return crop if min(crop.shape) >= 8 else None


def quality(Y: np.ndarray, native: np.ndarray, boxes: list) -> dict:
    """The proxies above. Y: [T, H, W] luma at the analysis size; native: [K, H', W'] luma at native
    size; boxes: face box per frame of Y or None."""
    mean, clipped = exposure(Y)
    crops = [c for c in (face_crop(y, b) for y, b in zip(Y, boxes) if b is not None) if c is not None]
    return {"sharpness": sharpness(Y),
            "face_sharpness": float(np.median([laplacian(c).var() for c in crops])) if crops else None,
            "noise": float(np.median([noise_sigma(y) for y in Y])),
            "blockiness": blockiness(native) if len(native) else None,
            "flicker": float(frame_change(Y).mean()) if len(Y) > 1 else None,
            "luma_flicker": luma_flicker(Y),
            "exposure": mean, "clipped": clipped}


__all__ = ["frame_change", "frame_sharpness", "luma", "noise_sigma", "quality"]
