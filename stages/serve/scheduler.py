"""Workers and admission control.

One Worker thread per device (on a CPU: one) owns that device's ServeModel and runs its sessions'
chunks one at a time, earliest deadline first: a session's deadline is the time its viewer will have
played every frame generated so far (Timeline.deadline). A session is ready when a viewer is
connected and it is fewer than `ahead_chunks` chunks ahead of it; a session without a viewer holds
its place (its capacity stays reserved through the reconnect grace) but generates nothing.

Chunks of several sessions are NOT batched into one forward: each chunk is its own forward, one after
another. (Batching needs the engine to step B streams with B different caches, texts and positions in
one call; StreamEngine steps one.) Admission is therefore the sum of measured times:

    load(worker) = speed * sum over its sessions of  chunk_s / video_s

where chunk_s is the session's own measured chunk time once it has generated two chunks (before: its
profile's measured time, ServeModel.calibrate) and video_s the seconds of video a chunk plays. A new
session is admitted on the least-loaded worker at the first profile (full, fewer steps, half
resolution) with which the load stays <= headroom; with none, it is refused (HTTP 503, the reason).
When the measured load of the admitted sessions later grows past the headroom (their chunks got slower),
the worker moves the heaviest one to fewer steps at its resolution between two of its chunks
(Worker._rebalance); a lower resolution needs a new session (its caches have the old size).
"""
from __future__ import annotations

import threading
import time

from stages.serve.metrics import Metrics, log
from stages.serve.model import MEASURED_AFTER, Profile, ServeModel
from stages.serve.options import ServeOptions


class Refused(Exception):
    """No worker can take a session: `reason` is a short code for the metrics, the message a sentence."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Worker(threading.Thread):
    def __init__(self, index: int, model: ServeModel, opts: ServeOptions, metrics: Metrics):
        super().__init__(name=f"vidu-serve-worker-{index}", daemon=True)
        self.index, self.model, self.opts, self.metrics = index, model, opts, metrics
        self.sessions: list = []                 # ServeSession, admitted here
        self.cond = threading.Condition()
        self.stopping = False

    def load(self, extra: Profile | None = None) -> float:
        with self.cond:
            total = sum(s.load() for s in self.sessions)
        return self.opts.speed * (total + (extra.load if extra else 0.0))

    def add(self, s) -> None:
        with self.cond:
            self.sessions.append(s)
            self.cond.notify_all()

    def remove(self, s) -> None:
        with self.cond:
            if s in self.sessions:
                self.sessions.remove(s)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.is_alive():
            self.join(timeout=30)

    def _pick(self):
        with self.cond:
            ready = [s for s in self.sessions if s.ready()]
        return min(ready, key=lambda s: s.timeline.deadline(), default=None)

    def run(self) -> None:
        while True:
            with self.cond:
                if self.stopping:
                    return
            s = self._pick()
            if s is None:
                with self.cond:
                    self.cond.wait(0.01)
                continue
            deadline = s.timeline.deadline()
            t = time.perf_counter()
            try:
                rgb, audio, timing = s.session.next_chunk()
            except Exception as e:              # a session's failure closes it, never the worker
                log("session_failed", session=s.id, error=f"{type(e).__name__}: {e}")
                s.fail(f"{type(e).__name__}: {e}")
                continue
            dt = time.perf_counter() - t
            late = s.timeline.offset is not None and time.monotonic() > deadline
            s.chunk_done(rgb, audio, timing, dt, late)
            self.metrics.chunk(dt, late)
            self._rebalance()

    def _rebalance(self) -> None:
        """Between chunks: when the sessions' measured load has grown past the budget, the heaviest session
        that can drops to fewer steps at its resolution (its caches stay; the resolution cannot change
        mid-stream). One switch at a time, then the switched session is measured anew first."""
        if self.load() <= self.opts.headroom:
            return
        with self.cond:
            if any(s.chunks_measured < MEASURED_AFTER for s in self.sessions if s.viewer_left is None):
                return
            candidates = [(s, self.model.fewer_steps(s.profile)) for s in self.sessions]
        candidates = [(s, p) for s, p in candidates if p is not None]
        if candidates:
            s, p = max(candidates, key=lambda c: c[0].load())
            s.switch(p)
            self.metrics.inc("degraded_live")


class Scheduler:
    """The workers, and the admission decision over them."""

    def __init__(self, models: list[ServeModel], opts: ServeOptions, metrics: Metrics):
        self.opts, self.metrics = opts, metrics
        self.workers = [Worker(i, m, opts, metrics) for i, m in enumerate(models)]

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self) -> None:
        for w in self.workers:
            w.stop()

    def sessions(self) -> int:
        return sum(len(w.sessions) for w in self.workers)

    def admit(self) -> tuple[Worker, Profile]:
        """The worker and profile of a new session, or Refused. The caller adds the session to the worker
        before the next admission (the app holds an asyncio lock over both)."""
        if self.sessions() >= self.opts.max_sessions:
            raise Refused("max_sessions", f"the server is full: {self.opts.max_sessions} sessions (--max-sessions)")
        best = None
        for w in sorted(self.workers, key=lambda w: w.load()):
            for p in w.model.profiles:
                if w.load(p) <= self.opts.headroom:
                    if best is None or w.model.profiles.index(p) < best[0].model.profiles.index(best[1]):
                        best = (w, p)
                    break
        if best is None:
            w = min(self.workers, key=lambda w: w.load())
            cheapest = min(w.model.profiles, key=lambda p: p.load)
            raise Refused("capacity", f"no capacity to stay at {self.opts.speed:g}x real time: the worker's load is "
                          f"{w.load():.2f} of {self.opts.headroom:g} and the cheapest profile ({cheapest.name}, "
                          f"{1000 * cheapest.chunk_s:.0f} ms per {1000 * cheapest.video_s:.0f} ms chunk) adds "
                          f"{self.opts.speed * cheapest.load:.2f}")
        return best

    def describe(self) -> list[dict]:
        return [{"worker": w.index, "device": w.model.device, "sessions": len(w.sessions), "load": w.load(),
                 "budget": self.opts.headroom, "profiles": [p.describe() for p in w.model.profiles]}
                for w in self.workers]
