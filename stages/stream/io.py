"""Inputs and file/pipe outputs of `vidu stream`.

Audio sources feed an EventQueue from a daemon thread with AudioChunk events (16 kHz mono
float32, 0.1 s each) and an AudioEnd when they run out:
  open_audio("talk.wav", events)        any file PyAV decodes, decoded up front
  open_audio("-", events)               raw s16le 16 kHz mono PCM on stdin, until EOF
  open_audio("mic", events)             the default input device (sounddevice + PortAudio)
  open_samples(samples, events)         samples in memory, fed as a file's (`--say`: stages/stream/say.py)
`read_instructions(sys.stdin, events)` turns each non-empty stdin line into an Instruction (bytes
decoded with replacement, cut at the page's MAX_INSTRUCTION_CHARS).

Sinks: Mp4Sink (H.264 + AAC through PyAV, finalised by close(), also after Ctrl-C)
and RawSink (rgb24 bytes to a pipe, e.g. `vidu stream ... --raw | ffplay -f rawvideo ...`).
"""
from __future__ import annotations

import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, TextIO

import av
import numpy as np

from stages.sense.media import MediaError, VideoWriter, load_audio, remux
from stages.stream.events import (SAMPLE_RATE, AudioChunk, AudioEnd, EventQueue, Instruction, StreamError,
                                  instruction_text)

CHUNK = 1600  # samples per AudioChunk: 0.1 s at 16 kHz
MIC_ALTERNATIVES = "or use --audio FILE, --audio - or the push-to-talk button of --serve"
CRF = 20  # x264 quality of Mp4Sink: visually clean at avatar sizes, encodes faster than real time
AUDIO_BITRATE = 128_000
QUEUE_WRITES = 8  # writes Mp4Sink buffers before write() blocks (back-pressure from the encoder)


class AudioSource:
    """A running producer of AudioChunk events. `total_samples` is known for files (else None);
    `close()` stops it (a stdin reader blocked in read() stays parked: its thread is a daemon)."""

    def __init__(self, total_samples: int | None = None):
        self.total_samples = total_samples
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream = None  # sounddevice.InputStream for "mic"

    def _start(self, target, *args) -> AudioSource:
        self._thread = threading.Thread(target=target, args=args, daemon=True, name="vidu-audio")
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=0.5)


def open_audio(spec: str, events: EventQueue, realtime: bool = False, stdin: BinaryIO | None = None,
               start: int = 0) -> AudioSource:
    """Start feeding `events` from a file path, "-" (stdin, or `stdin` when given) or "mic".

    A file is decoded and checked before anything starts, then fed from sample `start` on (a resumed
    stream's offset; stdin and the mic go on with what arrives); with `realtime` its chunks are paced
    to wall-clock (chunk i is put at i * 0.1 s), otherwise all are put at once."""
    if spec == "mic":
        return _open_mic(events)
    if spec == "-":
        src = AudioSource()
        return src._start(_feed_pcm, stdin if stdin is not None else sys.stdin.buffer, events, src._stop)
    return open_samples(_decode_file(spec)[start:], events, realtime)


def open_samples(samples: np.ndarray, events: EventQueue, realtime: bool = False) -> AudioSource:
    """Start feeding `events` with 16 kHz mono float32 `samples` as a file's would be fed (0.1 s
    chunks, paced to wall-clock with `realtime`, then AudioEnd): `--audio FILE` and `--say TEXT`."""
    samples = np.asarray(samples, np.float32).reshape(-1)
    src = AudioSource(total_samples=len(samples))
    return src._start(_feed_samples, samples, events, src._stop, realtime)


def _decode_file(path: str) -> np.ndarray:
    def fail(why: str) -> StreamError:
        return StreamError(f"cannot read audio from {path}: {why}")

    p = Path(path)
    if not p.exists():
        raise fail("no such file")
    if p.is_dir():
        raise fail("it is a folder")
    try:
        samples = load_audio(p, SAMPLE_RATE)
    except MediaError as e:
        raise fail(str(e)) from None
    except Exception as e:  # noqa: BLE001  -- av.error.* while decoding a damaged stream
        raise fail(_one_line(e)) from None
    if len(samples) == 0:
        raise fail("it has no audio")
    return samples


def _feed_samples(samples: np.ndarray, events: EventQueue, stop: threading.Event, realtime: bool) -> None:
    t0 = time.monotonic()
    for i, s in enumerate(range(0, len(samples), CHUNK)):
        if realtime and stop.wait(max(0.0, t0 + i * CHUNK / SAMPLE_RATE - time.monotonic())):
            return
        if stop.is_set():
            return
        events.put(AudioChunk(samples[s:s + CHUNK]))
    if realtime and stop.wait(max(0.0, t0 + len(samples) / SAMPLE_RATE - time.monotonic())):
        return
    events.put(AudioEnd())


