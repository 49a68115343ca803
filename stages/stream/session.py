"""A live session: events in, chunks generated, frames decoded and sent to sinks, statistics out.

    parts = load_parts(ckpt=None, preset="tiny", image="cat.png")      # model, decoder, encoders
    summary = run_session(parts, events, [Mp4Sink(...)], SessionOptions(max_seconds=10))

Audio is consumed as a FIFO aligned to latent frames: the first chunk takes the samples of its
1 + 4 (F - 1) video frames (its latent frame 0 also covers 3 lead-in frames of silence), every later
chunk 4 F frames' worth. File and stdin audio is waited for; live audio (mic, browser) is not: a
chunk whose audio has not arrived gets silence, so speech that arrives mid-stream (barge-in) is
heard from the next chunk.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.audio import chunk_waveform, window_features
from models.config import ModelConfig, preset as get_preset
from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings
from stages.stream.events import AudioChunk, AudioEnd, EventQueue, Instruction, Stop, StreamError

AUDIO_WAIT_S = 30.0


@dataclass
class Parts:
    engine: StreamEngine
    cfg: ModelConfig
    decoder: object                      # TAEHV
    encode_text: object                  # callable(list[str]) -> [B, L, D]
    notes: list[str] = field(default_factory=list)   # what is random / missing, said to the user


@dataclass
class SessionOptions:
    instruction: str = "a person talking to the camera"
    max_seconds: float | None = None     # stop after this much generated video
    live_audio: bool = False             # do not wait for audio (mic, browser)
    audio_ends_stream: bool = True       # a file / stdin source ending ends the stream
    realtime: bool = False               # pace output to wall-clock
    audio_out: str = "input"             # input | generated | none


def load_parts(image: str | Path, ckpt: str | Path | None = None, preset: str = "tiny",
               settings: StreamSettings = StreamSettings(), decoder_weights: str | Path | None = None,
               text_encoder_path: str | Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0) -> Parts:
    """Model (a checkpoint, or the preset with random weights), TAEHV decoder, text encoder, and the
    reference image encoded to a latent frame. Raises one-line errors for unusable inputs."""
    from models.checkpoint import load_dit, load_taehv
    from models.dit import DiT
    from models.encoders import TextEncoder, load_image
    from models.taehv import TAEHV
    notes = []
    cfg = get_preset(preset)
    if ckpt:
        model, cfg = load_dit(ckpt, device=device, dtype=dtype)
    else:
        torch.manual_seed(seed)
        model = DiT(cfg.dit).to(device=device, dtype=dtype).eval()
        notes.append(f"no --ckpt: the {preset} preset with random weights (frames are noise-like)")
    if decoder_weights:
        decoder = load_taehv(decoder_weights, device)
    else:
        decoder = TAEHV().to(device).eval()
        notes.append("no --decoder-weights (taew2_1.pth): TAEHV with random weights")
    if cfg.dit.in_dim != decoder.config.latent_channels:
        raise StreamError(f"the model makes {cfg.dit.in_dim}-channel latents; TAEHV decodes "
                          f"{decoder.config.latent_channels}")
    img = load_image(image, cfg.height, cfg.width)               # [1, 3, 1, H, W] in [-1, 1]
    with torch.no_grad():
        frames = ((img[:, :, 0] + 1) / 2)[:, None].to(device)   # [1, 1, 3, H, W] in [0, 1]
        ref = decoder.encode_video(frames).permute(0, 2, 1, 3, 4)  # [1, C, 1, h, w]
    kind = cfg.text_encoder
    text_encoder = TextEncoder(kind, text_encoder_path, max_len=cfg.dit.text_len, device=device)
    if text_encoder.dim != cfg.dit.text_dim:
        raise StreamError(f"the text encoder gives {text_encoder.dim}-d features; the model takes {cfg.dit.text_dim}")
    engine = StreamEngine(model, cfg, settings, seed=seed)
    engine.start(ref)
    return Parts(engine, cfg, decoder, text_encoder, notes)


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


class Session:
    """The chunk loop with its inputs: `next_chunk()` generates, decodes and returns one chunk."""

    def __init__(self, parts: Parts, events: EventQueue, opts: SessionOptions):
        self.p, self.events, self.opts = parts, events, opts
        self.audio = AudioFifo()
        self.instruction = opts.instruction
        self.text_cache: dict[str, torch.Tensor] = {}
        self.stream_decoder = parts.decoder.stream_decoder()
        self.stopped: str | None = None
        self.chunks = 0
        self.frames = 0
        self.instruction_log: list[tuple[int, str]] = [(0, self.instruction)]

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

    # -- one chunk --
    def samples_for_chunk(self) -> int:
        a, F = self.p.cfg.audio, self.p.engine.st.chunk_frames
        video_frames = a.video_frames_per_latent * F - (a.video_frames_per_latent - 1 if self.chunks == 0 else 0)
        return video_frames * a.sample_rate // a.fps

    def finished(self) -> str | None:
        if self.stopped:
            return self.stopped
        if self.opts.max_seconds is not None and self.frames / self.p.cfg.audio.fps >= self.opts.max_seconds:
            return "duration reached"
        if self.opts.audio_ends_stream and self.audio.ended and len(self.audio.buf) == 0:
            return "audio ended"
        return None

    def next_chunk(self) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """-> frames [T, H, W, 3] uint8, the audio that plays with them (or None), timings."""
        t0 = time.perf_counter()
        eng, cfg = self.p.engine, self.p.cfg
        n = self.samples_for_chunk()
        self._read_events(n, wait_audio=not self.opts.live_audio)
        samples, real = self.audio.take(n)
        lead = eng.st.chunk_frames * cfg.audio.samples_per_latent - n
        window = torch.from_numpy(np.pad(samples, (lead, 0)))
        feats = window_features(window, eng.st.chunk_frames, cfg.audio)[None] if cfg.dit.audio_dim else None
        inputs = ChunkInputs(self._text(), None if feats is None else feats.to(eng.device, eng.dtype))
        result = eng.step(inputs)
        t1 = time.perf_counter()
        with torch.no_grad():
            frames = self.stream_decoder.push(result.video.permute(0, 2, 1, 3, 4).float())   # [1, T, 3, H, W]
        rgb = (frames[0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        audio = self._audio_out(samples, real, result)
        self.chunks += 1
        self.frames += rgb.shape[0]
        return rgb, audio, {"generate_s": t1 - t0, "decode_s": time.perf_counter() - t1, "audio_real": real}

    def _audio_out(self, samples, real, result) -> np.ndarray | None:
        mode = self.opts.audio_out
        if mode == "generated" and result.audio is not None:
            return chunk_waveform(result.audio[0].float().cpu(), self.chunks == 0, self.p.cfg.audio).numpy()
        if mode == "none":
            return None
        return samples


def run_session(parts: Parts, events: EventQueue, sinks: list, opts: SessionOptions, live=None) -> dict:
    """Generate until the audio ends, the duration is reached, a Stop event, or Ctrl-C; always close
    the sinks (an interrupted mp4 is finalised). Returns the JSON-able summary."""
    s = Session(parts, events, opts)
    fps = parts.cfg.audio.fps
    lat: list[float] = []
    t_start = time.perf_counter()
    first_chunk_s = None
    reason = None
    try:
        while reason is None and (reason := s.finished()) is None:
            rgb, audio, timing = s.next_chunk()
            if first_chunk_s is None:
                first_chunk_s = time.perf_counter() - t_start
            lat.append(timing["generate_s"] + timing["decode_s"])
            if opts.realtime:                        # emit no earlier than the frames' play time
                ahead = (s.frames - rgb.shape[0]) / fps - (time.perf_counter() - t_start)
                if ahead > 0:
                    time.sleep(ahead)
            for sink in sinks:
                sink.write(rgb, audio)
            stats = _stats(s, lat, t_start, sinks, events)
            for sink in sinks:
                sink.stats(stats)
            if live is not None:
                live(stats)
    except KeyboardInterrupt:
        reason = "interrupted"
    finally:
        for sink in sinks:
            sink.close()
    summary = _stats(s, lat, t_start, sinks, events)
    summary.update(reason=reason, first_chunk_s=first_chunk_s, instructions=s.instruction_log,
                   settings=dict(parts.engine.st.__dict__), notes=parts.notes)
    return summary


def _stats(s: Session, lat: list[float], t_start: float, sinks, events) -> dict:
    elapsed = max(1e-9, time.perf_counter() - t_start)
    arr = np.array(lat) if lat else np.zeros(1)
    dropped = sum(k.counts()["frames_dropped"] for k in sinks if hasattr(k, "counts"))   # web viewers
    return {"chunks": s.chunks, "frames": s.frames, "seconds_generated": s.frames / s.p.cfg.audio.fps,
            "fps": s.frames / elapsed, "chunk_ms_last": 1000 * float(arr[-1]), "chunk_ms_median": 1000 * float(np.median(arr)),
            "chunk_ms_p95": 1000 * float(np.percentile(arr, 95)), "queue_depth": events.depth(),
            "dropped_frames": dropped, "audio_buffered_s": len(s.audio.buf) / 16000, "instruction": s.instruction}


def summary_json(summary: dict) -> str:
    return json.dumps(summary, default=str)
