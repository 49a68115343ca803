from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.clip import DETECTORS, Clip
from vidu_cli.chain import run_chain
from vidu_cli.options import Executor, From, Quiet, RayAddress, Strict, Workdir, Workers
from vidu_cli.report import clean_errors


def clip(
    from_: From = None,
    detector: Annotated[str, typer.Option(help=f"Shot detector: {' | '.join(DETECTORS)}.")] = "adaptive",
    threshold: Annotated[Optional[float], typer.Option(help="The detector's threshold (default: its own).")] = None,
    max_len: Annotated[float, typer.Option(help="Longest clip (s); longer shots are split in silence.")] = 60.0,
    min_len: Annotated[float, typer.Option(help="Shortest clip kept (s); shorter pieces are rejected.")] = 3.0,
    cut_margin: Annotated[float, typer.Option(help="Silence kept between a cut and speech (s).")] = 0.1,
    vad_threshold: Annotated[float, typer.Option(help="silero-vad speech probability threshold.")] = 0.5,
    materialize: Annotated[Optional[Path], typer.Option(help="Write the clips as .mp4 files into this folder.")] = None,
    workers: Workers = 1,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    workdir: Workdir = None,
    quiet: Quiet = False,
    strict: Strict = False,
) -> None:
    """Split kept videos into single-shot clips, never cutting inside speech.

    Example: vidu prefilter raw/ | vidu clip --max-len 30 --materialize clips/
    """
    with clean_errors():
        if detector not in DETECTORS:
            raise ValueError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
        stage = Clip(detector=detector, threshold=threshold, max_len=max_len, min_len=min_len, cut_margin=cut_margin,
                     vad_threshold=vad_threshold, materialize=str(materialize.resolve()) if materialize else None)
        run_chain(stage, from_, workdir, workers, quiet, strict, executor, ray_address, accepts=("videos",))
