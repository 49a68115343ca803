"""`vidu clip`: split kept videos into single-shot clips, never cutting inside speech (stages/clip.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from stages.clip import Clip
from vidu_cli.chain import run_chain
from vidu_cli.options import Executor, From, Quiet, RayAddress, Strict, Workdir, Workers, option
from vidu_cli.report import clean_errors


def clip(
    from_: From = None,
    detector: str = option(Clip, "detector", "Shot detector."),
    threshold: Optional[float] = option(Clip, "threshold", "The detector's threshold (default: its own).", show_default=False),
    max_len: float = option(Clip, "max_len", "Longest clip (s); longer shots are split in silence."),
    min_len: float = option(Clip, "min_len", "Shortest clip kept (s), below --max-len; shorter pieces are rejected."),
    cut_margin: float = option(Clip, "cut_margin", "Silence kept between a cut and speech (s)."),
    vad_threshold: float = option(Clip, "vad_threshold", "silero-vad speech probability threshold."),
    materialize: Optional[Path] = option(Clip, "materialize", "Write the clips as .mp4 files into this folder.", show_default=False),
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
        stage = Clip(detector=detector, threshold=threshold, max_len=max_len, min_len=min_len, cut_margin=cut_margin,
                     vad_threshold=vad_threshold, materialize=str(materialize.resolve()) if materialize else None)
        run_chain(stage, from_, workdir, workers, quiet, strict, executor, ray_address, accepts=("videos",))
