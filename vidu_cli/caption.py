"""`vidu caption`: a typed caption per clip and per diarized speech turn (stages/caption.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from models.hf import check_model
from stages.caption import Caption
from vidu_cli.chain import run_chain
from vidu_cli.options import Executor, From, Quiet, RayAddress, Strict, Workdir, Workers, option
from vidu_cli.report import clean_errors


def caption(
    from_: From = None,
    vlm: Optional[Path] = option(Caption, "vlm", "Local vision-language model folder (e.g. Qwen2.5-VL) for the visual fields; without it they stay null.", show_default=False),
    asr: Optional[Path] = option(Caption, "asr", "Local Whisper-family folder: transcribe each speech chunk.", show_default=False),
    frames: int = option(Caption, "frames", "Frames sampled per clip for the lighting measures."),
    vlm_frames: int = option(Caption, "vlm_frames", "Of those, frames shown to the VLM (at most --frames)."),
    min_gap: float = option(Caption, "min_gap", "Shortest silence between speech that gets its own chunk (s)."),
    max_new_tokens: int = option(Caption, "max_new_tokens", "Longest VLM answer (tokens); ASR chunks get at most 128."),
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
