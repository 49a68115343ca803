"""`vidu prefilter`: probe, validate and de-duplicate media files into a videos manifest (stages/prefilter.py)."""
from __future__ import annotations

from typing import Annotated

import typer

from manifests.io import workspace
from stages.prefilter import Prefilter, discover, fingerprint
from stages.run import run_stage
from vidu_cli.options import Executor, Quiet, RayAddress, Strict, Workdir, Workers, option
from vidu_cli.report import clean_errors, fail, finish


def prefilter(
    paths: Annotated[list[str], typer.Argument(help="Files, folders (recursive) or globs.")],
    min_fps: float = option(Prefilter, "min_fps", "Lowest average frame rate kept."),
    min_short_side: int = option(Prefilter, "min_short_side", "Lowest shorter side (pixels, after rotation)."),
    min_duration: float = option(Prefilter, "min_duration", "Shortest video kept (s), below --max-duration."),
    max_duration: float = option(Prefilter, "max_duration", "Longest video kept (s)."),
    require_audio: bool = option(Prefilter, "require_audio", "Reject videos without an audio stream."),
    max_av_mismatch: float = option(Prefilter, "max_av_mismatch", "Largest audio/video duration or start difference (s)."),
    reject_vfr: bool = option(Prefilter, "reject_vfr", "Reject variable-frame-rate videos (always flagged)."),
    phash_threshold: int = option(Prefilter, "phash_threshold", "Near-duplicate: mean differing hash bits (of 64) per frame."),
    workers: Workers = 1,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    workdir: Workdir = None,
    quiet: Quiet = False,
    strict: Strict = False,
) -> None:
    """Probe, validate and de-duplicate media files into a videos manifest.

    Example: vidu prefilter raw/ 'more/**/*.mp4' --workers 4 | vidu clip
    """
    with clean_errors():
        stage = Prefilter(min_fps=min_fps, min_short_side=min_short_side, min_duration=min_duration,
                          max_duration=max_duration, require_audio=require_audio, max_av_mismatch=max_av_mismatch,
                          reject_vfr=reject_vfr, phash_threshold=phash_threshold)
        root = workspace(workdir)
        items = discover(paths, exclude=root)
        if not items:
            fail("no files found under the given paths")
        result = run_stage(stage, items, fingerprint(items), sorted(paths), root, workers=workers,
                           quiet=quiet, executor=executor, ray_address=ray_address)
        finish(result, quiet, strict)
