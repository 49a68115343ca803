"""`vidu synth`: write a procedural avatar dataset with ground truth (stages/synth/)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from manifests.io import workspace
from stages.synth import Synth, synthesize
from vidu_cli.options import Quiet, Strict, Workdir, Workers, field_default, option, parse_size
from vidu_cli.report import clean_errors, fail, finish


def _check_out(out: Path) -> None:
    """--out must be (or become) a writable folder: checked before any sample is drawn."""
    existing = next(p for p in (out, *out.resolve().parents) if p.exists())
    if not existing.is_dir():
        fail(f"--out {out} is a file, not a folder" if existing == out else f"--out {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--out {out}: {existing} is not writable")


def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder for the .mp4 files and their .json ground truth.")],
    n: int = option(Synth, "n", "Number of samples.", "--n"),
    seed: int = option(Synth, "seed", "Dataset seed; sample i uses a seed derived from (seed, i)."),
    size: str = typer.Option(f"{field_default(Synth, 'width')}x{field_default(Synth, 'height')}",
                             help="Frame size WIDTHxHEIGHT (even sides, at least 64)."),
    fps: int = option(Synth, "fps", "Frame rate."),
    seconds: float = option(Synth, "seconds", "Clip length; frames are 1 + 4k, the nearest to it (at least 5)."),
    style: str = typer.Option("", help="Character style: human, anime or animal (default: a mix of all three)."),
    workers: Workers = 1,
    workdir: Workdir = None,
    quiet: Quiet = False,
    strict: Strict = False,
) -> None:
    """Generate talking avatars (human, anime or animal characters) with known identity, speech,
    visemes, mouth, blinks, head turns and timed instructions: one H.264 + AAC .mp4 and one .json of ground truth per sample, and a
    "synth" manifest.

    Example: vidu synth --n 500 --out data/synth --workers 4 && vidu prefilter 'data/synth/*.mp4'
    """
    with clean_errors():
        width, height = parse_size(size)
        _check_out(out)
        result = synthesize(out, n, workspace(workdir), seed=seed, width=width, height=height, fps=fps,
                            seconds=seconds, workers=workers, quiet=quiet, style=style)
        finish(result, quiet, strict)
