"""A loss curve as a PNG (Pillow only): raw loss in grey, a moving average in blue, log-scale y."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

W, H, M = 640, 360, 48


def loss_curve_png(history: list[dict], path: Path, title: str = "loss", key: str = "loss") -> Path:
    pts = [(h["step"], h[key]) for h in history if h.get(key) is not None and h[key] > 0]
    img = Image.new("RGB", (W, H), "white")
    g = ImageDraw.Draw(img)
    g.text((M, 12), f"{title}: {key} over {len(pts)} steps", fill="black")
    g.rectangle([M, M, W - M // 2, H - M], outline="black")
    if len(pts) >= 2:
        xs, ys = [p[0] for p in pts], [math.log10(p[1]) for p in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        y1 = y1 if y1 > y0 else y0 + 1e-6

        def to_px(x, y):
            return (M + (x - x0) / max(1, x1 - x0) * (W - 1.5 * M), H - M - (y - y0) / (y1 - y0) * (H - 2 * M))
        g.line([to_px(x, y) for x, y in zip(xs, ys)], fill=(170, 170, 170), width=1)
        k = max(1, len(ys) // 50)
        smooth = [sum(ys[max(0, i - k):i + 1]) / len(ys[max(0, i - k):i + 1]) for i in range(len(ys))]
        g.line([to_px(x, y) for x, y in zip(xs, smooth)], fill=(30, 80, 200), width=2)
        g.text((4, M - 6), f"{10 ** y1:.3g}", fill="black")
        g.text((4, H - M - 6), f"{10 ** y0:.3g}", fill="black")
        g.text((M, H - M + 6), str(x0), fill="black")
        g.text((W - M, H - M + 6), str(x1), fill="black")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path
