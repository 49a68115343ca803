"""Options shared by several commands, as reusable Annotated aliases."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Workdir = Annotated[Optional[Path], typer.Option("--workdir", help="Workspace folder (default: $VIDU_HOME or ./vidu-work).", show_default=False)]
Workers = Annotated[int, typer.Option("--workers", "-w", min=1, help="Local worker processes.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]
Strict = Annotated[bool, typer.Option("--strict", help="Exit 1 when any row is rejected or failed.")]
From = Annotated[Optional[list[Path]], typer.Option("--from", help="Input manifest (repeatable); default: paths read from stdin.", show_default=False)]
Format = Annotated[str, typer.Option("--format", "-f", help="table | jsonl | csv (default: table on a terminal, jsonl otherwise).")]
Executor = Annotated[str, typer.Option("--executor", help="local (processes on this machine) | ray (a Ray cluster).")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance).", show_default=False)]
