from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vidu_cli.options import Executor, From, Quiet, RayAddress, Strict, Workdir, Workers
from vidu_cli.report import clean_errors


def embed(
    from_: From = None,
    preset: Annotated[str, typer.Option(help="Model preset whose geometry the samples take: tiny | small | wan2.1-1.3b.")] = "tiny",
    height: Annotated[Optional[int], typer.Option(help="Override the preset's frame height (multiple of 16).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Override the preset's frame width (multiple of 16).")] = None,
    frames: Annotated[Optional[int], typer.Option(help="Override the frames per sample (1 + 4k).")] = None,
    fps: Annotated[Optional[int], typer.Option(help="Override the model frame rate the clips are resampled to (whole frames per second).")] = None,
    zoom: Annotated[float, typer.Option(help="Crop tighter than the largest window of the model's aspect (>= 1), around the face when the row has face_box.")] = 1.0,
    vae: Annotated[Optional[Path], typer.Option(help="Store Wan2.1 VAE latents (Wan2.1_VAE.pth) instead of frames.")] = None,
    taehv: Annotated[Optional[Path], typer.Option(help="Store TAEHV latents (taew2_1.pth) instead of frames.")] = None,
    text_encoder: Annotated[Optional[str], typer.Option(help="minilm | umt5 (default: the preset's).")] = None,
    text_model: Annotated[Optional[Path], typer.Option("--text-model", "--text-encoder-path", help="Local text encoder directory (needed for umt5).")] = None,
    max_windows: Annotated[int, typer.Option(help="Samples per clip at most (0: every window that fits).")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Shard folder (default: <workspace>/samples/embed-<parameter hash>).")] = None,
    device: Annotated[str, typer.Option(help="Where the encoders run: cpu | cuda.")] = "cpu",
    workers: Workers = 1,
    workdir: Workdir = None,
    quiet: Quiet = False,
    strict: Strict = False,
    executor: Executor = "local",
    ray_address: RayAddress = None,
) -> None:
    """Turn kept clips into training samples: frames or video latents, audio features and caption
    features in safetensors shards, one 'samples' manifest row per sample (vidu train --data reads it).

    Example: vidu caption ... | vidu embed --preset tiny | xargs -I{} vidu train --stage bidirectional --data {} --out runs/bi
    Example: vidu embed --from captioned.parquet --preset wan2.1-1.3b --vae Wan2.1_VAE.pth --text-model umt5-xxl/
    """
    from manifests.io import workspace
    from stages.embed import Embed, default_out
    from vidu_cli.chain import run_chain
    with clean_errors():
        params = dict(preset=preset, height=height, width=width, frames=frames, fps=fps, zoom=zoom,
                      vae=_abs(vae), taehv=_abs(taehv), text_encoder=text_encoder, text_model=_abs(text_model),
                      max_windows=max_windows)
        folder = out.resolve() if out else default_out(workspace(workdir), params)
        stage = Embed(out=str(folder), device=device, **params)
        run_chain(stage, from_, workdir, workers, quiet, strict, executor, ray_address)


def _abs(path: Path | None) -> str | None:
    return str(path.resolve()) if path else None
