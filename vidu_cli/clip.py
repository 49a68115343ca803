from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from manifests.io import ManifestError, file_digest, ok_rows, read_manifest, workspace
from manifests.pipe import input_manifests
from stages.clip import DETECTORS, Clip
from stages.runner import run_stage
from vidu_cli.options import From, Quiet, Strict, Workdir, Workers
from vidu_cli.report import clean_errors, finish


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
        root = workspace(workdir)
        paths = input_manifests(from_)
        items, fp = [], []
        for p in paths:
            table, meta = read_manifest(p)
            if meta["kind"] != "videos":
                raise ManifestError(f"{p} is a '{meta['kind']}' manifest; clip reads a 'videos' manifest")
            items += [{"id": r["id"], "path": r["path"]} for r in ok_rows(table)]
            fp.append(file_digest(p))
        stage = Clip(detector=detector, threshold=threshold, max_len=max_len, min_len=min_len, cut_margin=cut_margin,
                     vad_threshold=vad_threshold, materialize=str(materialize.resolve()) if materialize else None)
        result = run_stage(stage, items, fp, [str(Path(p).resolve()) for p in paths], root, workers=workers, quiet=quiet)
        finish(result, quiet, strict)
