from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.serve.options import TOKEN_ENV, ServeOptions
from vidu_cli.options import option
from vidu_cli.report import err, fail


def serve(
    ckpt: Annotated[Optional[Path], typer.Option(help="Causal or distilled checkpoint (default: the starter model shipped with vidu).", show_default=False)] = None,
    preset: Annotated[Optional[str], typer.Option(help="Random weights of this architecture instead of a checkpoint: tiny | small | wan2.1-1.3b.", show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --token.")] = ServeOptions.host,
    port: int = option(ServeOptions, "port", "Port to listen on (0: any free one)."),
    token: Annotated[Optional[str], typer.Option(help=f"Token every API request must carry (Authorization: Bearer TOKEN; the page takes it as #token=...). Default: ${TOKEN_ENV}.", show_default=False)] = None,
    max_sessions: int = option(ServeOptions, "max_sessions", "Sessions at once."),
    speed: float = option(ServeOptions, "speed", "The fraction of real time every admitted session must keep (1: real time; below 1 admits sessions slower than real time, e.g. on a CPU)."),
    gpus: Annotated[int, typer.Option(min=1, max=64, help="GPUs of this machine, one worker each (cuda:0..N-1); a session is pinned to one.")] = 1,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: cuda when available).")] = "auto",
    calib_chunks: int = option(ServeOptions, "calib_chunks", "Chunks per profile timed at start (admission uses the measured times)."),
    decoder_weights: Annotated[Optional[Path], typer.Option(help="TAEHV weights (taew2_1.pth).")] = None,
    text_encoder_path: Annotated[Optional[Path], typer.Option(help="Local umT5 directory (Wan checkpoints).")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Noise seed of the calibration sessions.")] = 0,
) -> None:
    """Serve many live characters over WebRTC: a page to upload a reference image, talk and type
    instructions; sessions admitted only while every admitted one keeps real time (measured).

    Binds 127.0.0.1 by default; another address needs a token. Ctrl-C stops it.

    Example: vidu serve
    Example: vidu serve --ckpt runs/distill/student.safetensors --port 8000 --max-sessions 4
    Example: VIDU_SERVE_TOKEN=s3cret-token vidu serve --host 0.0.0.0 --gpus 2
    Example: vidu serve --preset tiny --device cpu --speed 0.5
    """
    from stages.serve.app import serve as run
    from stages.serve.model import ServeModel
    from stages.serve.options import check_bind
    from stages.stream.serve import check_address
    from stages.stream.session import pick_device
    try:
        opts = ServeOptions.from_env(token, host=host, port=port, max_sessions=max_sessions, speed=speed,
                                     calib_chunks=calib_chunks)
        check_bind(opts)                                      # before any model loads
        check_address(host, port)
        if ckpt is not None and preset is not None:
            raise ValueError("--ckpt and --preset both choose the model: use one of them")
        dev, dtype = pick_device(device)
        devices = [dev] if gpus == 1 else [f"cuda:{i}" for i in range(gpus)]
        if gpus > 1 and not dev.startswith("cuda"):
            raise ValueError("--gpus N takes CUDA GPUs (one worker per GPU); on a CPU there is one worker")
        if ckpt is None and preset is None:
            from models.starter import starter_checkpoint, starter_summary
            ckpt = starter_checkpoint()
            err.print(f"running {starter_summary()}; --ckpt runs another model", highlight=False)
        models = []
        for d in devices:
            m = ServeModel(ckpt, preset or "tiny", d, dtype, seed, decoder_weights, text_encoder_path)
            err.print(f"measuring chunk times on {d} ...", highlight=False)
            m.calibrate(opts.calib_chunks)
            for p in m.profiles:
                err.print(f"  {p.name}: {1000 * p.chunk_s:.0f} ms per {1000 * p.video_s:.0f} ms chunk "
                          f"(load {p.load:.2f})", highlight=False)
            models.append(m)
        for note in models[0].base.notes:
            err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
        asyncio.run(run(opts, models, announce=lambda line: err.print(line, highlight=False)))
    except (ValueError, FileNotFoundError) as e:              # ServeError, StreamError: one line, exit 2
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
