"""`vidu model ...`: inspect model files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from vidu_cli.report import clean_errors

model = typer.Typer(help="Inspect model checkpoints.\n\nExample: vidu model info causal.safetensors --preset small",
                    no_args_is_help=True)


@model.command()
def info(ckpt: Annotated[Path, typer.Argument(help="checkpoint file (.safetensors, .index.json, .pt, .pth) or folder")],
         preset: Annotated[Optional[str], typer.Option(help="also check the file fits this preset")] = None,
         json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False) -> None:
    """Print a checkpoint's format, architecture, parameter count, conditioning branches and lineage.

    Example: vidu model info causal.safetensors --preset small
    """
    with clean_errors():
        from models.info import describe
        d = describe(ckpt, preset)
    if json_out:
        print(json.dumps(d, indent=1))
        return
    t = Table(title=str(ckpt), title_justify="left", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for key in ("format", "kind", "parameters", "tensors", "dtypes", "config_source", "fits_preset"):
        if key in d:
            value = f"{d[key]:,}" if isinstance(d[key], int) else d[key]
            t.add_row(key, str(value))
    for section in ("model", "architecture", "conditioning"):
        for k, v in d.get(section, {}).items():
            t.add_row(f"{section}.{k}", str(v))
    for i, step in enumerate(d["lineage"]):
        t.add_row(f"lineage[{i}]", ", ".join(f"{k}={v}" for k, v in step.items()))
    if not d["lineage"]:
        t.add_row("lineage", "none recorded")
    Console(width=120).print(t)
