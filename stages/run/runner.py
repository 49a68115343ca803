"""The stage runner: maps a stage over input rows and writes one manifest per run.

A stage is a dataclass of parameters (see `Stage`). The runner gives every stage:
- `workers` local processes (spawned; each calls `setup()` once) or in-process execution;
- resumability: finished rows are flushed every few seconds to atomic part files under
  runs/<run_id>/; re-running the same stage on the same inputs and parameters (same run id)
  reuses them, so a Ctrl-C or SIGKILL loses at most the last few seconds of work and the final
  manifest equals an uninterrupted run's (rows ordered by input, de-duplicated by id);
- per-row error capture: an exception (or a worker that dies) becomes a status=error row;
- a rich progress bar on stderr, and a row in the catalog with lineage and counts;
- faults of the run itself: a run that raises is recorded as failed (never left "running"); a part
  file or manifest that cannot be read is set aside under <workspace>/corrupt/ and its rows are
  recomputed, never trusted.

The executor seam is `execute`: it takes pending items and yields (item_id, rows) pairs, from
local processes (stages/run/local.py) or Ray actors (stages/run/ray.py).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from manifests import catalog
from manifests.io import (ManifestError, check_writable, os_fault, read_manifest, read_meta, rows as table_rows,
                          set_aside, show_path, to_table, write_table)
from manifests.schemas import SCHEMAS
from stages.run.contract import RunResult, Stage, check_columns
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

def _read_part(part: Path, kind: str) -> dict[str, list[dict]]:
    """{item id: rows} of one part file; ValueError when it is damaged or not of this stage."""
    try:
        meta = read_meta(part)
        table = pq.read_table(part)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not table.schema.equals(SCHEMAS[kind], check_metadata=False):
        raise ValueError(f"columns do not match the pinned '{kind}' schema")
    items = meta.get("items")
    try:
        ok = sum(int(count) for _, count in items) == table.num_rows
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError("its item list does not match its rows")
    rows = table_rows(table)
    out = {}
    for item_id, count in items:
        out[item_id], rows = rows[:count], rows[count:]
    return out


def _read_parts(run_dir: Path, kind: str, root: Path, say) -> tuple[dict[str, list[dict]], int]:
    """Rows of finished items from earlier attempts: {item id: rows}, and the next part index. A
    damaged part is set aside (its items are recomputed)."""
    done: dict[str, list[dict]] = {}
    next_index = 0
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)  # a write that was killed before its rename
    for part in sorted(run_dir.glob("part-*.parquet")):
        try:
            next_index = max(next_index, int(part.stem.split("-")[1]) + 1)
        except (IndexError, ValueError):
            pass
        try:
            done.update(_read_part(part, kind))
        except ValueError as e:
            dest = set_aside(part, root)
            say(f"warning: resume point {show_path(part)} is damaged ({e}); moved to {show_path(dest)}, "
                f"its rows are computed again")
    return done, next_index


def _write_part(run_dir: Path, index: int, batch: list[tuple[str, list[dict]]], kind: str) -> None:
    rows = [r for _, rs in batch for r in rs]
    write_table(to_table(rows, kind), run_dir / f"part-{index:06d}.parquet",
                {"items": [[item_id, len(rs)] for item_id, rs in batch]})


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, systemd, kill): the run stops as on Ctrl-C, its rows saved and the run
    recorded as interrupted; the command exits 143."""
    exit_code = 143


