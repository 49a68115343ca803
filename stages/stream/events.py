"""What flows between the outside world and the streaming engine.

Inputs arrive as events on one queue, read by the engine between chunks:
  Instruction(text)      replaces the active text instruction from the next chunk on
  AudioChunk(samples)    16 kHz mono float32 speech, appended to the audio timeline
  AudioEnd()             the audio source has ended (a file or stdin reached its end)
  Stop(reason)           end the stream after the current chunk

Outputs go to sinks: every sink has `write(frames, audio)` and `close()`; `frames` is
[T, H, W, 3] uint8 RGB, `audio` the 16 kHz mono float32 samples that play with those frames
(T / fps seconds of it). `stats(dict)` is called once per chunk with the live statistics.
"""
from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Protocol

import numpy as np

SAMPLE_RATE = 16000
MAX_INSTRUCTION_CHARS = 1000     # longest instruction taken from stdin (cut) or the page (refused)


def instruction_text(raw: bytes | str) -> str:
    """An instruction as typed: bytes decoded as UTF-8 with replacement characters for invalid
    sequences (and strings with lone surrogates, e.g. from surrogateescape, cleaned the same way),
    stripped, cut at MAX_INSTRUCTION_CHARS."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "replace").strip()[:MAX_INSTRUCTION_CHARS]


@dataclass(frozen=True)
class Instruction:
    text: str


@dataclass(frozen=True)
class AudioChunk:
    samples: np.ndarray          # [N] float32 in [-1, 1] at 16 kHz


@dataclass(frozen=True)
class AudioEnd:
    pass


@dataclass(frozen=True)
class Stop:
    reason: str = "stopped"


Event = Instruction | AudioChunk | AudioEnd | Stop


class EventQueue:
    """Thread-safe: producers (stdin reader, audio source, web server) `put`; the engine `drain`s
    between chunks without blocking."""

    def __init__(self):
        self._q: queue.Queue[Event] = queue.Queue()

    def put(self, event: Event) -> None:
        self._q.put(event)

    def drain(self) -> list[Event]:
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: float) -> Event | None:
        """Block up to `timeout` s for one event (the engine waits this way for audio it needs)."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def depth(self) -> int:
        return self._q.qsize()


class Sink(Protocol):
    """Where a stream's chunks go. A sink may also have attach(session): run_session calls it with the
    Session before the first chunk (the page of --serve serves that session: stages/serve/single.py)."""
    def write(self, frames: np.ndarray, audio: np.ndarray | None) -> None: ...
    def stats(self, stats: dict) -> None: ...
    def close(self) -> None: ...


class StreamError(ValueError):
    """A user-facing problem with a stream's inputs or outputs (message is one line)."""

