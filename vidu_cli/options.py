"""Options shared by several commands, as reusable Annotated aliases, and `option`: the option of one
field of a stage's dataclass (or settings object), whose default, range and choices are the ones
declared on the field, so no command retypes them.

    max_len: float = option(Clip, "max_len", "Longest clip (s).")   # default 60.0, range from the field

A field declares its range and choices in its metadata (stages.run.ranged): "min" / "max" (inclusive,
typer's own range check), "gt" (an exclusive lower bound, which typer lacks: a callback whose `gt`
attribute declares it), "choices" (a tuple of strings). They are checked while the command line is
parsed, before any work starts; a violation is one line on stderr and exit 2 (report.OneLineErrors).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

_FIELD = object()  # option(): take the default from the field


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field `name` of `cls`, without constructing `cls`."""
    f = _field(cls, name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def option(cls: type, name: str, help: str, *decls: str, default: Any = _FIELD, **extra: Any) -> Any:
    """A typer option for field `name` of the dataclass `cls`: the field's default (or `default`, the
    same value written for the command line, e.g. a tuple joined by commas), range and choices."""
    return typer.Option(field_default(cls, name) if default is _FIELD else default, *decls,
                        **_checks(cls, name, help), **extra)


def parse_size(text: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (width, height); a BadParameter (one line) otherwise."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise typer.BadParameter(f"{text!r} is not WIDTHxHEIGHT, e.g. 256x256")
    return int(w), int(h)


def _checks(cls: type, name: str, help: str) -> dict:
    """help, min, max and callback of field `name`'s declared range and choices."""
    meta, extra = _field(cls, name).metadata, {}
    if "gt" in meta:
        help = f"{help} Must be > {meta['gt']:g}."
        extra["callback"] = _above(meta["gt"])
    if "choices" in meta:
        help = f"{help} One of: {' | '.join(meta['choices'])}."
        extra["callback"] = _one_of(meta["choices"], name.replace("_", " "))
    return {"help": help, "min": meta.get("min"), "max": meta.get("max"), **extra}


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def _above(bound: float) -> Callable[[Optional[float]], Optional[float]]:
    def check(value: Optional[float]) -> Optional[float]:
        if value is not None and not value > bound:
            raise typer.BadParameter(f"{value:g} is not greater than {bound:g}")
        return value
    check.gt = bound  # the declared bound, for whoever reads the option (tests/test_cli_options.py)
    return check


def _one_of(choices: tuple[str, ...], what: str) -> Callable[[Optional[str]], Optional[str]]:
    def check(value: Optional[str]) -> Optional[str]:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
        return value
    return check


Workdir = Annotated[Optional[Path], typer.Option("--workdir", help="Workspace folder (default: $VIDU_HOME or ./vidu-work).", show_default=False)]
Workers = Annotated[int, typer.Option("--workers", "-w", min=1, help="Local worker processes.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]
Strict = Annotated[bool, typer.Option("--strict", help="Exit 1 when any row is rejected or failed.")]
From = Annotated[Optional[list[Path]], typer.Option("--from", help="Input manifest (repeatable); default: paths read from stdin.", show_default=False)]
Format = Annotated[Optional[str], typer.Option("--format", "-f", help="table | jsonl | csv (default: table on a terminal, jsonl otherwise).", callback=_one_of(("table", "jsonl", "csv"), "format"))]
Executor = Annotated[str, typer.Option("--executor", help="local (processes on this machine) | ray (a Ray cluster).", callback=_one_of(("local", "ray"), "executor"))]
# the model's fast path (stages.stream.session.fast_path), for `vidu stream`, `vidu serve` and `vidu eval --bench`
Kernels = Annotated[Optional[bool], typer.Option("--kernels/--no-kernels", help="The fused Triton kernels (adaLN, residuals, q/k norm + RoPE, the cache's key rotation); the same numbers as without, up to rounding (default: on a GPU).", show_default=False)]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance).", show_default=False)]

# Stream settings shared by `vidu stream` and `vidu eval --bench`: `from vidu_cli.options import Sampler`.
# Built on first use (PEP 562 module __getattr__): their ranges live on StreamSettings, whose module
# imports torch, which commands that do not stream should not pay for.
_STREAM_OPTIONS = {
    "Sampler": ("sampler", Optional[str], "--sampler", "Denoising sampler: renoise (predict x0 and renoise: the distilled "
                "student) or euler (the flow ODE: the teachers) (default: the checkpoint's, else renoise)."),
    "Guidance": ("guidance", Optional[float], "--guidance", "Classifier-free guidance scale, 1 = off (the unconditional "
                 "pass nulls text and speech, keeps the reference) (default: the checkpoint's, else 1)."),
    "Guide": ("guide", Optional[str], "--guide", "What guidance's unconditional pass nulls: all (text and "
              "speech) or text (the instruction alone, the speech kept) (default: the checkpoint's, else all)."),
    "Recache": ("recache", Optional[bool], "--recache/--no-recache", "On an instruction switch, recompute the "
                "history's keys/values under the new text (LongLive's recache) (default: off)."),
}


def __getattr__(name: str) -> Any:
    if name == "Attention":                      # the backends' names live with the model (torch)
        from models.dit import SELF_ATTENTION
        alias = Annotated[str, typer.Option("--attention", help="Self-attention: sdpa (exact), int8 (INT8 Q.K^T) or "
                                            "sparse (block-sparse); the last two approximate it.",
                                            callback=_one_of(tuple(SELF_ATTENTION), "attention"))]
        globals()[name] = alias
        return alias
    if name not in _STREAM_OPTIONS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from stages.stream.engine import StreamSettings
    field, typ, decl, help = _STREAM_OPTIONS[name]
    alias = Annotated[typ, typer.Option(decl, show_default=False, **_checks(StreamSettings, field, help))]
    globals()[name] = alias
    return alias
