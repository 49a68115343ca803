"""`vidu synth`: write a procedural avatar dataset with ground truth (stages/synth.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from manifests.io import workspace
from stages.synth import synthesize
from vidu_cli.options import Quiet, Strict, Workdir, Workers
from vidu_cli.report import clean_errors, finish


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise typer.BadParameter(f"{text!r} is not WIDTHxHEIGHT, e.g. 256x256")
    return int(w), int(h)


def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder for the .mp4 files and their .json ground truth.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of samples.")] = 100,
    seed: Annotated[int, typer.Option(help="Dataset seed; sample i uses a seed derived from (seed, i).")] = 0,
    size: Annotated[str, typer.Option(help="Frame size WIDTHxHEIGHT (even sides).")] = "256x256",
    fps: Annotated[int, typer.Option(min=1, help="Frame rate.")] = 25,
    seconds: Annotated[float, typer.Option(help="Clip length; frames are 1 + 4k, the nearest to it.")] = 4.0,
    workers: Workers = 1,
    workdir: Workdir = None,
    quiet: Quiet = False,
    strict: Strict = False,
) -> None:
    """Generate talking avatars with known identity, speech, mouth, blinks, head turns and
    instructed actions: one H.264 + AAC .mp4 and one .json of ground truth per sample, and a
    "synth" manifest.

    Example: vidu synth --n 500 --out data/synth --workers 4 && vidu prefilter 'data/synth/*.mp4'
    """
    with clean_errors():
        width, height = _size(size)
        result = synthesize(out, n, workspace(workdir), seed=seed, width=width, height=height, fps=fps,
                            seconds=seconds, workers=workers, quiet=quiet)
        finish(result, quiet, strict)
