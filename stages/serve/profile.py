"""A session's profile (the model's own settings, fewer steps, half size) and its measured chunk times: what the
web side needs to know of a model, without the model (no torch here: `vidu stream --serve`'s page process and
`vidu serve`'s web side import it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stages.stream.engine import StreamSettings

EMA = 0.2                  # weight of a new chunk time in a running estimate (a session's share, a batch's time)
MEASURED_AFTER = 2         # samples before a running estimate counts: a session's own chunks (then its measured
                           # share replaces its profile's), a worker's live forwards at a batch size (Worker.times)


@dataclass
class Profile:
    name: str
    settings: StreamSettings   # stages.stream.engine's (or any object with .steps: the page's copy)
    height: int
    width: int
    video_s: float = 0.0   # seconds of video in a steady chunk
    batch_s: dict[int, float] = field(default_factory=dict)   # batch size -> calibrated seconds of one steady
                                                             # batched chunk (ServeModel.calibrate: 1..--max-batch)

    @property
    def chunk_s(self) -> float:
        """Measured seconds of one session's steady chunk, alone."""
        return self.batch_s.get(1, 0.0)

    @property
    def load(self) -> float:
        """Worker time per second of real-time video, of one session alone."""
        return self.chunk_s / self.video_s

    def describe(self) -> dict:
        return {"name": self.name, "steps": self.settings.steps, "height": self.height, "width": self.width,
                "chunk_ms": round(1000 * self.chunk_s, 2), "video_ms": round(1000 * self.video_s, 2),
                "load": round(self.load, 4), "batch_ms": {b: round(1000 * t, 2) for b, t in sorted(self.batch_s.items())}}