def _feed_pcm(stream: BinaryIO, events: EventQueue, stop: threading.Event) -> None:
    """s16le mono PCM until EOF; a read may return any byte count, an odd tail is carried over
    (and dropped at EOF)."""
    carry = b""
    while not stop.is_set():
        try:
            data = stream.read(2 * CHUNK)
        except (OSError, ValueError):  # the stream was closed under us
            data = b""
        if not data:
            break
        data = carry + data
        n = len(data) // 2 * 2
        carry = data[n:]
        if n:
            events.put(AudioChunk(np.frombuffer(data[:n], "<i2").astype(np.float32) / 32768.0))
    if not stop.is_set():
        events.put(AudioEnd())


def _open_mic(events: EventQueue) -> AudioSource:
    def fail(why: str) -> StreamError:
        return StreamError(f"no microphone: {why} — {MIC_ALTERNATIVES}")

    try:
        import sounddevice as sd
    except OSError:  # sounddevice raises this when libportaudio.so is not found
        raise fail("the PortAudio library is missing (install it: apt-get install libportaudio2)") from None
    except ImportError:
        raise fail("the sounddevice package is missing (install it: pip install sounddevice)") from None
    try:
        sd.query_devices(kind="input")
    except (sd.PortAudioError, ValueError):
        raise fail("no audio input device found (connect one, or check that this user may record from it)") from None

    def on_audio(indata, frames, time_info, status):  # indata: [frames, 1] float32, PortAudio's thread
        events.put(AudioChunk(indata[:, 0].copy()))

    src = AudioSource()
    try:
        src._stream = sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", blocksize=CHUNK,
                                     callback=on_audio)
        src._stream.start()
    except (sd.PortAudioError, ValueError) as e:
        raise fail(f"the input device cannot record 16 kHz mono ({_one_line(e)})") from None
    return src


def read_instructions(stream: BinaryIO | TextIO, events: EventQueue) -> threading.Thread:
    """Put an Instruction per non-empty line of `stream` (stdin, read as bytes: invalid UTF-8 becomes
    U+FFFD, a line is cut at MAX_INSTRUCTION_CHARS) from a daemon thread; EOF ends it."""
    stream = getattr(stream, "buffer", stream)

    def loop():
        try:
            for line in stream:
                text = instruction_text(line)
                if text:
                    events.put(Instruction(text))
        except (OSError, ValueError):  # stdin closed under us
            pass

    t = threading.Thread(target=loop, daemon=True, name="vidu-instructions")
    t.start()
    return t


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _check_frames(frames: np.ndarray, height: int | None = None, width: int | None = None) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise StreamError(f"frames must be [T, H, W, 3] uint8 RGB, got {frames.dtype} {list(frames.shape)}")
    if height is not None and frames.shape[1:3] != (height, width):
        raise StreamError(f"frames are {frames.shape[2]}x{frames.shape[1]}, the sink was opened for {width}x{height}")
    return np.ascontiguousarray(frames)


VIDEO_SUFFIXES = (".mp4",)   # what Mp4Sink writes; another extension would name the wrong container


