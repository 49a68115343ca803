"""The model side of `vidu serve`: one process per device (or, for tests, a thread), driven by messages.

Why processes: a worker launches thousands of small GPU kernels per chunk from Python, and every launch
needs the GIL. In the server's process the WebRTC side (RTP, SRTP, Opus, frame conversion, the data
channel) holds it too: on the H200 the starter's batched chunks ran 2-3x slower live than at calibration,
and two pure-Python threads beside a worker stalled it (benchmarks/gil_probe.py). Workers of different
GPUs in one process would stall each other the same way. Here each worker shares its GIL with nothing but
its core's message threads (as vLLM's engine core and workers are processes of their own).

A Core owns one device's ServeModel, its Worker (stages/serve/scheduler.py), and per session a CoreSession: the
stream Session (engine caches, ring, events) and what the worker needs to know of the viewer (a mirror of
its Timeline: the clock offset and the next frame to send, reported by the server when the clock moves or
the viewer reaches a position the core said would make the session ready, `CoreSession.wakes`). The server
(stages/serve/app.py) talks to each core through a CoreHandle and picks the core of a new session by their
offers (the best profile it fits at, then the least load: app._admit). Messages are tuples
over one duplex multiprocessing Connection, pickled both ways (the same on a thread); a chunk's frames go
through a ring in shared memory (stages/serve/ring.py), the message says where:

  server -> core                                 core -> server
  ("offer", rid)                                 ("reply", rid, value)          value: an answer or a CoreError
  ("create", rid, sid, rgb, seed, instruction, voice)   ("chunk", sid, rgb, audio, info) rgb: a ring.Slot (shared memory),
                                                 or the frames; info: dt, late, chunks, frames,
  ("event", sid, Instruction | AudioChunk)                                       instruction, audio_real, wakes
  ("timeline", sid, offset, since, next_frame)   ("failed", sid, error)
  ("viewer", sid, watched)                       ("degraded", sid, profile name, wakes)
  ("close", sid)                                 ("metric", name, args)         Metrics.<name>(*args)
  ("describe", rid)                              ("ready", index, device, profiles, notes, ring name)
                                                 | ("error", message)
  ("stop",)                                      ("stopped",)
"""
from __future__ import annotations

import asyncio
import itertools
import math
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass

from stages.serve.metrics import log, trace_gc
from stages.serve.options import ServeError, ServeOptions
from stages.serve.profile import EMA, MEASURED_AFTER, Profile
from stages.serve.ring import FrameRing, Slot
from stages.stream.events import EventQueue, StreamError

START_TIMEOUT_S = 900.0            # model load and calibration (a 1.3B model with torch.compile takes minutes)
STOP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = {"create": 60.0, "offer": 10.0, "describe": 10.0}   # s: a core that answers no request this
                                   # long (hung, not dead) fails it (a /metrics scrape times out in 10 s)


class CoreError(Exception):
    """A request the core answered with a failure: `reason` a short code (capacity, max_sessions: refused;
    error: the request's input cannot make a session; failed: the core could not do it; ended: no core)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return CoreError, (self.reason, str(self))


@dataclass
class ModelSpec:
    """How the core process builds one worker's ServeModel (the arguments of ServeModel)."""
    ckpt: str | None
    preset: str
    device: str
    dtype: object
    seed: int = 0
    decoder_weights: str | None = None
    text_encoder_path: str | None = None
    size: tuple[int, int] | None = None
    compile: bool = False
    kernels: bool | None = None          # the fast path (stages.stream.session.fast_path; None: on a GPU)
    attention: str = "sdpa"

    def build(self):
        from stages.serve.model import ServeModel
        return ServeModel(self.ckpt, self.preset, self.device, self.dtype, self.seed, self.decoder_weights,
                          self.text_encoder_path, self.size, self.compile, self.kernels, self.attention)


