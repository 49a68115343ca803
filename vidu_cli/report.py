"""How a stage command ends: summary on stderr, manifest path on stdout, exit code."""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.table import Table

from manifests.catalog import CatalogError
from manifests.io import ManifestError, read_manifest
from manifests.pipe import emit
from stages.run import RunResult

err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def clean_errors():
    """Turn expected failures into one-line errors and Ctrl-C into a resumable stop."""
    try:
        yield
    except (ManifestError, CatalogError, ValueError, FileNotFoundError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        err.print("interrupted: finished rows are saved; run the same command again to resume")
        raise typer.Exit(130)


def finish(result: RunResult, quiet: bool, strict: bool) -> None:
    if not quiet:
        table, _ = read_manifest(result.path)
        reasons = Counter(r for rs in table.column("reasons").to_pylist() for r in rs)
        t = Table(title=f"{result.run_id}{' (already finished: reused)' if result.cached else ''}", title_justify="left")
        for col in ("ok", "rejected", "error", "reused", "seconds"):
            t.add_column(col, justify="right")
        t.add_row(*(str(result.counts.get(k, 0)) for k in ("ok", "rejected", "error")), str(result.reused),
                  f"{result.seconds:.1f}")
        err.print(t)
        if reasons:
            err.print("reasons: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()), highlight=False)
    emit(result.path)
    if strict and (result.counts.get("rejected", 0) or result.counts.get("error", 0)):
        raise typer.Exit(1)