def check_video_path(path: str | Path) -> Path:
    """`path` if Mp4Sink can write it (an .mp4 name in an existing, writable folder), else StreamError.
    Cheap: `vidu stream` calls it before loading the model."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise StreamError(f"cannot write {path}: the output is an MP4 file (name it .mp4), or - for raw frames "
                          f"on stdout")
    return check_file_path(path)


def check_file_path(path: str | Path) -> Path:
    """`path` if a file can be created there (its folder exists and is writable, it is not a folder)."""
    path = Path(path)
    if path.is_dir():
        raise StreamError(f"cannot write {path}: it is a folder")
    if not path.parent.is_dir():
        raise StreamError(f"cannot write {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise StreamError(f"cannot write {path}: permission denied")
    return path


class Mp4Sink:
    """H.264 (libx264, yuv420p) + AAC mp4 through PyAV (stages.sense.media.VideoWriter).

    write() hands copies of frames and audio to a writer thread: Ctrl-C lands only in the main
    thread, so a KeyboardInterrupt never leaves half a frame or a miscounted write behind, and the
    encoder in that thread keeps going. It encodes a fragmented-mp4 video part (readable up to the
    last fragment even if this process is killed) and appends audio to a float32 file.
    `close()` ends the encoder, pads/trims the audio to the video's duration and muxes both into
    `path` through a temp name + rename; call it from `finally` or `except KeyboardInterrupt` to
    finalise an interrupted stream. Odd sizes get one black row/column (yuv420p needs even sides).
    """

    def __init__(self, path: str | Path, fps: float, width: int, height: int):
        self.path = check_video_path(path)
        if not (fps > 0 and width > 0 and height > 0):
            raise StreamError(f"cannot write {self.path}: fps, width and height must be positive "
                              f"(got {fps}, {width}, {height})")
        self.fps, self.width, self.height = Fraction(fps).limit_denominator(1001), width, height
        self.frames = 0  # frames the encoder has taken; all of them end up in the file
        self._audio = None  # the float32 file, opened by the first write that carries audio
        self._error: StreamError | None = None
        self._closed = False
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        try:
            self._video = VideoWriter(self._tmp / "video.mp4", self.fps, width, height, crf=CRF,
                                      options={"movflags": "+frag_keyframe+empty_moov"})
        except (av.error.FFmpegError, OSError) as e:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise StreamError(f"cannot write {self.path}: {e}") from None
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_WRITES)
        self._writer = threading.Thread(target=self._drain, daemon=True, name="vidu-mp4")
        self._writer.start()

    def write(self, frames: np.ndarray, audio: np.ndarray | None) -> None:
        if self._closed:
            raise StreamError(f"cannot write to {self.path}: the sink is closed")
        if self._error is not None:
            raise self._error
        frames = _check_frames(frames, self.height, self.width)
        audio = None if audio is None else np.array(audio, np.float32).reshape(-1)
        self._queue.put((frames.copy(), audio))

    def _drain(self) -> None:
        """The writer thread: runs until close() queues None; after an error it discards writes."""
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._encode(*item)
                except StreamError as e:
                    self._error = e

    def _encode(self, frames: np.ndarray, audio: np.ndarray | None) -> None:
        start, n = self.frames, len(frames)
        if audio is not None:
            if self._audio is None:
                self._audio = open(self._tmp / "audio.f32", "wb")
                self._pad_audio(self._samples_at(start))  # frames written before audio began
            self._audio.write(audio.tobytes())
        elif self._audio is not None:
            self._pad_audio(self._audio.tell() // 4 + self._samples_at(start + n) - self._samples_at(start))
        try:
            for frame in frames:
                self._video.write(frame)
        except (av.error.FFmpegError, ValueError) as e:  # ValueError: the encoder was closed
            raise StreamError(f"ffmpeg stopped while writing {self.path}: {e}") from None
        self.frames = start + n

    def _samples_at(self, frame: int) -> int:
        return round(frame * SAMPLE_RATE / self.fps)

    def _pad_audio(self, total: int) -> None:
        """Append silence up to `total` samples, or cut the file down to it."""
        have = self._audio.tell() // 4
        if total > have:
            self._audio.write(np.zeros(total - have, np.float32).tobytes())
        elif total < have:
            self._audio.truncate(4 * total)
            self._audio.seek(4 * total)

    def stats(self, stats: dict) -> None:
        pass

    def close(self) -> None:
        """Finish the file (idempotent). With no frames written, no file is made."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(None)
            self._writer.join()
            try:
                self._video.close()
            except av.error.FFmpegError as e:
                self._error = self._error or StreamError(f"ffmpeg failed writing {self.path}: {e}")
            if self._error is not None:
                raise self._error
            if self.frames:
                self._mux()
        finally:
            if self._audio is not None:
                self._audio.close()
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _mux(self) -> None:
        audio = None
        if self._audio is not None:
            self._pad_audio(self._samples_at(self.frames))
            self._audio.close()
            audio = np.fromfile(self._tmp / "audio.f32", np.float32)
        out = self._tmp / "out.mp4"
        try:
            remux(self._tmp / "video.mp4", out, audio, SAMPLE_RATE, AUDIO_BITRATE)
        except (av.error.FFmpegError, MediaError) as e:
            raise StreamError(f"ffmpeg failed muxing {self.path}: {e}") from None
        os.replace(out, self.path)


class RawSink:
    """rgb24 frames to a binary stream (stdout by default): T * H * W * 3 bytes per write, flushed.
    Audio is ignored. A closed pipe raises StreamError("output pipe closed")."""

    def __init__(self, stream: BinaryIO | None = None):
        self.stream = stream if stream is not None else sys.stdout.buffer
        self._closed = False

    def write(self, frames: np.ndarray, audio: np.ndarray | None) -> None:
        if self._closed:
            raise StreamError("cannot write frames: the raw output is closed")
        frames = _check_frames(frames)
        try:
            self.stream.write(memoryview(frames).cast("B"))
            self.stream.flush()
        except BrokenPipeError:
            self._closed = True
            self._silence_stdout()
            raise StreamError("output pipe closed") from None

    def _silence_stdout(self) -> None:
        # Python's docs (signal, "Note on SIGPIPE"): point stdout at devnull so the interpreter's
        # final flush does not fail again with a second BrokenPipeError at exit
        if self.stream is getattr(sys.stdout, "buffer", None):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)

    def stats(self, stats: dict) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._silence_stdout()


def parse_address(spec: str) -> tuple[str, int]:
    """"HOST:PORT" (or ":PORT", "[::1]:PORT") -> (host, port); StreamError for anything else."""
    host, _, port = spec.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise StreamError(f"--serve takes HOST:PORT with a port 0-65535, not {spec!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_address(host: str, port: int) -> None:
    """StreamError unless a server can listen on host:port now (bound and released at once, the way
    the server binds: `vidu stream --serve` and `vidu serve` call it before loading the model)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(1)
    except (OSError, OverflowError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise StreamError(f"cannot serve on {host}:{port}: {reason}") from None