@contextmanager
def _sigint_seen():
    """Remember a Ctrl-C (or SIGTERM) even where a C extension swallows the KeyboardInterrupt (PyAV's
    av.open does), so the run loop can stop after the current item. Yields a function giving the
    last signal received (0: none)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    got: list[int] = []  # signals received
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        before = previous[signum]
        if before == signal.SIG_IGN and signum == signal.SIGTERM:
            return
        got.append(signum)
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield lambda: got[-1] if got else 0
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def _progress(quiet: bool, label: str) -> Progress:
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=quiet, transient=False)


def _warn(quiet: bool):
    console = Console(stderr=True)
    return (lambda message: None) if quiet else (lambda message: console.print(message, highlight=False,
                                                                                 markup=False, soft_wrap=True))


def _finished(run_id: str, out: Path, root: Path, say) -> RunResult | None:
    """The result of an earlier finished run with this id, or None (a damaged manifest is set aside)."""
    if not out.is_file():
        return None
    try:
        table, _ = read_manifest(out)
    except ManifestError as e:
        dest = set_aside(out, root)
        say(f"warning: {e}; moved to {show_path(dest)}, the run is done again")
        return None
    counts = Counter(table.column("status").to_pylist())
    return RunResult(run_id, out, dict(counts), table.num_rows, 0.0, cached=True)


@dataclass
class _Attempt:
    """What one attempt of a run has so far: rows of finished items (reused or new)."""
    done: dict[str, list[dict]] = field(default_factory=dict)
    reused: int = 0

    def counts(self) -> dict[str, int]:
        return dict(Counter(r["status"] for rs in self.done.values() for r in rs))


def run_stage(stage: Stage, items: list[dict], fingerprint: list, inputs: list[str], root: Path,
              workers: int = 1, quiet: bool = False, executor: str = "local",
              ray_address: str | None = None) -> RunResult:
    """Run `stage` over `items` (dicts with a unique "id") and write its manifest.

    `fingerprint` identifies the inputs' content (with the parameters it makes the run id);
    `inputs` is what the catalog records as lineage (paths of input manifests or media roots).
    Any exception once the run is recorded (disk full, a stage's setup failing, ...) marks it failed
    in the catalog and is raised; Ctrl-C marks it interrupted.
    """
    t0 = time.monotonic()
    say = _warn(quiet)
    check_columns(stage, items)
    run_id = run_id_for(stage, fingerprint)
    out = root / "manifests" / f"{run_id}.parquet"
    cached = _finished(run_id, out, root, say)
    if cached is not None:  # the same run finished before: nothing to do
        return cached

    check_writable(root)
    params = stage.params()
    catalog.record_start(root, run_id, stage.name, stage.kind, params, code_version(), inputs, str(out))
    attempt = _Attempt()

    def end(state: str) -> None:
        # a second fault here (the catalog itself unwritable) must not hide the first one
        try:
            catalog.record_end(root, run_id, state, attempt.counts(), attempt.reused, time.monotonic() - t0)
        except Exception as e:
            say(f"warning: could not record run {run_id} as {state} in the catalog: {e}")

    try:
        result = _run(stage, items, inputs, root, run_id, out, params, workers, quiet, executor, ray_address,
                      attempt, say, t0)
        catalog.record_end(root, run_id, "done", result.counts, result.reused, result.seconds)
    except KeyboardInterrupt:
        end("interrupted")
        raise
    except BaseException:
        end("failed")
        raise
    shutil.rmtree(root / "runs" / run_id, ignore_errors=True)
    return result


def _run(stage: Stage, items: list[dict], inputs: list[str], root: Path, run_id: str, out: Path, params: dict,
         workers: int, quiet: bool, executor: str, ray_address: str | None, attempt: _Attempt, say,
         t0: float) -> RunResult:
    """The body of `run_stage` once the run is recorded: resume, execute, write the manifest."""
    run_dir = root / "runs" / run_id
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_fault(e, run_dir) from None
    done, n_parts = _read_parts(run_dir, stage.kind, root, say)
    attempt.done = done
    attempt.reused = reused = sum(len(v) for v in done.values())
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

    signalled = lambda: 0  # noqa: E731
    try:
        with _progress(quiet, stage.name) as bar, _sigint_seen() as signalled:
            task = bar.add_task(stage.name, total=len(items), completed=len(items) - len(pending))
            for item_id, rows in execute(stage, pending, workers, executor, ray_address):
                if signalled():
                    raise KeyboardInterrupt
                done[item_id] = rows
                batch.append((item_id, rows))
                bar.advance(task)
                if len(batch) >= FLUSH_ROWS or time.monotonic() - last_flush > FLUSH_SECONDS:
                    flush()
            flush()
    except BaseException as e:
        try:  # keep what finished; when this write fails too (disk full) those items are simply redone
            flush()
        except Exception:
            pass
        if isinstance(e, KeyboardInterrupt) and signalled() == signal.SIGTERM and not isinstance(e, Terminated):
            raise Terminated from None  # (a C extension or a worker turned it into a plain KeyboardInterrupt)
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
    return RunResult(run_id, out, counts, reused, time.monotonic() - t0)


