from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from models.hf import check_model
from stages.caption import Caption
from vidu_cli.chain import run_chain
from vidu_cli.options import Executor, From, Quiet, RayAddress, Strict, Workdir, Workers
from vidu_cli.report import clean_errors


def caption(
    from_: From = None,
    vlm: Annotated[Optional[Path], typer.Option(help="Local vision-language model folder (e.g. Qwen2.5-VL) for the visual fields; without it they stay null.", show_default=False)] = None,
    asr: Annotated[Optional[Path], typer.Option(help="Local Whisper-family folder: transcribe each speech chunk.", show_default=False)] = None,
    frames: Annotated[int, typer.Option(min=1, help="Frames sampled per clip for the lighting measures.")] = 8,
    vlm_frames: Annotated[int, typer.Option(min=1, help="Of those, frames shown to the VLM.")] = 4,
    min_gap: Annotated[float, typer.Option(help="Shortest silence between speech that gets its own chunk (s).")] = 0.5,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest VLM answer (tokens); ASR chunks get at most 128.")] = 256,
    workers: Workers = 1,
    workdir: Workdir = None,
    quiet: Quiet = False,
    strict: Strict = False,
    executor: Executor = "local",
    ray_address: RayAddress = None,
) -> None:
    """Caption clips from measurements (and optional local models): a typed clip caption plus one
    caption per diarized speech turn.

    Example: vidu clip ... | vidu filter | vidu diarize | vidu caption --asr models/whisper-small
    """
    with clean_errors():
        stage = Caption(vlm=str(check_model(vlm, "--vlm")) if vlm else None, asr=str(check_model(asr, "--asr")) if asr else None,
                        frames=frames, vlm_frames=min(vlm_frames, frames), min_gap=min_gap, max_new_tokens=max_new_tokens)
        run_chain(stage, from_, workdir, workers, quiet, strict, executor, ray_address)
