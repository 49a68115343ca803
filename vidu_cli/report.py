"""How a stage command ends: summary on stderr, manifest path on stdout, exit code."""
from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from manifests.catalog import CatalogError
from manifests.io import ManifestError, read_manifest, show_path, show_text
from manifests.pipe import emit
from stages.run import RunResult

err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {escape(show_text(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class OneLineErrors(TyperGroup):
    """The app's command group: a usage error (unknown option, a value out of its declared range or
    choices) is one line on stderr and exit 2, like every other failure, instead of typer's usage
    text and boxed panel."""

    def make_context(self, *args, **kwargs):
        with _usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _usage_errors():
            return super().invoke(ctx)


@contextmanager
def _usage_errors():
    try:
        yield
    except typer.TyperException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # the help is already printed
            raise
        fail((e.format_message().strip().splitlines() or [type(e).__name__])[0], getattr(e, "exit_code", 2))


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@contextmanager
def clean_errors():
    """Turn failures into one line on stderr and exit 2, and Ctrl-C into a resumable stop. An
    unexpected exception is one line too (VIDU_DEBUG=1 shows its traceback); a stage run that
    raised is already recorded as failed in the catalog by the runner."""
    try:
        yield
    except (typer.Exit, typer.TyperException, typer.Abort):  # typer's own (it vendors click: not click's)
        raise
    except (ManifestError, CatalogError, ValueError, FileNotFoundError) as e:
        fail(_first_line(e))
    except KeyboardInterrupt as e:
        err.print("interrupted: finished rows are saved; run the same command again to resume")
        raise typer.Exit(getattr(e, "exit_code", 130))  # 143 for SIGTERM (stages.run.runner.Terminated)
    except OSError as e:
        where = f": {show_path(e.filename)}" if e.filename else ""
        fail(f"{e.strerror or _first_line(e)}{where}")
    except Exception as e:
        if os.environ.get("VIDU_DEBUG"):
            raise
        fail(f"unexpected {type(e).__name__}: {_first_line(e)} (a bug; VIDU_DEBUG=1 shows the traceback)")


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
