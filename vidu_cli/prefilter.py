from __future__ import annotations

from typing import Annotated

import typer

from manifests.io import workspace
from stages.prefilter import Prefilter, discover, fingerprint
from stages.run import run_stage
from vidu_cli.options import Executor, RayAddress, Quiet, Strict, Workdir, Workers
from vidu_cli.report import clean_errors, fail, finish


def prefilter(
    paths: Annotated[list[str], typer.Argument(help="Files, folders (recursive) or globs.")],
    min_fps: Annotated[float, typer.Option(help="Lowest average frame rate kept.")] = 15.0,
    min_short_side: Annotated[int, typer.Option(help="Lowest shorter side (pixels, after rotation).")] = 256,
    min_duration: Annotated[float, typer.Option(help="Shortest video kept (s).")] = 3.0,
    max_duration: Annotated[float, typer.Option(help="Longest video kept (s).")] = 4 * 3600.0,
    require_audio: Annotated[bool, typer.Option(help="Reject videos without an audio stream.")] = True,
    max_av_mismatch: Annotated[float, typer.Option(help="Largest audio/video duration or start difference (s).")] = 0.5,
    reject_vfr: Annotated[bool, typer.Option(help="Reject variable-frame-rate videos (always flagged).")] = False,
    phash_threshold: Annotated[int, typer.Option(help="Near-duplicate: mean differing hash bits (of 64) per frame.")] = 10,
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
        root = workspace(workdir)
        items = discover(paths, exclude=root)
        if not items:
            fail("no files found under the given paths")
        stage = Prefilter(min_fps=min_fps, min_short_side=min_short_side, min_duration=min_duration,
                          max_duration=max_duration, require_audio=require_audio, max_av_mismatch=max_av_mismatch,
                          reject_vfr=reject_vfr, phash_threshold=phash_threshold)
        result = run_stage(stage, items, fingerprint(items), sorted(paths), root, workers=workers,
                           quiet=quiet, executor=executor, ray_address=ray_address)
        finish(result, quiet, strict)
