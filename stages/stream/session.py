"""A live session: events in, chunks generated, frames decoded and sent to sinks, statistics out.

    parts = load_parts("cat.png", ckpt="causal.safetensors")     # model, decoder, encoders, settings
    opts = SessionOptions.for_inputs(audio="talk.wav", serving=False)
    with stop_on_signals():                                       # SIGTERM ends it like Ctrl-C
        summary = run_session(parts, events, [Mp4Sink(...)], opts)    # closes the sinks

Audio is consumed as a FIFO aligned to latent frames: the first chunk takes the samples of its
1 + 4 (F - 1) video frames (its latent frame 0 also covers 3 lead-in frames of silence), every later
chunk 4 F frames' worth. File and stdin audio is waited for; live audio (mic, browser) is not: a
chunk whose audio has not arrived gets silence, so speech that arrives mid-stream (barge-in) is
heard from the next chunk. An instruction acts from the next chunk; with `StreamSettings.recache` the
engine first recomputes its history's keys/values under the new text.

A stream stops and continues exactly (stages/stream/state.py holds the file): `run_session(...,
save=f)` calls f(Session.suspend()) at its end, SIGINT and SIGTERM then ending it after the chunk in
progress; `run_session(..., resume=state)` continues it: the same chunks and frames as if it had
never stopped, given the input audio from `state["audio_samples"]` on.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.audio import AudioStream
from models.config import NEUTRAL_TEXT, ModelConfig, preset as get_preset
from stages.run import ranged
from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings
from stages.stream.events import AudioChunk, AudioEnd, EventQueue, Instruction, Stop, StreamError, instruction_text

AUDIO_WAIT_S = 30.0         # a file / stdin source silent this long is an error
NO_AUDIO_SECONDS = 10.0     # a stream with no audio source and no page stops after this much video
AUDIO_OUT = ("input", "generated", "none")


@dataclass
class Parts:
    engine: StreamEngine
    cfg: ModelConfig
    decoder: object                      # TAEHV: the checkpoint's own autoencoder, or taew2_1 (stages/stream/decoders.py)
    encode_text: object                  # callable(list[str]) -> [B, L, D]
    notes: list[str] = field(default_factory=list)   # what is random / missing, said to the user
    trained: dict | None = None          # the checkpoint's sampling metadata (None: not recorded)


@dataclass
class SessionOptions:
    instruction: str = NEUTRAL_TEXT
    max_seconds: float | None = ranged(None, gt=0, max=7 * 86400.0)   # stop after this much video (this run's)
    live_audio: bool = False             # do not wait for audio (mic, browser)
    audio_ends_stream: bool = True       # a file / stdin source ending ends the stream
    realtime: bool = False               # pace output to wall-clock
    audio_out: str = ranged("input", choices=AUDIO_OUT)   # the input speech, the generated audio, or none
    phones: list | None = None           # --say: its TTS truth's (phone, start s, end s) on the input's timeline

    def __post_init__(self):
        if self.audio_out not in AUDIO_OUT:
            raise StreamError(f"audio out is one of: {', '.join(AUDIO_OUT)}, not {self.audio_out!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise StreamError(f"the duration must be > 0 seconds, not {self.max_seconds:g}")

    @classmethod
    def for_inputs(cls, audio: str | None, serving: bool, seconds: float | None = None,
                   realtime: bool | None = None, instruction: str | None = None,
                   audio_out: str = "input", phones: list | None = None) -> "SessionOptions":
        """The policy of a stream with audio `audio` (a file, "-" for stdin PCM, "mic", or None) and a
        web page or not: live audio (mic, the page) is not waited for; output is paced to the clock
        when serving or from a mic unless `realtime` says otherwise; a file or stdin ending ends the
        stream; with no audio and no page the stream stops after NO_AUDIO_SECONDS unless `seconds`.
        The first instruction is cleaned and capped like those typed later (events.instruction_text)."""
        live = audio in (None, "mic")
        if seconds is None and audio is None and not serving:
            seconds = NO_AUDIO_SECONDS
        return cls(instruction=instruction_text(instruction or "") or NEUTRAL_TEXT, max_seconds=seconds, live_audio=live,
                   audio_ends_stream=not live, realtime=(serving or audio == "mic") if realtime is None else realtime,
                   audio_out=audio_out, phones=phones)


def fast_path(model, device: str, kernels: bool | None = None, attention: str = "sdpa") -> list[str]:
    """Set `model`'s fast path (DiT.use_kernels): the fused Triton element-wise kernels (adaLN, gated residuals,
    q/k norm + RoPE, the cached keys' rotation) when `kernels`, by default (None) on a CUDA device, where they run
    (elsewhere their torch references: the same numbers up to rounding, slower); self-attention by `attention`
    ("sdpa"; "int8" and "sparse" approximate it). Returns the notes for the user (the approximate backends)."""
    on = torch.device(device).type == "cuda" if kernels is None else kernels
    model.use_kernels(on, attention)
    return [] if attention == "sdpa" else [f"self-attention by the {attention} kernel approximates it "
                                           "(--attention sdpa is exact)"]


def load_parts(image: str | Path, ckpt: str | Path | None = None, preset: str = "tiny",
               settings: StreamSettings | dict | None = None, decoder_weights: str | Path | None = None,
               text_encoder_path: str | Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0, compile: bool = False, kernels: bool | None = None, attention: str = "sdpa",
               voice: str | None = None) -> Parts:
    """Model (a checkpoint, or the preset with random weights), decoder (the autoencoder the checkpoint
    was trained with, else TAEHV with `decoder_weights`), text encoder, and the reference image encoded to a latent frame.
    `compile`: the model's blocks compiled (DiT.compile_blocks; the first chunks pay the compilation).
    `kernels`, `attention`: the model's fast path (fast_path: by default the fused kernels on a GPU, SDPA).
    `settings`: a StreamSettings, or the given ones ({name: value or None}) to resolve against the
    checkpoint's recorded settings (StreamSettings.resolve). `voice`: for a model with character voices
    (DiTConfig.voices), the one it speaks in (a stages.synth.voice.VOICES name; another name, or none: the
    model's own choice). The image, the checkpoint's config and the settings are checked before any
    weights load. Raises one-line errors for unusable inputs."""
    from models.checkpoint import checkpoint_config, checkpoint_sampling, load_dit
    from models.dit import SELF_ATTENTION, DiT
    from models.encoders import reference_latent, text_encoder as make_text_encoder
    from stages.stream.decoders import load_codec
    from stages.sense.image import ImageError, read_image
    notes = []
    try:
        rgb = read_image(image)                                  # [H, W, 3] uint8
    except ImageError as e:
        raise StreamError(str(e)) from None
    if attention not in SELF_ATTENTION:
        raise StreamError(f"attention is one of: {', '.join(SELF_ATTENTION)}, not {attention!r}")
    cfg, trained = get_preset(preset), None
    if ckpt:
        own, trained = checkpoint_config(ckpt), checkpoint_sampling(ckpt)
        if own is None:                                          # not a vidu file: a config from the shapes
            model, cfg = load_dit(ckpt, device=device, dtype=dtype)
        st = _settings(own or cfg, trained, settings)            # before a vidu checkpoint's weights load
        if own is not None:
            model, cfg = load_dit(ckpt, own, device=device, dtype=dtype)
        if trained is None:
            notes.append("the checkpoint does not record the settings it was trained with: the defaults are used")
        elif trained.get("stage") == "bidirectional":
            notes.append("a bidirectional teacher (stage 1): trained on whole clips with full attention, streamed here "
                         "chunk by chunk as it never was (`vidu eval` samples it whole)")
        if trained is not None and st.recache:
            notes.append("recache: on the synth bench, whose instructions are events (the action follows the text), "
                         "it cost distilled students 35 points of instructions whether or not they were distilled with "
                         "it, and the teacher 9 (benchmarks/RESULTS.md, sessions 59-61)")
    else:
        st = _settings(cfg, None, settings)
        torch.manual_seed(seed)
        model = DiT(cfg.dit).to(device=device, dtype=dtype).eval()
        notes.append(f"no --ckpt: the {preset} preset with random weights (frames are noise-like)")
    decoder, said = load_codec(ckpt, trained, decoder_weights, device)
    notes += said
    if cfg.dit.in_dim != decoder.config.latent_channels:
        raise StreamError(f"the model makes {cfg.dit.in_dim}-channel latents; the decoder decodes "
                          f"{decoder.config.latent_channels}")
    ref = reference_latent(decoder, rgb, cfg.height, cfg.width)   # [1, C, 1, h, w]
    kind = cfg.text_encoder
    text_encoder = make_text_encoder(kind, text_encoder_path, max_len=cfg.dit.text_len, device=device)
    if text_encoder.dim != cfg.dit.text_dim:
        raise StreamError(f"the text encoder gives {text_encoder.dim}-d features; the model takes {cfg.dit.text_dim}")
    notes += fast_path(model, device, kernels, attention)
    if compile:
        model.compile_blocks()
    engine = StreamEngine(model, cfg, st, seed=seed, keep_text=True)
    index, said = speaking_voice(cfg, voice)
    engine.start(ref, index)
    return Parts(engine, cfg, decoder, text_encoder, notes + said, trained)


def speaking_voice(cfg: ModelConfig, voice: str | None) -> tuple[int | None, list[str]]:
    """(the DiT's voice index of `voice`, notes): None for a model without character voices, -1 (the model's
    own choice) for a name that is not a character voice."""
    if not cfg.dit.voices:
        return None, []
    from stages.synth.voice import VOICES, voice_index
    if voice in VOICES:
        return voice_index(voice), []
    return -1, [f"the model speaks in one of its character voices ({', '.join(sorted(VOICES))}); "
                f"{'--voice ' + voice + ' is not one, so' if voice else 'none was given:'} it picks its own"]


def pick_device(device: str = "auto") -> tuple[str, torch.dtype]:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> (device, dtype: bfloat16 on a GPU); StreamError for a
    device this machine does not have."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device, torch.float32
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise StreamError(f"--device is auto, cpu, cuda or cuda:N, not {device!r}")
    if not torch.cuda.is_available():
        raise StreamError(f"--device {device}: no CUDA GPU is visible here (use --device cpu)")
    if index and int(index) >= torch.cuda.device_count():
        raise StreamError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device, torch.bfloat16


def check_outputs(out: str | None, serve: str | None, summary: str | Path | None = None) -> None:
    """StreamError for an output that cannot be written or served, found before any model loads:
    no output at all, a bad --out path or extension, a --serve address in use, a bad summary path."""
    from stages.stream.io import check_address, check_file_path, check_video_path, parse_address
    if not out and not serve:
        raise StreamError("give an output: --out FILE.mp4, --out - (raw frames) or --serve HOST:PORT")
    if out and out != "-":
        check_video_path(out)
    if serve:
        check_address(*parse_address(serve))
    if summary:
        check_file_path(summary)


def open_outputs(out: str | None, cfg: ModelConfig, more=()) -> list:
    """The sinks of --out (an .mp4 or "-" for raw frames on stdout), then those `more` makes (zero-argument
    callables: --serve's page, stages/serve/single.py); if one cannot be opened, those already open are
    closed before the error is raised."""
    from stages.stream.io import Mp4Sink, RawSink
    sinks: list = []
    try:
        if out == "-":
            sinks.append(RawSink())
        elif out:
            sinks.append(Mp4Sink(out, cfg.audio.fps, cfg.width, cfg.height))
        for make in more:
            sinks.append(make())
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def _settings(cfg: ModelConfig, trained: dict | None, settings: StreamSettings | dict | None) -> StreamSettings:
    if isinstance(settings, StreamSettings):
        if trained:
            settings.check_trained(trained)
        return settings
    return StreamSettings.resolve(cfg, trained, **(settings or {}))


class AudioFifo:
    """Received speech samples, consumed front-first in latent-frame windows."""

    def __init__(self):
        self.buf = np.zeros(0, np.float32)
        self.ended = False

    def push(self, samples: np.ndarray) -> None:
        self.buf = np.concatenate([self.buf, samples.astype(np.float32).reshape(-1)])

    def take(self, n: int) -> tuple[np.ndarray, int]:
        """n samples (silence where missing) and how many were real."""
        got = self.buf[:n]
        self.buf = self.buf[n:]
        return np.pad(got, (0, n - got.shape[0])), got.shape[0]


def speech_stream(cfg: ModelConfig, phones: list | None = None):
    """The streaming speech features `cfg`'s model hears: log-mel (models.audio.AudioStream) or, for a content
    model (audio_encoder "content"), phones and loudness (stages.sense.content.ContentStream: `phones`, the
    TTS truth of --say, else its front end's)."""
    if cfg.audio_encoder == "content":
        from stages.sense.content import ContentStream
        return ContentStream(cfg.audio, cfg.dit.audio_context, phones)
    return AudioStream(cfg.audio, cfg.dit.audio_context)


class Session:
    """The chunk loop with its inputs: `next_chunk()` generates, decodes and returns one chunk."""

    def __init__(self, parts: Parts, events: EventQueue, opts: SessionOptions, resume: dict | None = None):
        self.p, self.events, self.opts = parts, events, opts
        self.audio = AudioFifo()
        self.speech = speech_stream(parts.cfg, opts.phones)                     # the model's speech features
        self.played = 0                                                         # samples taken from the FIFO
        self.instruction = opts.instruction
        self.text_cache: dict[str, torch.Tensor] = {}
        self.stream_decoder = parts.decoder.stream_decoder()
        self.stopped: str | None = None
        self.chunks = 0
        self.frames = 0
        self.instruction_log: list[tuple[int, str]] = [(0, self.instruction)]
        self.cached_under = self.instruction      # the text the engine's history keys/values were computed under
        self.voice = None                         # --audio-out generated: the joint audio's vocoder stream (ChunkVoice)
        if resume is not None:
            self._resume(resume)
        self.first_frame = self.frames            # this run's first frame (a resumed stream's frames continue)

    # -- stop and continue --
    def suspend(self) -> dict:
        """The state to continue from (stages/stream/state.py), after the instructions still queued are
        taken: they act from the next chunk, as they would have without the stop. The queued audio is
        not kept: the input continues from `audio_samples`, the samples played so far."""
        for ev in self.events.drain():
            if isinstance(ev, Instruction):
                self._handle(ev)
        dec = self.stream_decoder
        return {**{f"engine.{k}": v for k, v in self.p.engine.state().items()},
                **{f"decoder.memory.{i}": m for i, m in dec.memory.items()},
                "decoder.frames_decoded": dec.frames_decoded, "decoder.shape": dec.shape,
                **{f"speech.{k}": v for k, v in self.speech.state().items()}, "audio_samples": self.played,
                "chunks": self.chunks, "frames": self.frames, "instruction": self.instruction,
                "cached_under": self.cached_under, "instructions": self.instruction_log,
                **({} if self.voice is None else {f"voice.{k}": v for k, v in self.voice.state().items()})}

    def _resume(self, state: dict) -> None:
        eng, dec = self.p.engine, self.stream_decoder
        eng.load_state({k[len("engine."):]: v for k, v in state.items() if k.startswith("engine.")})
        dec.memory = {int(k.rsplit(".", 1)[1]): v.to(eng.device) for k, v in state.items()
                      if k.startswith("decoder.memory.")}
        dec.frames_decoded = state["decoder.frames_decoded"]
        dec.shape = None if state["decoder.shape"] is None else tuple(state["decoder.shape"])
        self.speech.load_state({k[len("speech."):]: v for k, v in state.items() if k.startswith("speech.")})
        self.played, self.chunks, self.frames = state["audio_samples"], state["chunks"], state["frames"]
        self.instruction, self.cached_under = state["instruction"], state["cached_under"]
        self.instruction_log = [tuple(x) for x in state["instructions"]]
        if "voice.steps" in state:
            self._voice().load_state({k[len("voice."):]: v for k, v in state.items() if k.startswith("voice.")})

    # -- inputs --
    def _handle(self, ev) -> None:
        if isinstance(ev, Instruction):
            self.instruction = ev.text
            self.instruction_log.append((self.chunks, ev.text))
        elif isinstance(ev, AudioChunk):
            self.audio.push(ev.samples)
        elif isinstance(ev, AudioEnd):
            self.audio.ended = True
        elif isinstance(ev, Stop):
            self.stopped = ev.reason

    def _read_events(self, need_samples: int, wait_audio: bool) -> None:
        for ev in self.events.drain():
            self._handle(ev)
        deadline = time.monotonic() + AUDIO_WAIT_S
        while wait_audio and not self.audio.ended and self.stopped is None and len(self.audio.buf) < need_samples:
            ev = self.events.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            if ev is not None:
                self._handle(ev)
            elif time.monotonic() > deadline:
                raise StreamError(f"no audio arrived for {AUDIO_WAIT_S:.0f} s")

    def _text(self) -> torch.Tensor:
        if self.instruction not in self.text_cache:
            if len(self.text_cache) > 64:
                self.text_cache.clear()
            self.text_cache[self.instruction] = self.p.encode_text([self.instruction]).to(self.p.engine.device)
        return self.text_cache[self.instruction]

    def warm_reference(self) -> bool:
        """Before the first chunk: the reference's context built now under the instruction in force
        (StreamEngine.warm_reference; `vidu serve`'s worker calls it when idle). Whether it built it."""
        return self.chunks == 0 and self.p.engine.warm_reference(self._text())

    # -- one chunk --
    def samples_for_chunk(self) -> int:
        a, F = self.p.cfg.audio, self.p.engine.st.chunk_frames
        video_frames = a.video_frames_per_latent * F - (a.video_frames_per_latent - 1 if self.chunks == 0 else 0)
        return video_frames * a.sample_rate // a.fps

    def finished(self) -> str | None:
        if self.stopped:
            return self.stopped
        seconds = (self.frames - self.first_frame) / self.p.cfg.audio.fps          # this run's video
        if self.opts.max_seconds is not None and seconds >= self.opts.max_seconds:
            return "duration reached"
        if self.opts.audio_ends_stream and self.audio.ended and len(self.audio.buf) == 0:
            return "audio ended"
        return None

    def next_chunk(self) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """-> frames [T, H, W, 3] uint8, the audio that plays with them (or None), timings."""
        inputs, pending = self.prepare_chunk()
        return self.finish_chunk(self.p.engine.step(inputs), pending)

    def prepare_chunk(self) -> tuple[ChunkInputs, tuple]:
        """The next chunk's inputs (events read, its audio taken, the history recached under a new text),
        and what `finish_chunk` needs once the engine has generated it (one engine's step, or a batch of
        several sessions', stages/stream/batch.py)."""
        t0 = time.perf_counter()
        eng, cfg = self.p.engine, self.p.cfg
        n, F = self.samples_for_chunk(), eng.st.chunk_frames
        first, count = self.chunks * F, F + sum(cfg.dit.audio_context)       # feature frames this chunk reads
        ahead = max(0, self.speech.needed(first, count) - self.played - n)     # lookahead past its own samples
        self._read_events(n + ahead, wait_audio=not self.opts.live_audio)
        samples, real = self.audio.take(n)
        self.played += n
        feats = None
        if cfg.dit.audio_dim:
            self.speech.push(samples)
            feats = self.speech.features(first, count, self.audio.buf[:ahead])[None].to(eng.device, eng.dtype)
        text = self._text()
        if eng.st.recache and self.chunks and self.instruction != self.cached_under:
            eng.recache(text)                                   # the history re-read under the new text
        self.cached_under = self.instruction
        return ChunkInputs(text, feats), (t0, samples, real)

    def finish_chunk(self, result, pending: tuple) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """The generated chunk (a ChunkResult of this session's rows) decoded: `next_chunk`'s return."""
        t0, samples, real = pending
        t1 = time.perf_counter()
        with torch.no_grad():
            frames = self.stream_decoder.push(result.video.permute(0, 2, 1, 3, 4).float())   # [1, T, 3, H, W]
        rgb = (frames[0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        audio = self._audio_out(samples, real, result)
        self.chunks += 1
        self.frames += rgb.shape[0]
        return rgb, audio, {"generate_s": t1 - t0, "decode_s": time.perf_counter() - t1, "audio_real": real}

    def _voice(self):
        """The vocoder stream of the generated audio (the shipped models/vocoder.safetensors), made at first use."""
        if self.voice is None:
            from models.vocoder import ChunkVoice, load
            try:
                self.voice = ChunkVoice(load(), self.p.cfg.audio)
            except (FileNotFoundError, ValueError) as e:
                raise StreamError(f"--audio-out generated: {e}") from None
        return self.voice

    def _audio_out(self, samples, real, result) -> np.ndarray | None:
        mode = self.opts.audio_out
        if mode == "generated" and result.audio is not None:
            return self._voice()(result.audio[0].float().cpu(), self.chunks == 0).numpy()
        if mode == "none":
            return None
        return samples


_finalising = threading.Event()     # run_session is closing its sinks: SIGTERM has nothing left to stop


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, systemd) arrived: the stream ends like Ctrl-C, its outputs finalised."""


@contextmanager
def stop_on_signals():
    """While inside: the first SIGTERM raises Terminated in the main thread; later ones, and any that
    arrive while run_session closes its sinks, are ignored, so finalising an mp4 is not cut short. The
    previous handler is restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def on_term(signum, frame):
        if not fired and not _finalising.is_set():
            fired.append(signum)
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _stop_between_chunks(s: Session):
    """While inside: SIGINT and SIGTERM end the stream after the chunk in progress, so that its state is
    whole; a second SIGINT interrupts at once (the state is then not saved)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        if s.stopped is None:
            s.stopped = "terminated" if signum == signal.SIGTERM else "interrupted"
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt()

    previous = [(sig, signal.signal(sig, on_signal)) for sig in (signal.SIGINT, signal.SIGTERM)]
    try:
        yield
    finally:
        for sig, handler in previous:
            signal.signal(sig, handler)


def run_session(parts: Parts, events: EventQueue, sinks: list, opts: SessionOptions, live=None,
                resume: dict | None = None, save=None) -> dict:
    """Generate until the audio ends, the duration is reached, a Stop event, Ctrl-C or (inside
    stop_on_signals) SIGTERM; closes the sinks, once (an interrupted mp4 is finalised). Returns the
    JSON-able summary; its "reason" is "interrupted" after Ctrl-C, "terminated" after SIGTERM.
    `resume`: a state (Session.suspend, stages/stream/state.py) to continue from. `save(state)` is
    called with the state at the end (Ctrl-C and SIGTERM then act between chunks; summary["state_saved"])."""
    s = Session(parts, events, opts, resume)
    for sink in sinks:
        if hasattr(sink, "attach"):               # a sink that serves the session itself (stages/serve/single.py)
            sink.attach(s)
    with _stop_between_chunks(s) if save is not None else nullcontext():
        summary, whole = _run(s, events, sinks, opts, live)
        if save is not None:
            if whole:
                save(s.suspend())                 # takes the queued instructions
            summary.update(state_saved=whole, instruction=s.instruction)
    return summary


def _run(s: Session, events: EventQueue, sinks: list, opts: SessionOptions, live) -> tuple[dict, bool]:
    """The chunk loop of run_session: (summary, whether it ended between chunks)."""
    parts = s.p
    fps = parts.cfg.audio.fps
    lat: list[float] = []
    t_start = time.perf_counter()
    first_chunk_s = None
    reason = None
    whole = False                                 # the loop ended between chunks (the state is whole)
    due = 0.0                                     # perf_counter time the next chunk may be emitted
    try:
        while reason is None and (reason := s.finished()) is None:
            rgb, audio, timing = s.next_chunk()
            if first_chunk_s is None:
                first_chunk_s = time.perf_counter() - t_start
            lat.append(timing["generate_s"] + timing["decode_s"])
            if opts.realtime:  # a chunk no earlier than the previous one's end of play; when generation
                now = time.perf_counter()  # fell behind, play resumes from now (never a burst to catch up)
                if due > now:
                    time.sleep(due - now)
                due = max(due, now) + rgb.shape[0] / fps
            for sink in sinks:
                sink.write(rgb, audio)
            stats = _stats(s, lat, t_start, sinks, events)
            for sink in sinks:
                sink.stats(stats)
            if live is not None:
                live(stats)
        whole = True
    except Terminated:
        reason = "terminated"
    except KeyboardInterrupt:
        reason = "interrupted"
    finally:
        _finalising.set()
        try:
            for sink in sinks:
                sink.close()
        finally:
            _finalising.clear()
    summary = _stats(s, lat, t_start, sinks, events)
    summary.update(reason=reason, first_chunk_s=first_chunk_s, instructions=s.instruction_log,
                   settings=dict(parts.engine.st.__dict__), kernels=parts.engine.model.kernel_settings(),
                   notes=parts.notes)
    return summary, whole


def _stats(s: Session, lat: list[float], t_start: float, sinks, events) -> dict:
    elapsed = max(1e-9, time.perf_counter() - t_start)
    arr = np.array(lat) if lat else np.zeros(1)
    dropped = sum(k.counts()["frames_dropped"] for k in sinks if hasattr(k, "counts"))   # web viewers
    return {"chunks": s.chunks, "frames": s.frames, "seconds_generated": s.frames / s.p.cfg.audio.fps,
            "first_frame": s.first_frame, "audio_samples": s.played, "fps": (s.frames - s.first_frame) / elapsed,
            "chunk_ms_last": 1000 * float(arr[-1]), "chunk_ms_median": 1000 * float(np.median(arr)),
            "chunk_ms_p95": 1000 * float(np.percentile(arr, 95)), "queue_depth": events.depth(),
            "dropped_frames": dropped, "audio_buffered_s": len(s.audio.buf) / 16000, "instruction": s.instruction}


def summary_json(summary: dict) -> str:
    return json.dumps(summary, default=str)