class CoreSession:
    """A session as its worker sees it: the stream Session, its profile and measured share of worker time,
    and the viewer's timeline as the server last reported it."""

    def __init__(self, sid: str, session, profile: Profile, opts: ServeOptions, post):
        self.id, self.session, self.profile, self.opts, self.post = sid, session, profile, opts, post
        self.fps = session.p.cfg.audio.fps
        self.offset: float | None = None        # time.monotonic() at which media frame 0 plays (None: not started)
        self.since = time.monotonic()           # when the viewer connected (the deadline before its first frame)
        self.next_frame = 0                     # the next frame the viewer is sent
        self.watched = False
        self.closed = False
        self.chunk_s = profile.chunk_s          # this session's measured share of worker time per chunk (EMA)
        self.chunks_measured = 0
        self.worker = None                      # the Worker it is pinned to

    def load(self) -> float:
        chunk_s = self.chunk_s if self.chunks_measured >= MEASURED_AFTER else self.profile.chunk_s
        return chunk_s / self.profile.video_s

    def _ahead_limit(self, extra: int) -> float:
        return (self.opts.ahead_chunks + extra) * self.profile.video_s * self.fps

    def ready(self, extra: int = 0) -> bool:
        """Watched and fewer than `ahead_chunks` (+ `extra`) chunks ahead of its viewer. `extra` 1: it may
        ride along in another session's batch (Worker._pick)."""
        return (not self.closed and self.watched
                and self.session.frames - self.next_frame < self._ahead_limit(extra))

    def wakes(self) -> list[int]:
        """The viewer positions (next_frame) at which ready(1), then ready(), turn true for the frames made so
        far. The server reports its viewer's position when it reaches one of them (and whenever the viewer's
        clock moves), not at every frame sent."""
        return [math.floor(self.session.frames - self._ahead_limit(e)) + 1 for e in (1, 0)]

    def deadline(self) -> float:
        """When the frames generated so far will have played (the next chunk is due by then); before the
        viewer's first frame, when it connected (so that sessions already behind do not starve it)."""
        return self.since if self.offset is None else self.offset + self.session.frames / self.fps

    def batch_key(self) -> tuple:
        """Sessions with equal keys can share a batched forward (StreamEngine.batch_key)."""
        return self.session.p.engine.batch_key()

    def chunk_done(self, rgb, audio, timing: dict, dt: float, late: bool) -> None:
        """A chunk generated; `dt`: this session's share of the worker's time for it (a batch's time over its size)."""
        s = self.session
        if s.chunks > 1:                        # the first chunk (one frame, warm-up) is not typical
            self.chunk_s = dt if self.chunks_measured == 0 else (1 - EMA) * self.chunk_s + EMA * dt
            self.chunks_measured += 1
        if len(s.instruction_log) > self.opts.history:
            del s.instruction_log[:-self.opts.history]
        self.post(("chunk", self.id, rgb, audio, {"dt": dt, "late": late, "chunks": s.chunks, "frames": s.frames,
                                                  "instruction": s.instruction, "wakes": self.wakes(),
                                                  "audio_real": int(timing.get("audio_real", 0))}))

    def switch(self, profile: Profile) -> None:
        """Fewer steps from the next chunk (the worker's thread, between this session's chunks)."""
        old = self.profile
        self.session.p.engine.switch_steps(profile.settings)
        self.profile, self.chunk_s, self.chunks_measured = profile, profile.chunk_s, 0
        log("session_degraded", session=self.id, old=old.name, new=profile.name, chunk=self.session.chunks)
        self.post(("degraded", self.id, profile.name, self.wakes()))

    def fail(self, error: str) -> None:
        self.closed = True
        self.post(("failed", self.id, error))


class _Metrics:
    """What a Worker tells the metrics, sent to the server's Metrics."""

    def __init__(self, post):
        self.post = post

    def batch(self, size: int) -> None:
        self.post(("metric", "batch", (size,)))

    def chunk(self, seconds: float, late: bool) -> None:
        self.post(("metric", "chunk", (seconds, late)))

    def inc(self, key: str, n: int = 1) -> None:
        self.post(("metric", "inc", (key, n)))


