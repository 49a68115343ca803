"""The training loss curve (stages/train/plot.py): a real PNG from a known history."""
import numpy as np
from PIL import Image

from stages.train.plot import loss_curve_png

BLUE = np.array([31, 79, 199])  # the moving average's colour, (0.12, 0.31, 0.78) in 8 bits


def _blue_pixels(path):
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    ys, xs = np.nonzero(np.abs(img - BLUE).sum(-1) <= 6)
    return img.shape, ys, xs


def test_loss_curve_falls_left_to_right(tmp_path):
    history = [{"step": s, "loss": 2.0 * 0.97 ** s} for s in range(200)] + [{"step": 200, "loss": None}]
    out = loss_curve_png(history, tmp_path / "loss.png", title="tiny")
    assert out == tmp_path / "loss.png" and not (tmp_path / "loss.png.tmp.png").exists()
    shape, ys, xs = _blue_pixels(out)
    assert shape == (360, 640, 3)
    assert len(xs) > 300  # the curve spans the axes
    left, right = ys[xs < np.percentile(xs, 20)], ys[xs > np.percentile(xs, 80)]
    assert left.mean() < right.mean() - 100  # image rows grow downwards: a falling loss


def test_no_positive_loss_draws_no_curve(tmp_path):
    out = loss_curve_png([{"step": 0, "loss": 0.0}, {"step": 1}], tmp_path / "empty.png")
    shape, ys, _ = _blue_pixels(out)
    assert shape == (360, 640, 3) and len(ys) == 0
