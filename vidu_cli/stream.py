from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.stream.engine import StreamSettings
from stages.stream.session import SessionOptions
from vidu_cli.options import Attention, Guidance, Guide, Kernels, Quiet, Recache, Sampler, option
from vidu_cli.report import err, fail


def stream(
    image: Annotated[Path, typer.Option(help="Reference image of the character (png, jpg, ...).")],
    audio: Annotated[Optional[str], typer.Option(help="Speech: a file, - (16 kHz s16le PCM on stdin) or mic.")] = None,
    say: Annotated[Optional[str], typer.Option(help="Speech: this text, spoken offline by espeak-ng in --voice (instead of --audio).", show_default=False)] = None,
    voice: Annotated[str, typer.Option(help="Voice of --say and the page's say toggle: a character voice (ada, bea, ben, cleo, dev, finn, gus, zoe) or an espeak-ng voice LANGUAGE[+VARIANT], e.g. en-us+f3, en-gb-x-rp+m2. A model with character voices (the *-voice presets) speaks in the character voice named, and otherwise picks its own.")] = "en-us",
    out: Annotated[Optional[str], typer.Option(help="Write video + audio to this .mp4, or - for raw rgb24 frames on stdout.")] = None,
    serve: Annotated[Optional[str], typer.Option(help="Serve a live page on HOST:PORT: vidu serve's page over WebRTC (video, audio, text box, push-to-talk); off loopback it needs a token ($VIDU_SERVE_TOKEN).")] = None,
    commands: Annotated[Optional[str], typer.Option(help="Spoken instructions (the actions the model knows) from: a file, - (with --audio -), mic, page (push-to-talk of --serve) or none (default: mic with --audio mic, page with --serve and no --audio, else none).", show_default=False)] = None,
    ckpt: Annotated[Optional[Path], typer.Option(help="Causal or distilled checkpoint; the settings it records are the defaults below (default: the starter model shipped with vidu).", show_default=False)] = None,
    preset: Annotated[Optional[str], typer.Option(help="Random weights of this architecture instead of a checkpoint: tiny | small | wan2.1-1.3b.", show_default=False)] = None,
    instruction: Optional[str] = option(SessionOptions, "instruction", "Initial text instruction (type new ones on stdin)."),
    chunk_frames: Optional[int] = option(StreamSettings, "chunk_frames", "Latent frames per chunk (default: the checkpoint's, else the preset's).", default=None, show_default=False),
    steps: Optional[int] = option(StreamSettings, "steps", "Denoising steps per chunk (default: the checkpoint's, else 3).", default=None, show_default=False),
    shift: Optional[float] = option(StreamSettings, "shift", "Flow schedule shift (default: the checkpoint's, else 5).", default=None, show_default=False),
    window: Optional[int] = option(StreamSettings, "window", "Latent frames of history in the sliding window (default: the checkpoint's, else 8).", default=None, show_default=False),
    twin: Optional[bool] = option(StreamSettings, "twin", "TwinCache (noisy + clean history) or one clean cache (default: the checkpoint's, else on).", "--twin/--no-twin", default=None, show_default=False),
    noisy_step: Optional[int] = option(StreamSettings, "noisy_step", "Denoising step that fills the noisy cache (default: the checkpoint's, else 1).", default=None, show_default=False),
    sink: Optional[bool] = option(StreamSettings, "sink", "Keep the first generated chunk as persistent context (default: the checkpoint's, else on).", "--sink/--no-sink", default=None, show_default=False),
    sampler: Sampler = None,
    guidance: Guidance = None,
    guide: Guide = None,
    recache: Recache = None,
    decoder_weights: Annotated[Optional[Path], typer.Option(help="TAEHV weights (taew2_1.pth).")] = None,
    text_encoder_path: Annotated[Optional[Path], typer.Option(help="Local umT5 directory (Wan checkpoints).")] = None,
    audio_out: str = option(SessionOptions, "audio_out", "Audio in the output."),
    seconds: Optional[float] = option(SessionOptions, "max_seconds", "Stop after this much video (default: when the audio ends; 10 s without audio).", "--seconds", show_default=False),
    realtime: Annotated[Optional[bool], typer.Option("--realtime/--no-realtime", help="Pace output to the clock (default: on with --serve or mic).", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: cuda when available).")] = "auto",
    gpus: Annotated[int, typer.Option(min=1, max=64, help="GPUs of this machine that generate the one stream together (Ulysses sequence parallelism: the model's heads must split over them); rank r on cuda:r. With --device cpu: processes (gloo; for tests).")] = 1,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Noise seed.")] = 0,
    compile: Annotated[bool, typer.Option("--compile", help="Compile the model's blocks with torch.compile (fewer, fused kernels: a small model's chunk is bound by launches; the first chunks wait for the compilation).")] = False,
    kernels: Kernels = None,
    attention: Attention = "sdpa",
    summary: Annotated[Optional[Path], typer.Option(help="Also write the JSON summary to this file.")] = None,
    save_state: Annotated[Optional[Path], typer.Option(help="When the stream ends (its audio's end, --seconds, a Stop, or Ctrl-C / SIGTERM, which then stop it after the chunk in progress), write its whole state to this file for --resume.", show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the stream saved by --save-state in this file exactly as if it had never stopped. Give the same --image, model and settings (else it is refused); the audio continues where it stopped (a file or --say is sought there; stdin and the mic go on with what comes), as do the frame count, the summary's counts and the instruction (--instruction is not used); --seconds counts this run's video.", show_default=False)] = None,
    quiet: Quiet = False,
) -> None:
    """Generate the character live from an image, speech and text instructions.

    With no --ckpt it runs the starter model shipped with vidu (a 3-step distilled student, 256x256;
    --preset runs random weights instead). A checkpoint from `vidu train` or `vidu distill` records the
    settings it was trained with: they are the defaults, and a flag asking for something it never saw
    is refused. SIGTERM stops like Ctrl-C.

    Example: vidu stream --image cat.png --audio speech.wav --out cat.mp4
    Example: vidu stream --image cat.png --say "Hello there, nice to meet you." --voice en-gb-x-rp+f3 --out cat.mp4
    Example: vidu stream --image face.png --ckpt runs/causal/step-000300/ema.safetensors --out face.mp4
    Example: vidu stream --image face.png --serve 127.0.0.1:8000
    Example: vidu stream --image face.png --audio talk.wav --commands talk.wav --out face.mp4
    Example: vidu stream --image face.png --ckpt causal.safetensors --sampler euler --guidance 2 --recache --out face.mp4
    Example: vidu stream --image face.png --ckpt causal.safetensors --gpus 2 --out face.mp4
    Example: vidu stream --image face.png --audio hour.wav --seconds 600 --out part1.mp4 --save-state s.state
    Example: vidu stream --image face.png --audio hour.wav --seconds 600 --out part2.mp4 --resume s.state --save-state s.state
    """
    from contextlib import ExitStack

    from stages.stream.events import EventQueue
    from stages.stream.io import check_file_path
    from stages.stream.session import (Terminated, check_outputs, load_parts, open_outputs, pick_device, run_session,
                                       stop_on_signals, summary_json)
    from stages.stream.state import check_identity, identity, read_state, write_state

    from stages.stream.say import DEFAULT_VOICE, check_voice, said
    events, source, heard, spotter, spoken = EventQueue(), None, None, None, None
    try:
        with stop_on_signals(), ExitStack() as ranks:
            if say is not None and audio is not None:
                raise ValueError("--say and --audio both give the speech: use one of them")
            spoken, phones = said(say, voice) if say is not None else (None, None)   # before the model loads
            if say is None and (serve is not None or voice != DEFAULT_VOICE):
                check_voice(voice)                                 # the page's say toggle speaks in it
            opts = SessionOptions.for_inputs(audio if say is None else "<say>", serve is not None, seconds, realtime,
                                             instruction, audio_out, phones)
            commands = _commands_source(commands, audio, serve)
            check_outputs(out, serve, summary)                     # before the model loads
            if (save_state or resume) and gpus > 1:
                raise ValueError("--save-state and --resume keep the state of one process: use --gpus 1")
            if compile and gpus > 1:
                raise ValueError("--compile is for one GPU: the sequence-parallel exchanges are not compiled")
            if save_state:
                check_file_path(save_state)
            state, saved = read_state(resume) if resume else (None, None)
            dev, dtype = pick_device(device)
            given = dict(chunk_frames=chunk_frames, steps=steps, shift=shift, window=window, twin=twin,
                         noisy_step=noisy_step, sink=sink, sampler=sampler, guidance=guidance, guide=guide,
                         recache=recache)
            if ckpt is not None and preset is not None:
                raise ValueError("--ckpt and --preset both choose the model: use one of them")
            starter = ckpt is None and preset is None
            if starter:
                from models.starter import starter_checkpoint, starter_summary
                ckpt = starter_checkpoint()
                err.print(f"running {starter_summary()}; --ckpt runs another model", highlight=False)
            parts = load_parts(image, ckpt, preset or "tiny", given, decoder_weights, text_encoder_path, dev, dtype,
                               seed, compile, kernels, attention, None if voice == DEFAULT_VOICE else voice)
            ident = identity(parts, image) if save_state or resume else None
            if resume:
                check_identity(saved, ident, resume)
            start = state["audio_samples"] if resume else 0          # the input audio continues here
            if gpus > 1:
                from stages.stream.ranks import session_ranks
                parts = ranks.enter_context(session_ranks(parts, gpus, dev, seed))
            for note in parts.notes:
                err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
            if starter:
                from models.starter import reference_warning
                from stages.sense.image import read_image
                warning = reference_warning(read_image(image), parts.cfg.height, parts.cfg.width)
                if warning:
                    err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
                    parts.notes.append(f"warning: {warning}")
            from stages.stream.io import open_audio
            fps = parts.cfg.audio.fps
            if commands not in (None, "page"):                     # "page": the page's process spots its push-to-talk
                from stages.stream.commands import VoiceCommands
                spotter = VoiceCommands(events, live=commands == "mic", fps=fps,
                                      chunk_s=parts.cfg.audio.video_frames_per_latent * parts.engine.st.chunk_frames / fps)
            if spoken is not None:                                 # --say: fed as an --audio file's samples
                from stages.stream.io import open_samples
                source = open_samples(spoken[start:], events, realtime=opts.realtime)
            if audio is not None:
                source = open_audio(audio, spotter.tap(events) if commands == audio else events, realtime=opts.realtime,
                                    start=start)
            if commands not in (None, "page", audio):
                heard = open_audio(commands, spotter.tap(), realtime=opts.realtime, start=start)
            if audio != "-":
                from stages.stream.io import read_instructions
                read_instructions(sys.stdin, events)
            page, served = [], []
            if serve:                                              # vidu serve's page, showing this stream
                from stages.serve.single import PageSink
                from stages.stream.io import parse_address
                page.append(lambda: served.append(PageSink(*parse_address(serve), fps=fps, voice=voice,
                                                           commands=commands == "page", quiet=quiet,
                                                           announce=lambda url: err.print(f"serving on {url}", highlight=False)))
                            or served[-1])
            sinks = open_outputs(out, parts.cfg, page)
            if spotter is not None and not spotter.live:
                sinks.append(spotter)                              # paces commands by the stream's clock
            _announce(sinks, parts.cfg)
            with _live(quiet) as show:
                save = (lambda st: write_state(save_state, st, ident)) if save_state else None
                result = run_session(parts, events, sinks, opts, live=show, resume=state, save=save)   # closes sinks
    except (ValueError, FileNotFoundError) as e:     # StreamError, CheckpointError: one line, exit 2
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt as e:                  # before the session started: nothing to finalise
        raise typer.Exit(128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)) from None
    finally:
        for src in (source, heard, spotter):
            if src is not None:
                src.close()
    heard_by = spotter if spotter is not None else served[0] if served and commands == "page" else None
    if heard_by is not None:
        result["voice_commands"] = heard_by.log
        if heard_by.error:
            result["notes"] = [*result.get("notes", []), heard_by.error]
    if spoken is not None:
        result["said"] = {"text": say, "voice": voice, "seconds": len(spoken) / 16000}
    if summary:
        summary.write_text(json.dumps(result, indent=1, default=str))
    if not quiet:
        err.print(summary_json(result), highlight=False, soft_wrap=True)
    if result["reason"] in ("interrupted", "terminated"):
        raise typer.Exit(128 + (signal.SIGTERM if result["reason"] == "terminated" else signal.SIGINT))


def _commands_source(commands: str | None, audio: str | None, serve: str | None) -> str | None:
    """--commands resolved: None (off), "mic", "page", "-" or a file path; ValueError when unusable."""
    if commands is None:
        return "mic" if audio == "mic" else "page" if serve and audio is None else None
    if commands == "none":
        return None
    if commands == "page" and not serve:
        raise ValueError("--commands page needs --serve HOST:PORT (the page's push-to-talk)")
    if commands == "-" and audio != "-":
        raise ValueError("--commands - reads stdin, which is only audio with --audio - (stdin otherwise carries typed instructions)")
    if commands not in ("mic", "page", "-") and not Path(commands).is_file():
        raise ValueError(f"cannot read commands from {commands}: no such file")
    return commands


def _announce(sinks: list, cfg) -> None:
    from stages.stream.io import RawSink
    for s in sinks:
        if isinstance(s, RawSink):
            err.print(f"raw rgb24 frames {cfg.width}x{cfg.height} at {cfg.audio.fps} fps on stdout", highlight=False)


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