class Core:
    """One device's worker and its sessions, driven by the messages on `conn` until ("stop",) or its end.
    `index`: the worker's number (its device's, in `vidu serve --gpus N`)."""

    def __init__(self, model, opts: ServeOptions, conn, index: int = 0):
        from stages.serve.scheduler import Worker        # the model side's imports (torch): not the server's
        self.opts, self.conn = opts, conn
        self.outbox: queue.Queue = queue.Queue()
        self.worker = Worker(index, model, opts, _Metrics(self.outbox.put))
        self.sessions: dict[str, CoreSession] = {}
        fps = model.base.cfg.audio.fps
        chunk_bytes = max(p.height * p.width * 3 * math.ceil(p.video_s * fps - 1e-6) for p in model.profiles)
        self.ring = FrameRing.create(chunk_bytes, 2 * opts.max_batch)    # None: frames through the pipe
        if opts.trace:
            trace_gc()

    def ready_message(self) -> tuple:
        m = self.worker.model
        return ("ready", self.worker.index, str(m.device), m.profiles, list(m.base.notes),
                self.ring.name if self.ring else None)

    def run(self) -> None:
        sender = threading.Thread(target=self._send, daemon=True, name="vidu-core-send")
        sender.start()
        self.outbox.put(self.ready_message())
        self.worker.start()
        try:
            while True:
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "stop":
                    break
                try:
                    self._handle(msg)
                except Exception as e:  # noqa: BLE001  -- a bad message never ends the core
                    log("core_message_failed", kind=msg[0], error=f"{type(e).__name__}: {e}")
        finally:
            self.worker.stop()
            self.outbox.put(("stopped",))
            self.outbox.put(None)
            sender.join(STOP_TIMEOUT_S)
            self.conn.close()
            if self.ring is not None:
                self.ring.close()

    def _send(self) -> None:
        while (msg := self.outbox.get()) is not None:
            if msg[0] == "chunk" and self.ring is not None:      # the frames through shared memory (ring.py)
                slot = self.ring.put(msg[2])
                if slot is not None:
                    msg = (*msg[:2], slot, *msg[3:])
            try:
                self.conn.send(msg)
            except (OSError, ValueError):               # the server is gone
                return

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind in ("create", "offer", "describe"):  # a request: always answered, or the server would wait forever
            try:
                answer = (self._create(*msg[2:]) if kind == "create" else self.offer() if kind == "offer"
                          else self.describe())
            except Exception as e:  # noqa: BLE001  -- e.g. out of memory making a session: refused, in one line
                log("core_request_failed", kind=kind, error=f"{type(e).__name__}: {e}")
                answer = CoreError("failed", f"{kind} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            self.outbox.put(("reply", msg[1], answer))
        elif (s := self.sessions.get(msg[1])) is not None:
            if kind == "event":
                s.session.events.put(msg[2])
            elif kind == "timeline":
                s.offset, s.since, s.next_frame = msg[2:5]
            elif kind == "viewer":
                s.watched = msg[2]
            elif kind == "close":
                s.closed = True
                self.sessions.pop(s.id, None)
                s.worker.remove(s)
            s.worker.wake()

    def _create(self, sid: str, rgb, seed: int, instruction: str | None, voice: str | None = None):
        from stages.serve.model import live_options
        from stages.serve.scheduler import Refused
        from stages.stream.session import Session
        try:
            worker, profile = self.worker, self.worker.admit()
        except Refused as e:
            return CoreError(e.reason, str(e))
        t = time.monotonic()
        try:
            parts = worker.model.parts(rgb, profile, seed, voice)
        except (StreamError, ValueError) as e:
            return CoreError("error", str(e))
        if self.opts.trace:     # made in this thread, beside the worker's forwards (the reference encoded on its device)
            log("session_made", session=sid, worker=worker.index, t=round(t, 4), ms=round(1000 * (time.monotonic() - t), 2))
        s = CoreSession(sid, Session(parts, EventQueue(), live_options(instruction)), profile, self.opts,
                        self.outbox.put)
        s.worker = worker
        self.sessions[sid] = s
        worker.add(s)
        return {"worker": worker.index, "profile": profile.name, "fps": s.fps, "instruction": s.session.instruction}

    def offer(self) -> dict:
        """What admitting a session here would give: the rank of the profile it fits at (0: full; None: it
        does not fit, `refusal` says why) and the worker's load now."""
        w = self.worker
        p = w.fit()
        return {"rank": None if p is None else w.model.profiles.index(p), "load": w.load(),
                "refusal": str(w.refusal()) if p is None else None}

    def describe(self) -> dict:
        import torch
        dev = str(self.worker.model.device)
        gpu = [(dev, torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev))] \
            if dev.startswith("cuda") and torch.cuda.is_available() else []
        return {"workers": [self.worker.describe()], "gpu": gpu}


