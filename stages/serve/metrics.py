"""The server's counters and latency histogram, written in the Prometheus text format (0.0.4) by
hand, and its structured logs (one JSON object per line on stderr).

    GET /metrics  ->  vidu_serve_sessions 2 / vidu_serve_chunk_seconds_bucket{le="0.1"} 14 / ...
"""
from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections import deque

RECENT = 4096              # chunk times kept for /capacity's quantiles
# chunk latency buckets, s: a 4-frame chunk at 25 fps is 0.16 s of video
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.16, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)   # sessions' chunks per forward (ServeOptions.max_batch <= 256)


class Histogram:
    def __init__(self, buckets=BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_num(self.sum)}",
                      f"{name}_count {self.count}"]


class Metrics:
    """Thread-safe: the workers observe chunks, the event loop counts requests."""

    def __init__(self):
        self.lock = threading.Lock()
        self.chunk_seconds = Histogram()
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.counters = {"admitted": 0, "refused": 0, "chunks": 0, "chunks_late": 0, "frames_sent": 0,
                         "frames_dropped": 0, "frames_unsent": 0, "instructions": 0, "voice_commands": 0, "audio_samples": 0, "messages_rejected": 0,
                         "requests_limited": 0, "sessions_closed": 0, "degraded_live": 0, "batches": 0}
        self.recent: deque[float] = deque(maxlen=RECENT)     # the latest chunk times, for exact quantiles
        self.refused_by: dict[str, int] = {}
        self.degraded: dict[str, int] = {}

    def inc(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] += n

    def refuse(self, reason: str) -> None:
        with self.lock:
            self.counters["refused"] += 1
            self.refused_by[reason] = self.refused_by.get(reason, 0) + 1

    def admit(self, profile: str) -> None:
        with self.lock:
            self.counters["admitted"] += 1
            self.degraded[profile] = self.degraded.get(profile, 0) + 1

    def chunk(self, seconds: float, late: bool) -> None:
        with self.lock:
            self.chunk_seconds.observe(seconds)
            self.recent.append(seconds)
            self.counters["chunks"] += 1
            self.counters["chunks_late"] += int(late)

    def batch(self, size: int) -> None:
        with self.lock:
            self.batch_size.observe(size)
            self.counters["batches"] += 1

    def quantiles(self) -> dict:
        """p50 / p99 / max of the latest RECENT chunk times, ms (None before any chunk)."""
        with self.lock:
            x = sorted(self.recent)
        if not x:
            return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
        q = lambda f: round(1000 * x[min(len(x) - 1, int(f * len(x)))], 2)   # noqa: E731 (nearest rank)
        return {"n": len(x), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": round(1000 * x[-1], 2)}

    def text(self, sessions: list[dict], workers: list[dict], gpu: list[tuple[str, int, int]],
             live: dict | None = None) -> str:
        """`sessions`: {id, profile, fps}; `workers`: {worker, load, budget}; `gpu`: (device, allocated
        bytes, reserved bytes); `live`: counts of the open sessions added to the counters."""
        with self.lock:
            c, hist, sizes = dict(self.counters), self.chunk_seconds, self.batch_size
            for k, v in (live or {}).items():
                c[k] += v
            L = []
            _metric(L, "vidu_serve_sessions", "gauge", "Sessions open now.", [("", len(sessions))])
            _metric(L, "vidu_serve_sessions_admitted_total", "counter", "Sessions admitted, by profile.",
                    [(f'{{profile="{p}"}}', n) for p, n in sorted(self.degraded.items())] or [("", 0)])
            _metric(L, "vidu_serve_sessions_refused_total", "counter", "Sessions refused (HTTP 503), by reason.",
                    [(f'{{reason="{r}"}}', n) for r, n in sorted(self.refused_by.items())] or [("", 0)])
            _metric(L, "vidu_serve_sessions_closed_total", "counter", "Sessions closed.", [("", c["sessions_closed"])])
            _metric(L, "vidu_serve_sessions_degraded_total", "counter", "Running sessions moved to fewer steps "
                    "because the measured load outgrew the budget.", [("", c["degraded_live"])])
            L += ["# HELP vidu_serve_chunk_seconds Time to generate and decode one chunk.",
                  "# TYPE vidu_serve_chunk_seconds histogram", *hist.lines("vidu_serve_chunk_seconds"),
                  "# HELP vidu_serve_batch_size Sessions' chunks generated by one batched forward.",
                  "# TYPE vidu_serve_batch_size histogram", *sizes.lines("vidu_serve_batch_size")]
            for key, help_ in (("chunks", "Chunks generated."), ("batches", "Batched forwards (of one or more sessions' chunks)."), ("chunks_late", "Chunks finished after their deadline."),
                               ("frames_sent", "Video frames sent to viewers."),
                               ("frames_dropped", "Video frames skipped because the viewer read them late."),
                               ("frames_unsent", "Video frames generated ahead and not sent when their session closed."),
                               ("instructions", "Instructions received (typed and spoken)."),
                               ("voice_commands", "Instructions spotted in push-to-talk speech."),
                               ("audio_samples", "Push-to-talk samples received (16 kHz)."),
                               ("messages_rejected", "Data channel messages rejected."),
                               ("requests_limited", "HTTP requests refused by the rate limit (429).")):
                _metric(L, f"vidu_serve_{key}_total", "counter", help_, [("", c[key])])
        _metric(L, "vidu_serve_session_fps", "gauge", "Frames per second sent to each session's viewer.",
                [(f'{{session="{s["id"]}",profile="{s["profile"]}"}}', s["fps"]) for s in sessions])
        _metric(L, "vidu_serve_worker_load", "gauge", "Measured chunk time per second of video kept, summed over a "
                "worker's sessions (speed-scaled).", [(f'{{worker="{w["worker"]}"}}', w["load"]) for w in workers])
        _metric(L, "vidu_serve_worker_budget", "gauge", "The load a worker admits up to.",
                [(f'{{worker="{w["worker"]}"}}', w["budget"]) for w in workers])
        if gpu:
            _metric(L, "vidu_serve_gpu_memory_allocated_bytes", "gauge", "torch.cuda.memory_allocated.",
                    [(f'{{device="{d}"}}', a) for d, a, _ in gpu])
            _metric(L, "vidu_serve_gpu_memory_reserved_bytes", "gauge", "torch.cuda.memory_reserved.",
                    [(f'{{device="{d}"}}', r) for d, _, r in gpu])
        return "\n".join(L) + "\n"


def _num(v: float) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


def _metric(lines: list[str], name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {_num(v)}" for labels, v in samples]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(time.time(), 3), "level": record.levelname.lower(), "event": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        return json.dumps(out, default=str)


def logger() -> logging.Logger:
    """The "vidu.serve" logger: JSON lines on stderr (handler added once)."""
    log = logging.getLogger("vidu.serve")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(JsonFormatter())
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def log(event: str, **fields) -> None:
    logger().info(event, extra={"fields": fields})


GC_TRACE_MS = 5.0        # --trace: garbage collections at least this long are logged


def trace_gc(min_ms: float = GC_TRACE_MS) -> None:
    """`vidu serve --trace`, in a core process: a "gc" JSON line for each garbage collection of `min_ms` or more
    (its generation, ms, start on the monotonic clock the "round" lines use), so that a pause of the worker
    can be told from a collection of the process's objects. Registered once per process."""
    import gc
    if any(getattr(cb, "vidu_trace", False) for cb in gc.callbacks):
        return
    started: list[float] = []

    def cb(phase: str, info: dict) -> None:
        if phase == "start":
            started[:] = [time.monotonic()]
        elif started:
            t = started.pop()
            ms = 1000 * (time.monotonic() - t)
            if ms >= min_ms:
                log("gc", generation=info["generation"], ms=round(ms, 2), collected=info["collected"], t=round(t, 4))
    cb.vidu_trace = True
    gc.callbacks.append(cb)
