"""The worker and its admission control, on the model side (stages/serve/core.py: a process per device).

One Worker thread per device (on a CPU: one), in that device's core, owns the device's ServeModel and runs
its sessions' chunks, earliest deadline first: a session's deadline is the time its viewer will have played every
frame generated so far (CoreSession.deadline, from the viewer's timeline as the server reports it). A
session is ready when a viewer is connected and it is fewer than `ahead_chunks` chunks ahead of it; a
session without a viewer holds its place (its capacity stays reserved through the reconnect grace) but
generates nothing.

Batching (Worker._pick): the most urgent ready session's chunk runs in one forward with those of other
watched sessions that can share it (the same profile's steps and settings and size: StreamEngine.batch_key;
a newcomer still filling its window joins the others' forward, its shorter context padded and masked, rather
than running a forward of its own beside theirs every round until its window is full: RESULTS.md session 49;
its reference context is built while the worker is idle before its viewer is ready: Worker._warm_one),
taken by deadline, up to `max_batch` (1: no batching), while the batch's measured time at that size
(Worker.batch_time) still ends by the first session's deadline, or that deadline is missed even alone
(then throughput first). A session rides along while fewer than ahead_chunks + 1 chunks ahead: one
chunk beyond its own readiness. Without that, sessions whose viewers started at different times become
ready one at a time and never share a forward; with it, a session that rode along is ready again
together with the one it joined, so the sessions fall into step. stages/stream/batch.py runs the batch;
each session keeps its own caches, reference, texts, audio and noise. Sessions at another step count
(degraded) run in their own batches.

Admission is the sum of measured times. The n sessions of a worker at one profile share forwards, in
batches of at most max_batch; a round of their chunks takes

    round_s(profile, n) = (n // max_batch) * T(max_batch) + T(n % max_batch)      (T(0) = 0)

where T(b) is the time of one batched chunk of b sessions (Worker.batch_time): per size, the larger of its
calibrated time (ServeModel.calibrate: every size 1..max_batch after its own warm-up forward, within
--calib-budget; a size it did not time counts at the next larger one's) and the live running average of the
worker's steady forwards at that size (a full window among them: Worker.timed) once it has MEASURED_AFTER
samples (Worker.measured); a size with no live average yet counts at its calibrated time x the largest live /
calibrated ratio measured at the profile's other sizes (live forwards ran 1.2-1.7x their calibration on the
H100, RESULTS.md session 47, at every size: a size not yet run live is no exception); and never less than
T(b - 1): a batch does all of a smaller one's work. Live times only ever raise T: on the H200 the live forwards ran
far slower than calibration (RESULTS.md, session 46: a batch of 2 at 209 ms), and a load that ignored them
admitted sessions none of which kept real time. Then

    load(worker) = speed * sum over its profiles of  round_s(profile, n) / video_s

with video_s the seconds of video a chunk plays. So batching admits more sessions exactly as far as
batched forwards are measured to be cheaper, and a worker whose batches get slower sees its load grow
(fewer admitted; past the headroom, degraded).
A new session is admitted at the first profile (full, fewer steps, half resolution) with which a
worker's load stays <= headroom (Worker.fit), on the least-loaded worker at the best such profile (the
server asks each core for its offer: app._admit); with none, it is refused (HTTP 503, the reason).
When the measured load of the admitted sessions later grows past the headroom (their chunks got slower),
the worker moves the heaviest one (with batching, every session at its profile: they share forwards) to
fewer steps at its resolution between two chunks (Worker._rebalance); a lower resolution needs a new
session (its caches have the old size).
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import Counter

from stages.serve.metrics import log
from stages.serve.model import ServeModel
from stages.serve.profile import EMA, MEASURED_AFTER, Profile
from stages.serve.options import ServeOptions
from stages.stream.batch import next_chunks


class Refused(Exception):
    """No worker can take a session: `reason` is a short code for the metrics, the message a sentence."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Worker(threading.Thread):
    def __init__(self, index: int, model: ServeModel, opts: ServeOptions, metrics):
        super().__init__(name=f"vidu-serve-worker-{index}", daemon=True)
        self.index, self.model, self.opts, self.metrics = index, model, opts, metrics
        self.sessions: list = []                 # CoreSession (stages/serve/core.py), admitted here
        self.cond = threading.Condition()
        self.stopping = False
        self.batch_s: dict[tuple[str, int], float] = {   # (profile, batch size) -> calibrated seconds
            (p.name, b): t for p in model.profiles for b, t in p.batch_s.items()}
        self.live: dict[tuple[str, int], tuple[float, int]] = {}   # (profile, size) -> (running average, samples)
        self.first_calls: set[tuple[str, int]] = set()   # (profile, size) run once, steady, not yet timed (Worker.measured)

    def times(self, profile: Profile, upto: int | None = None) -> dict[int, dict]:
        """Per batch size 1..`upto` (default: max_batch) at `profile`: "calibrated" (s; a size calibration did
        not time: the next larger timed size's, beyond the largest its time per session x the size; None:
        nothing timed), "timed" (whether calibration timed it), "live" (the running average of the worker's
        steady forwards, None before MEASURED_AFTER samples), "samples", "slowdown" (the largest live /
        calibrated ratio of the profile's sizes with a live average, >= 1; what a size without one is counted
        at, x its calibrated time), and "used": the time admission and batching count on (the module's
        docstring)."""
        with self.cond:
            cal = {b: t for (name, b), t in self.batch_s.items() if name == profile.name}
            live = {b: a for (name, b), (a, n) in self.live.items() if name == profile.name and n >= MEASURED_AFTER}
            samples = {b: n for (name, b), (_, n) in self.live.items() if name == profile.name}
        timed = sorted(cal)

        def calibrated(size: int) -> float | None:
            i = bisect.bisect_left(timed, size)
            return cal[timed[i]] if i < len(timed) else cal[timed[-1]] * size / timed[-1] if timed else None

        slowdown = max([1.0] + [a / c for b, a in live.items() if (c := calibrated(b))])
        out, used = {}, 0.0
        for size in range(1, (upto or self.opts.max_batch) + 1):
            c, avg = calibrated(size), live.get(size)
            used = max(used, c or 0.0, avg if avg is not None else (c or 0.0) * slowdown)
            out[size] = {"calibrated": c, "timed": size in cal, "live": avg, "samples": samples.get(size, 0),
                         "slowdown": slowdown, "used": used}
        return out

    def batch_time(self, profile: Profile, size: int) -> float:
        """Seconds one batched chunk of `size` sessions at `profile` is counted at (times()'s "used")."""
        return self.times(profile, size)[size]["used"] if size > 0 else 0.0

    def round_time(self, profile: Profile, n: int) -> float:
        """Seconds for one chunk of each of `n` sessions at `profile`, batched by max_batch."""
        full, rest = divmod(n, self.opts.max_batch)
        return full * self.batch_time(profile, self.opts.max_batch) + (self.batch_time(profile, rest) if rest else 0.0)

    def load(self, extra: Profile | None = None) -> float:
        """Worker time per second of real-time video for its sessions (and `extra`, a session to admit)."""
        with self.cond:
            profiles = [s.profile for s in self.sessions] + ([extra] if extra else [])
        by_name = {p.name: p for p in profiles}
        counts = Counter(p.name for p in profiles)
        return self.opts.speed * sum(self.round_time(by_name[n], k) / by_name[n].video_s for n, k in counts.items())

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

    def fit(self) -> Profile | None:
        """The first of the profiles (full, fewer steps, half size) at which a new session keeps the load
        within the headroom, or None."""
        return next((p for p in self.model.profiles if self.load(p) <= self.opts.headroom), None)

    def refusal(self) -> Refused:
        cheapest = min(self.model.profiles, key=lambda p: p.load)
        return Refused("capacity", f"no capacity to stay at {self.opts.speed:g}x real time: the worker's load is "
                       f"{self.load():.2f} of {self.opts.headroom:g} and the cheapest profile ({cheapest.name}, "
                       f"{1000 * cheapest.chunk_s:.0f} ms per {1000 * cheapest.video_s:.0f} ms chunk) adds "
                       f"{self.opts.speed * cheapest.load:.2f}")

    def admit(self) -> Profile:
        """The profile of a new session here (fit), or Refused. The caller adds the session before the next
        admission (the server counts --max-sessions over all cores: app._admit)."""
        p = self.fit()
        if p is None:
            raise self.refusal()
        return p

    def describe(self) -> dict:
        """The worker for /capacity: its sessions and load, and per profile and batch size the calibrated, live
        and counted ("used") milliseconds of a batched chunk and the live slowdown applied (times())."""
        with self.cond:
            n = len(self.sessions)
        ms = lambda t: None if t is None else round(1000 * t, 2)   # noqa: E731
        return {"worker": self.index, "device": self.model.device, "sessions": n, "load": self.load(),
                "budget": self.opts.headroom, "profiles": [p.describe() for p in self.model.profiles],
                "batch_ms": {p.name: {size: {"calibrated": ms(t["calibrated"]), "timed": t["timed"], "live": ms(t["live"]),
                                             "samples": t["samples"], "slowdown": round(t["slowdown"], 3),
                                             "used": ms(t["used"])}
                                      for size, t in self.times(p).items()} for p in self.model.profiles}}

    def _pick(self) -> list:
        """The sessions whose chunks run next, in one forward (the module's docstring says which)."""
        with self.cond:
            ready = [s for s in self.sessions if s.ready(1)]       # those that may ride along
        ready.sort(key=lambda s: s.deadline())
        first = next((s for s in ready if s.ready()), None)
        if first is None:
            return []
        batch = [first]
        if self.opts.max_batch == 1:
            return batch
        key, due, now = first.batch_key(), first.deadline(), time.monotonic()
        for s in ready:
            if s is first:
                continue
            if len(batch) >= self.opts.max_batch or not self._fits(first.profile, len(batch) + 1, due, now):
                break
            if s.batch_key() == key:
                batch.append(s)
        return batch

    def _fits(self, profile: Profile, size: int, due: float, now: float) -> bool:
        """Whether a batch of `size` at `profile` ends by `due` by its measured time (batch_time), or `due`
        is missed even alone."""
        return now + self.batch_time(profile, size) <= due or now + self.batch_time(profile, 1) > due

    def run(self) -> None:
        while True:
            with self.cond:
                if self.stopping:
                    return
            batch = self._pick()
            if not batch:
                if not self._warm_one():
                    with self.cond:
                        self.cond.wait(0.01)
                continue
            deadlines = [s.deadline() for s in batch]
            profile = batch[0].profile
            firsts = sum(s.session.chunks == 0 for s in batch) if self.opts.trace else 0
            laps = {} if self.opts.trace else None
            t = time.perf_counter()
            outcomes = next_chunks([s.session for s in batch], laps)
            dt = time.perf_counter() - t
            if self.timed(batch):
                self.measured(profile, len(batch), dt)
            if self.opts.trace:                              # the load test's per-arrival reading (serve_load.py)
                warming = sum(not _full(s) for s in batch)
                log("round", worker=self.index, t=round(time.monotonic() - dt, 4), ms=round(1000 * dt, 2),
                    size=len(batch), profile=profile.name, warming=warming, first=firsts,
                    sessions=[s.id for s in batch], **{f"{k}_ms": round(1000 * v, 2) for k, v in laps.items()})
            self.metrics.batch(len(batch))
            done = time.monotonic()
            for s, deadline, out in zip(batch, deadlines, outcomes):
                if isinstance(out, BaseException):           # a session's failure closes it, never the worker
                    log("session_failed", session=s.id, error=f"{type(out).__name__}: {out}")
                    s.fail(f"{type(out).__name__}: {out}")
                    continue
                rgb, audio, timing = out
                late = s.offset is not None and done > deadline
                s.chunk_done(rgb, audio, timing, dt / len(batch), late)
                self.metrics.chunk(dt, late)
            self._rebalance()

    def _warm_one(self) -> bool:
        """Idle (no session ready): one session yet to make its first chunk (its viewer still connecting) has its
        reference context built now (Session.warm_reference), so that its first forward, shared with the sessions
        streaming, does not pass it. Whether one was built."""
        with self.cond:
            cold = [s for s in self.sessions if not s.closed and s.session.chunks == 0]
        for s in cold:
            t = time.perf_counter()
            try:
                if not s.session.warm_reference():
                    continue
            except Exception as e:                       # noqa: BLE001 (a session's failure is its own)
                log("session_failed", session=s.id, error=f"{type(e).__name__}: {e}")
                s.fail(f"{type(e).__name__}: {e}")
                return True
            if self.opts.trace:
                log("warmed", worker=self.index, session=s.id, ms=round(1000 * (time.perf_counter() - t), 2))
            return True
        return False

    def timed(self, batch: list) -> bool:
        """Whether the forward just run for `batch` (its sessions' chunk counts now include it) counts toward the
        live average at its size: when one of its sessions had a full window (the batch's context is then the
        full length: a session still filling its own rides along padded to it, at about the same cost: on an
        H100, 2-step batches of 3 ran median 138 ms with a newcomer warming and 123 ms without, RESULTS.md
        session 50) and none made its first chunk (that forward also passes the reference unless the worker
        built it while idle, _warm_one: 386-524 ms where its neighbours took 140-200). Without the warming
        forwards, sessions arriving a second apart left the live average unmeasured for as long as arrivals went
        on (9 chunks each), and admission trusted a calibration 1.4-1.75x below the live forwards."""
        return any(_full(s) for s in batch) and all(s.session.chunks > 1 for s in batch)

    def measured(self, profile: Profile, size: int, dt: float) -> None:
        """A steady batched forward's time `dt` into the live running average at its size (live). At a size
        calibration did not time, the first steady forward is left out: it holds that shape's first-call costs
        (allocations, kernel and attention-plan choices, a compilation), which calibration leaves out by a
        warm-up forward, and one such sample would weigh on a rarely run size for many chunks (EMA)."""
        key = (profile.name, size)
        with self.cond:
            if key not in self.batch_s and key not in self.first_calls:
                self.first_calls.add(key)
                return
            avg, n = self.live.get(key, (dt, 0))
            self.live[key] = ((1 - EMA) * avg + EMA * dt if n else dt, n + 1)

    def _rebalance(self) -> None:
        """Between chunks: when the sessions' measured load has grown past the budget, the heaviest session
        that can drops to fewer steps at its resolution (its caches stay; the resolution cannot change
        mid-stream), and with batching on every session at its profile with it: one of them alone would
        leave their batches for forwards of its own, and the load would grow. One switch at a time, then
        the switched sessions are measured anew first."""
        if self.load() <= self.opts.headroom:
            return
        with self.cond:
            if any(s.chunks_measured < MEASURED_AFTER for s in self.sessions if s.watched):
                return
            candidates = [(s, self.model.fewer_steps(s.profile)) for s in self.sessions]
        candidates = [(s, p) for s, p in candidates if p is not None and self._cheaper(s.profile, p, candidates)]
        if candidates:
            s, p = max(candidates, key=lambda c: c[0].load())
            group = [c for c in candidates if c[0].profile is s.profile] if self.opts.max_batch > 1 else [(s, p)]
            for t, q in group:
                t.switch(q)
                self.metrics.inc("degraded_live")

    def _cheaper(self, old: Profile, new: Profile, candidates: list) -> bool:
        """Whether moving the sessions at `old` (with batching all of them, without one) to `new` lowers the
        measured time of their round: fewer steps need not be cheaper (a schedule that cannot keep its
        noisy cache in the denoising pass pays a pass of its own; measured on the H200, the starter's
        2-step profile cost 207 ms a batch of 8 against 3 steps' 142 ms)."""
        n = sum(c[0].profile is old for c in candidates) if self.opts.max_batch > 1 else 1
        return self.round_time(new, n) < self.round_time(old, n)


def _full(s) -> bool:
    """Whether a session's window was full for the chunk it just made (its ring held every slot)."""
    return s.session.chunks > s.profile.settings.slots + 1