def _process_main(spec: ModelSpec, opts: ServeOptions, conn, index: int) -> None:
    """A core process: build and calibrate the model, then serve messages. Ctrl-C is the server's to handle
    (it stops the core): ignored here."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        model = spec.build()
        model.calibrate(opts.calib_chunks, opts.max_batch, opts.calib_budget_s)
    except Exception as e:  # noqa: BLE001  -- ServeError, StreamError, a missing file, CUDA: told in one line
        said = str(e).splitlines()[0] if str(e) else ""
        known = isinstance(e, (ValueError, FileNotFoundError))
        conn.send(("error", said if known and said else f"{type(e).__name__}: {said}".rstrip(": ")))
        return
    Core(model, opts, conn, index).run()


class CoreHandle:
    """The server's side of a Core: requests (awaited), messages, and what the core sends back, dispatched
    on the event loop to `on_message(handle, msg)` (the app's State)."""

    def __init__(self, conn, runner, ready: tuple):
        self.conn, self.runner = conn, runner            # runner: the Process or Thread running the core
        _, self.index, self.device, self.profiles, self.notes, ring = ready
        self.ring = FrameRing.attach(ring) if ring else None
        self.loop = None
        self.on_message = None
        self.pending: dict[int, object] = {}
        self.ids = itertools.count()
        self.alive = True
        self._reader: threading.Thread | None = None

    @classmethod
    def processes(cls, specs: list[ModelSpec], opts: ServeOptions,
                  timeout: float = START_TIMEOUT_S) -> list["CoreHandle"]:
        """One core process per spec (a device each: workers on different GPUs share no GIL either; spawned:
        CUDA cannot follow a fork), loading and calibrating side by side; returns once all are measured
        (ServeError, one line, when one cannot be: then none runs)."""
        ctx = mp.get_context("spawn")
        started = []
        for i, spec in enumerate(specs):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_process_main, args=(spec, opts, theirs, i), daemon=True,
                               name=f"vidu-serve-core-{i}")
            proc.start()
            theirs.close()
            started.append((ours, proc))
        deadline = time.monotonic() + timeout
        handles = []
        try:
            for ours, proc in started:
                where = f"the model process for {specs[len(handles)].device}"
                if not ours.poll(max(0.0, deadline - time.monotonic())):
                    raise ServeError(f"{where} did not get ready within {timeout:g} s")
                try:
                    first = ours.recv()
                except EOFError:
                    proc.join(5)
                    raise ServeError(f"{where} ended while loading (exit code {proc.exitcode})") from None
                if first[0] == "error":
                    raise ServeError(first[1])
                handles.append(cls(ours, proc, first))
        except BaseException:
            for _, proc in started:
                proc.kill()
            raise
        return handles

    @classmethod
    def thread(cls, model, opts: ServeOptions, index: int = 0) -> "CoreHandle":
        """A core on a thread of this process over an already calibrated `model` (tests, embedding): the
        same messages, pickled the same way."""
        ours, theirs = mp.Pipe()
        core = Core(model, opts, theirs, index)
        t = threading.Thread(target=core.run, daemon=True, name=f"vidu-serve-core-{index}")
        t.core = core
        t.start()
        return cls(ours, t, ours.recv())

    # -- the event loop side
    def start(self, loop, on_message) -> None:
        self.loop, self.on_message = loop, on_message
        self._reader = threading.Thread(target=self._read, daemon=True, name="vidu-core-read")
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
                if msg[0] == "chunk" and isinstance(msg[2], Slot):   # copied out in order: the core may reuse it
                    msg = (*msg[:2], self.ring.take(msg[2]), *msg[3:])
            except (EOFError, OSError, TypeError):      # TypeError: closed under the read
                msg = ("ended",)
            except Exception as e:  # noqa: BLE001  -- a message that cannot be read is skipped, never fatal
                log("core_message_unreadable", error=f"{type(e).__name__}: {e}")
                continue
            if self.loop.is_closed():
                return
            try:
                self.loop.call_soon_threadsafe(self._dispatch, msg)
            except RuntimeError:                        # the loop closed meanwhile
                return
            if msg[0] in ("ended", "stopped"):
                return

    def _dispatch(self, msg: tuple) -> None:
        if msg[0] == "reply":
            fut = self.pending.pop(msg[1], None)
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
            return
        if msg[0] in ("ended", "stopped"):
            self.alive = False
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_result(CoreError("ended", "the model process has ended"))
            self.pending.clear()
        self.on_message(self, msg)

    def send(self, *msg) -> None:
        if self.alive:
            try:
                self.conn.send(msg)
            except (OSError, ValueError):
                self.alive = False

    async def request(self, kind: str, *args):
        """The core's answer to (kind, rid, *args); CoreError raised for a failure, and when no answer comes
        within REQUEST_TIMEOUT_S[kind] (a create given up is closed after it: the core handles messages in order,
        so a session it makes late never holds capacity)."""
        if not self.alive:
            raise CoreError("ended", "the model process has ended")
        rid = next(self.ids)
        fut = self.loop.create_future()
        self.pending[rid] = fut
        self.send(kind, rid, *args)
        try:
            out = await asyncio.wait_for(fut, REQUEST_TIMEOUT_S[kind])
        except asyncio.TimeoutError:
            self.pending.pop(rid, None)
            if kind == "create":
                self.send("close", args[0])
            log("core_request_timeout", kind=kind, worker=self.index)
            raise CoreError("failed", f"the model process did not answer {kind} within {REQUEST_TIMEOUT_S[kind]:g} s") from None
        if isinstance(out, CoreError):
            raise out
        return out

    def stop(self) -> None:
        """Stop the core (its workers finish their chunk) and wait for it; a process that does not end is killed."""
        self.send("stop")
        self.runner.join(STOP_TIMEOUT_S)
        if isinstance(self.runner, mp.process.BaseProcess) and self.runner.is_alive():
            self.runner.kill()
        self.alive = False
        if self._reader is not None:
            self._reader.join(STOP_TIMEOUT_S)
        try:
            self.conn.close()
        except OSError:
            pass
        if self.ring is not None:
            self.ring.close()
