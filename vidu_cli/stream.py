from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from vidu_cli.options import Quiet
from vidu_cli.report import clean_errors, err, fail


def stream(
    image: Annotated[Path, typer.Option(help="Reference image of the character (png, jpg, ...).")],
    audio: Annotated[Optional[str], typer.Option(help="Speech: a file, - (16 kHz s16le PCM on stdin) or mic.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Write video + audio to this .mp4, or - for raw rgb24 frames on stdout.")] = None,
    serve: Annotated[Optional[str], typer.Option(help="Serve a live page on HOST:PORT (text box, push-to-talk).")] = None,
    ckpt: Annotated[Optional[Path], typer.Option(help="Causal checkpoint (default: the preset with random weights).")] = None,
    preset: Annotated[str, typer.Option(help="Architecture when no checkpoint is given: tiny | small | wan2.1-1.3b.")] = "tiny",
    instruction: Annotated[str, typer.Option(help="Initial text instruction (type new ones on stdin).")] = "a person talking to the camera",
    chunk_frames: Annotated[int, typer.Option(help="Latent frames per chunk.")] = 1,
    steps: Annotated[int, typer.Option(help="Denoising steps per chunk.")] = 3,
    shift: Annotated[float, typer.Option(help="Flow schedule shift.")] = 5.0,
    window: Annotated[int, typer.Option(help="Latent frames of history in the sliding window.")] = 8,
    twin: Annotated[bool, typer.Option("--twin/--no-twin", help="TwinCache (noisy + clean history) or one clean cache.")] = True,
    noisy_step: Annotated[int, typer.Option(help="Denoising step that fills the noisy cache.")] = 1,
    sink: Annotated[bool, typer.Option("--sink/--no-sink", help="Keep the first generated chunk as persistent context.")] = True,
    decoder_weights: Annotated[Optional[Path], typer.Option(help="TAEHV weights (taew2_1.pth).")] = None,
    text_encoder_path: Annotated[Optional[Path], typer.Option(help="Local umT5 directory (Wan checkpoints).")] = None,
    audio_out: Annotated[str, typer.Option(help="Audio in the output: input | generated | none.")] = "input",
    seconds: Annotated[Optional[float], typer.Option(help="Stop after this much video (default: when the audio ends; 10 s without audio).")] = None,
    realtime: Annotated[Optional[bool], typer.Option("--realtime/--no-realtime", help="Pace output to the clock (default: on with --serve or mic).", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda (default: cuda when available).")] = "auto",
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    summary: Annotated[Optional[Path], typer.Option(help="Also write the JSON summary to this file.")] = None,
    quiet: Quiet = False,
) -> None:
    """Generate the character live from an image, speech and text instructions.

    Example: vidu stream --image cat.png --audio speech.wav --out cat.mp4
    Example: vidu stream --image face.png --serve 127.0.0.1:8000
    """
    import torch
    from stages.stream.engine import StreamSettings
    from stages.stream.events import EventQueue
    from stages.stream.session import SessionOptions, load_parts, run_session, summary_json

    if not out and not serve:
        fail("give an output: --out FILE.mp4, --out - (raw frames) or --serve HOST:PORT")
    if audio_out not in ("input", "generated", "none"):
        fail("--audio-out is one of: input, generated, none")
    with clean_errors():
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
        settings = StreamSettings(chunk_frames=chunk_frames, steps=steps, shift=shift, window=window, sink=sink,
                                  twin=twin, noisy_step=noisy_step)
        live_audio = audio in (None, "mic") or (serve is not None and audio is None)
        pace = realtime if realtime is not None else (serve is not None or audio == "mic")
        opts = SessionOptions(instruction=instruction, live_audio=live_audio, realtime=pace, audio_out=audio_out,
                              audio_ends_stream=audio not in (None, "mic"),
                              max_seconds=seconds if seconds is not None else (10.0 if audio is None and not serve else None))
        events = EventQueue()
        parts = load_parts(image, ckpt, preset, settings, decoder_weights, text_encoder_path, dev, dtype, seed)
        for note in parts.notes:
            err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
        sinks, source = _open_outputs(out, serve, parts.cfg, events), None
        try:
            if audio is not None:
                from stages.stream.io import open_audio
                source = open_audio(audio, events, realtime=pace and audio != "mic")
            if audio != "-":
                from stages.stream.io import read_instructions
                read_instructions(sys.stdin, events)
            with _live(quiet) as show:
                result = run_session(parts, events, sinks, opts, live=show)
        finally:
            if source is not None:
                source.close()
            for s in sinks:
                s.close()
    if summary:
        summary.write_text(json.dumps(result, indent=1, default=str))
    if not quiet:
        err.print(summary_json(result), highlight=False, soft_wrap=True)
    if result["reason"] == "interrupted":
        raise typer.Exit(130)


def _open_outputs(out, serve, cfg, events) -> list:
    sinks = []
    fps = cfg.audio.fps
    if out == "-":
        from stages.stream.io import RawSink
        sinks.append(RawSink())
        err.print(f"raw rgb24 frames {cfg.width}x{cfg.height} at {fps} fps on stdout", highlight=False)
    elif out:
        from stages.stream.io import Mp4Sink
        sinks.append(Mp4Sink(out, fps, cfg.width, cfg.height))
    if serve:
        from stages.stream.serve import WebSink
        host, _, port = serve.rpartition(":")
        if not port.isdigit():
            fail(f"--serve takes HOST:PORT, not {serve!r}")
        web = WebSink(host or "127.0.0.1", int(port), events, fps=fps)
        err.print(f"serving on {web.url}", highlight=False)
        sinks.append(web)
    return sinks


class _live:
    """One status line on stderr, refreshed per chunk (rich); nothing when quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __enter__(self):
        if self.quiet:
            return None
        from rich.live import Live
        self.live = Live("", console=err, refresh_per_second=4, transient=True)
        self.live.__enter__()
        return self.update

    def update(self, s: dict) -> None:
        self.live.update(f"chunk {s['chunks']}  frames {s['frames']}  {s['fps']:.1f} fps  chunk "
                         f"{s['chunk_ms_last']:.0f} ms (median {s['chunk_ms_median']:.0f})  queue {s['queue_depth']}  "
                         f"dropped {s['dropped_frames']}  instruction: {s['instruction'][:40]}")

    def __exit__(self, *exc):
        if not self.quiet:
            self.live.__exit__(*exc)
        return False
