"""The `vidu` application: one typer command per module of this package.

Run: vidu --help, or python -m vidu_cli --help.
"""
from __future__ import annotations

import importlib.metadata
from typing import Annotated

import typer

from vidu_cli.caption import caption
from vidu_cli.clip import clip
from vidu_cli.demo import demo
from vidu_cli.diarize import diarize
from vidu_cli.embed import embed
from vidu_cli.eval import eval
from vidu_cli.filter import filter
from vidu_cli.model import model
from vidu_cli.prefilter import prefilter
from vidu_cli.report import OneLineErrors
from vidu_cli.runs import runs
from vidu_cli.show import show
from vidu_cli.sql import sql
from vidu_cli.stream import stream
from vidu_cli.synth import synth
from vidu_cli.train import train

app = typer.Typer(cls=OneLineErrors, help="vidu: curate, train, distill, stream and evaluate real-time avatar video models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
for command in (prefilter, clip, runs, show, sql, demo, stream, train, synth, embed, caption, filter, diarize, eval):
    app.command()(command)
app.add_typer(model, name="model")


def _print_version(value: bool) -> None:
    if value:
        try:
            version = importlib.metadata.version("vidu")
        except importlib.metadata.PackageNotFoundError:
            version = "0+unknown (not installed: pip install -e .)"
        typer.echo(f"vidu {version}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    """vidu: curate, train, distill, stream and evaluate real-time avatar video models."""


def main() -> None:
    app()
