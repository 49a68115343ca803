"""The stage runner: maps a stage over input rows and writes one manifest per run.

A stage is a dataclass of parameters (see `Stage`). The runner gives every stage:
- `workers` local processes (spawned; each calls `setup()` once) or in-process execution;
- resumability: finished rows are flushed every few seconds to atomic part files under
  runs/<run_id>/; re-running the same stage on the same inputs and parameters (same run id)
  reuses them, so a Ctrl-C or SIGKILL loses at most the last few seconds of work and the final
  manifest equals an uninterrupted run's (rows ordered by input, de-duplicated by id);
- per-row error capture: an exception (or a worker that dies) becomes a status=error row;
- a rich progress bar on stderr, and a row in the catalog with lineage and counts.

The executor seam is `execute`: it takes pending items and yields (item_id, rows) pairs, from
local processes (stages/run/local.py) or Ray actors (stages/run/ray.py).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import av
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from manifests import catalog
from manifests.io import read_manifest, read_meta, to_table, write_table
from manifests.schemas import SCHEMAS
from stages.run.contract import RunResult, Stage
from stages.run.local import execute_local

FLUSH_SECONDS = float(os.environ.get("VIDU_FLUSH_SECONDS", "2.0"))  # resume-point interval
FLUSH_ROWS = 256


def code_version() -> str:
    """The installed package version, plus the git revision when running from a checkout."""
    try:
        version = importlib.metadata.version("vidu")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    here = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{version}+{rev}" if rev else version


def execute(stage: Stage, items: list[dict], workers: int, executor: str = "local",
            ray_address: str | None = None) -> Iterator[tuple[str, list[dict]]]:
    """Yield (item id, output rows) as items finish, in any order, from the chosen executor."""
    if executor == "ray":
        from stages.run.ray import execute_ray
        yield from execute_ray(stage, items, workers, ray_address)
    elif executor == "local":
        yield from execute_local(stage, items, workers)
    else:
        raise ValueError(f"unknown executor {executor!r}; choose local or ray")


def run_id_for(stage: Stage, fingerprint: list) -> str:
    blob = json.dumps({"stage": stage.name, "version": stage.version, "params": stage.params(),
                       "inputs": fingerprint}, sort_keys=True, default=str)
    return f"{stage.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------
# resume parts

def _read_parts(run_dir: Path, kind: str) -> tuple[dict[str, list[dict]], int]:
    """Rows of finished items from earlier attempts: {item id: rows}, and the part count."""
    done: dict[str, list[dict]] = {}
    n = 0
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)  # a write that was killed before its rename
    for part in sorted(run_dir.glob("part-*.parquet")):
        n += 1
        meta = read_meta(part)
        table = pq.read_table(part)
        if not table.schema.equals(SCHEMAS[kind], check_metadata=False):
            continue
        rows = table.to_pylist()
        for item_id, count in meta["items"]:
            done[item_id], rows = rows[:count], rows[count:]
    return done, n


def _write_part(run_dir: Path, index: int, batch: list[tuple[str, list[dict]]], kind: str) -> None:
    rows = [r for _, rs in batch for r in rs]
    write_table(to_table(rows, kind), run_dir / f"part-{index:06d}.parquet",
                {"items": [[item_id, len(rs)] for item_id, rs in batch]})


@contextmanager
def _sigint_seen():
    """Remember a Ctrl-C even where a C extension swallows the KeyboardInterrupt (PyAV's av.open
    does), so the run loop can stop after the current item."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    flag = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        flag.set()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress(quiet: bool, label: str) -> Progress:
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=quiet, transient=False)


def run_stage(stage: Stage, items: list[dict], fingerprint: list, inputs: list[str], root: Path,
              workers: int = 1, quiet: bool = False, executor: str = "local",
              ray_address: str | None = None) -> RunResult:
    """Run `stage` over `items` (dicts with a unique "id") and write its manifest.

    `fingerprint` identifies the inputs' content (with the parameters it makes the run id);
    `inputs` is what the catalog records as lineage (paths of input manifests or media roots).
    """
    t0 = time.monotonic()
    run_id = run_id_for(stage, fingerprint)
    out = root / "manifests" / f"{run_id}.parquet"
    if out.is_file():  # the same run finished before: nothing to do
        table, _ = read_manifest(out)
        counts = Counter(table.column("status").to_pylist())
        return RunResult(run_id, out, dict(counts), table.num_rows, 0.0, cached=True)

    params = stage.params()
    catalog.record_start(root, run_id, stage.name, stage.kind, params, code_version(), inputs, str(out))
    run_dir = root / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    done, n_parts = _read_parts(run_dir, stage.kind)
    reused = sum(len(v) for v in done.values())
    pending = [it for it in items if it["id"] not in done]
    batch: list[tuple[str, list[dict]]] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal batch, n_parts, last_flush
        if batch:
            _write_part(run_dir, n_parts, batch, stage.kind)
            n_parts += 1
            batch = []
        last_flush = time.monotonic()

    try:
        with _progress(quiet, stage.name) as bar, _sigint_seen() as seen:
            task = bar.add_task(stage.name, total=len(items), completed=len(items) - len(pending))
            for item_id, rows in execute(stage, pending, workers, executor, ray_address):
                if seen():
                    raise KeyboardInterrupt
                done[item_id] = rows
                batch.append((item_id, rows))
                bar.advance(task)
                if len(batch) >= FLUSH_ROWS or time.monotonic() - last_flush > FLUSH_SECONDS:
                    flush()
            flush()
    except KeyboardInterrupt:
        flush()
        catalog.record_end(root, run_id, "interrupted", dict(Counter(r["status"] for rs in done.values() for r in rs)),
                           reused, time.monotonic() - t0)
        raise
    except BaseException:
        flush()
        catalog.record_end(root, run_id, "failed", {}, reused, time.monotonic() - t0)
        raise

    rows = [r for it in items for r in done[it["id"]]]
    rows = stage.finalize(rows)
    seen: set[str] = set()
    unique = []
    for r in rows:
        if r["id"] not in seen:
            seen.add(r["id"])
            r["run_id"] = run_id
            unique.append(r)
    meta = {"kind": stage.kind, "stage": stage.name, "run_id": run_id, "params": params, "inputs": inputs}
    write_table(to_table(unique, stage.kind), out, json.loads(json.dumps(meta, default=str)))
    counts = dict(Counter(r["status"] for r in unique))
    seconds = time.monotonic() - t0
    catalog.record_end(root, run_id, "done", counts, reused, seconds)
    shutil.rmtree(run_dir, ignore_errors=True)
    return RunResult(run_id, out, counts, reused, seconds)


