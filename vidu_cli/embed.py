"""`vidu embed`: kept clips -> training samples in safetensors shards and a samples manifest (stages/embed.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.embed import Embed
from vidu_cli.options import Executor, From, Quiet, RayAddress, Strict, Workdir, Workers, option
from vidu_cli.report import clean_errors


def embed(
    from_: From = None,
    preset: str = option(Embed, "preset", "Model preset whose geometry the samples take."),
    height: Optional[int] = option(Embed, "height", "Override the preset's frame height (multiple of 16).", show_default=False),
    width: Optional[int] = option(Embed, "width", "Override the preset's frame width (multiple of 16).", show_default=False),
    frames: Optional[int] = option(Embed, "frames", "Override the frames per sample (1 + 4k).", show_default=False),
    fps: Optional[int] = option(Embed, "fps", "Override the model frame rate the clips are resampled to (whole frames per second).", show_default=False),
    zoom: float = option(Embed, "zoom", "Crop tighter than the largest window of the model's aspect, around the face when the row has face_box."),
    vae: Optional[Path] = option(Embed, "vae", "Store Wan2.1 VAE latents (Wan2.1_VAE.pth) instead of frames.", show_default=False),
    taehv: Optional[Path] = option(Embed, "taehv", "Store TAEHV latents (taew2_1.pth) instead of frames.", show_default=False),
    text_encoder: Optional[str] = option(Embed, "text_encoder", "Caption encoder (default: the preset's).", show_default=False),
    text_model: Optional[Path] = option(Embed, "text_model", "Local text encoder directory (needed for umt5).", "--text-model", "--text-encoder-path", show_default=False),
    max_windows: int = option(Embed, "max_windows", "Samples per clip at most (0: every window that fits)."),
    out: Annotated[Optional[Path], typer.Option(help="Shard folder (default: <workspace>/samples/embed-<parameter hash>).", show_default=False)] = None,
    device: str = option(Embed, "device", "Where the encoders run: cpu | cuda."),
    workers: Workers = 1,
    workdir: Workdir = None,
    quiet: Quiet = False,
    strict: Strict = False,
    executor: Executor = "local",
    ray_address: RayAddress = None,
) -> None:
    """Turn kept clips (or vidu synth samples) into training samples: frames or video latents, audio
    features, the clip's caption features and the texts in force per latent frame (speech-chunk
    captions, timed instructions) with their onsets, in safetensors shards, one 'samples' manifest row
    per sample (vidu train --data reads it).

    Example: vidu caption ... | vidu embed --preset tiny | xargs -I{} vidu train --stage bidirectional --data {} --out runs/bi
    Example: vidu embed --from captioned.parquet --preset wan2.1-1.3b --vae Wan2.1_VAE.pth --text-model umt5-xxl/
    Example: vidu synth --n 100 --seconds 8 --out data/synth | vidu embed --preset small
    """
    from manifests.io import workspace
    from manifests.schemas import CHAIN
    from stages.embed import default_out
    from vidu_cli.chain import run_chain
    with clean_errors():
        params = dict(preset=preset, height=height, width=width, frames=frames, fps=fps, zoom=zoom,
                      vae=_abs(vae), taehv=_abs(taehv), text_encoder=text_encoder, text_model=_abs(text_model),
                      max_windows=max_windows)
        folder = out.resolve() if out else default_out(workspace(workdir), params)
        stage = Embed(out=str(folder), device=device, **params)
        run_chain(stage, from_, workdir, workers, quiet, strict, executor, ray_address, accepts=CHAIN + ("synth",))


def _abs(path: Path | None) -> str | None:
    return str(path.resolve()) if path else None
