"""Long-horizon drift: the video split in N equal segments (by frame index); per segment the mean
of each per-frame curve (identity to the reference, sharpness = variance of the Laplacian, motion =
mean |luma change| between consecutive frames); the drift of a curve is the relative change of its
last segment against its first, (last - first) / |first| (None when the first is 0 or unknown).
A frozen video keeps identity but its motion drops to 0: drift of motion -1.
"""
from __future__ import annotations

import numpy as np


def segment_means(values: np.ndarray, frames: np.ndarray, total: int, n: int) -> list[float | None]:
    """Mean of `values` (nan ignored) observed at frame indices `frames` of a [0, total) video, per
    segment of n equal parts."""
    edges = np.linspace(0, total, n + 1)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        v = values[(frames >= a) & (frames < b)]
        v = v[~np.isnan(v)]
        out.append(float(v.mean()) if len(v) else None)
    return out


def relative_change(curve: list[float | None]) -> float | None:
    first, last = curve[0], curve[-1]
    if first is None or last is None or abs(first) < 1e-12:
        return None
    return float((last - first) / abs(first))


def drift(curves: dict[str, tuple[np.ndarray, np.ndarray]], total: int, n: int) -> dict:
    """curves: name -> (values, frame indices). Returns {"segments": n, "curves": {name: [n]},
    name: relative change, ...}."""
    n = max(1, min(n, total))
    seg = {k: segment_means(np.asarray(v, np.float64), np.asarray(f), total, n) for k, (v, f) in curves.items()}
    return {"segments": n, "curves": seg, **{k: relative_change(c) for k, c in seg.items()}}
