"""The stage contract: what every stage is, and how one item becomes rows.

A stage is a dataclass of parameters (fields make the run id) with `setup()` (load models once per
worker) and `process(item) -> rows`. `safe_process` is the one place where an exception on an item
becomes a status=error row; `crash_rows` is the row for an item whose worker died. Every executor
(local processes, Ray actors) calls these, so the same stage code gives the same rows everywhere.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from manifests.schemas import SCHEMAS, empty_row


@dataclass
class Stage:
    """Base of every stage: parameters are dataclass fields (they make the run id)."""

    name: ClassVar[str]  # e.g. "prefilter"; also the SQL view name
    kind: ClassVar[str]  # output manifest kind, a key of manifests.schemas.SCHEMAS
    version: ClassVar[str]  # bump when the same inputs and parameters would give other rows
    reads: ClassVar[tuple[str, ...]]  # input columns the stage needs: the runner refuses items without them
    writes: ClassVar[tuple[str, ...]]  # columns the stage adds: must be columns of its output kind

    def setup(self) -> None:
        """Load models once per worker."""

    def process(self, item: dict) -> list[dict]:
        raise NotImplementedError

    def error_row(self, item: dict, message: str) -> dict:
        """The row recorded when `process(item)` raised."""
        raise NotImplementedError

    def finalize(self, rows: list[dict]) -> list[dict]:
        """A whole-run step after all items (e.g. de-duplication); must be deterministic."""
        return rows

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("param", True)}


def not_param(default) -> dataclasses.Field:
    """A stage field that does not change results (e.g. a progress flag): left out of the run id."""
    return field(default=default, metadata={"param": False})


def ranged(default, *, min=None, max=None, gt=None, choices: tuple[str, ...] | None = None) -> dataclasses.Field:
    """A parameter with the values it may take: `min` / `max` (inclusive), `gt` (exclusive lower bound)
    or `choices`. The command line checks them before any work starts (vidu_cli.options.option)."""
    bounds = {"min": min, "max": max, "gt": gt, "choices": choices}
    return field(default=default, metadata={k: v for k, v in bounds.items() if v is not None})


@dataclass
class RunResult:
    run_id: str
    path: Path
    counts: dict[str, int]
    reused: int
    seconds: float
    cached: bool = False


def safe_process(stage: Stage, item: dict) -> list[dict]:
    try:
        out = stage.process(item)
        return out if isinstance(out, list) else [out]
    except Exception as e:  # recorded on the row, never raised through the run
        av = sys.modules.get("av")  # PyAV reports a Ctrl-C that arrived inside FFmpeg as ExitError
        if av is not None and isinstance(e, av.error.ExitError):
            raise KeyboardInterrupt from None
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        row = stage.error_row(item, msg)
        row.update(status="error", error=msg)
        row["reasons"] = list(row.get("reasons") or []) + ["exception"]
        return [row]


def crash_rows(stage: Stage, item: dict) -> list[dict]:
    row = stage.error_row(item, "worker process died")
    row.update(status="error", error="worker process died while processing this item")
    row["reasons"] = list(row.get("reasons") or []) + ["worker_crashed"]
    return [row]


def base_row(kind: str, **values) -> dict:
    row = empty_row(SCHEMAS[kind])
    row.update(status="ok", run_id="")
    row.update(values)
    return row


def check_columns(stage: Stage, items: list[dict]) -> None:
    """Refuse, before any work, a stage whose declared columns do not fit its output schema, or
    input items that lack a column the stage reads (one line naming the columns)."""
    names = set(SCHEMAS[stage.kind].names)
    undeclared = [c for c in stage.writes if c not in names]
    if undeclared:
        raise ValueError(f"stage {stage.name} writes {', '.join(undeclared)}, not in the {stage.kind} schema")
    missing = sorted({c for it in items for c in stage.reads if c not in it})
    if missing:
        raise ValueError(f"{stage.name} needs input column(s) {', '.join(missing)}; the input has none "
                         f"(give it the manifest of the stage before it)")
