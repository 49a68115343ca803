"""Per-pixel measures of decoded frames, numpy only (no media, catalog or model imports), so that
scoring processes on a bare machine can use them: Rec.601 luma, the 4-neighbour Laplacian, and the
per-frame sharpness built on them (stages.filter and stages.eval.metrics.quality use these)."""
from __future__ import annotations

import numpy as np


def luma(frames: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 RGB -> [N, H, W] float32 Rec.601 luma in [0, 1]."""
    return (frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0


def laplacian(y: np.ndarray) -> np.ndarray:
    return 4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]


def frame_sharpness(Y: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian per frame ([T, H, W] -> [T])."""
    return np.array([laplacian(y).var() for y in Y])
