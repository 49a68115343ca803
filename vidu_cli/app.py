"""The `vidu` application: one typer command per module of this package.

Run: vidu --help, or python -m vidu_cli --help.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Annotated

import typer

from vidu_cli.report import OneLineErrors

# name -> "module:attribute" (a function becomes a command, a Typer app a command group), in help order.
# Commands load on first use, so `vidu runs` does not pay for torch and the media stack.
COMMANDS = {
    "prefilter": "vidu_cli.prefilter:prefilter", "clip": "vidu_cli.clip:clip", "filter": "vidu_cli.filter:filter",
    "diarize": "vidu_cli.diarize:diarize", "caption": "vidu_cli.caption:caption", "embed": "vidu_cli.embed:embed",
    "synth": "vidu_cli.synth:synth", "train": "vidu_cli.train:train",
    "distill": "vidu_cli.distill:distill", "stream": "vidu_cli.stream:stream", "serve": "vidu_cli.serve:serve",
    "eval": "vidu_cli.eval:eval", "model": "vidu_cli.model:model", "runs": "vidu_cli.runs:runs",
    "show": "vidu_cli.show:show", "sql": "vidu_cli.sql:sql", "demo": "vidu_cli.demo:demo",
}


class LazyCommands(OneLineErrors):
    """The root group: lists COMMANDS and imports a command's module only when it is used."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, name: str):
        if name not in self.commands and name in COMMANDS:
            module, attr = COMMANDS[name].split(":")
            obj = getattr(importlib.import_module(module), attr)
            if isinstance(obj, typer.Typer):
                cmd = typer.main.get_group(obj)
            else:
                single = typer.Typer(add_completion=False)
                single.command(name=name)(obj)
                cmd = typer.main.get_command(single)
            cmd.name = name
            self.commands[name] = cmd
        return self.commands.get(name)


app = typer.Typer(cls=LazyCommands, help="vidu: curate, train, distill, stream and evaluate real-time avatar video models.\n\n"
                  "Example: vidu prefilter raw/ | vidu clip | vidu filter | vidu diarize | vidu caption | vidu embed",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


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
