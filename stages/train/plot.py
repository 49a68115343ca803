"""A loss curve as a PNG (matplotlib, Agg canvas, no display): raw loss in grey, a moving average
in blue, log-scale y."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE_IN, DPI = (6.4, 3.6), 100  # 640 x 360 px


def loss_curve_png(history: list[dict], path: Path, title: str = "loss", key: str = "loss") -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [(h["step"], h[key]) for h in history if h.get(key) is not None and h[key] > 0]
    fig = Figure(figsize=SIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(f"{title}: {key} over {len(pts)} steps")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if pts:
        steps, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts], np.float64)
        k = max(1, len(ys) // 50)  # moving-average window: about 2 % of the run
        logs = np.log(ys)
        smooth = np.exp([logs[max(0, i - k):i + 1].mean() for i in range(len(logs))])
        ax.plot(steps, ys, color="0.67", linewidth=1, label=key)
        ax.plot(steps, smooth, color=(0.12, 0.31, 0.78), linewidth=2, label=f"mean of {k + 1}")
        ax.set_yscale("log")
        ax.legend(loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path
