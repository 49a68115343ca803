"""Media access through PyAV (bundled FFmpeg): probing, decoding at positions, 16 kHz audio,
perceptual hashes, and the ffmpeg binary for cutting. No system packages needed."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

VFR_TOLERANCE = 0.10  # a frame interval this far (relative) from the median counts as irregular
VFR_FRACTION = 0.05  # the stream is variable-rate when more intervals than this are irregular


class MediaError(Exception):
    """A file that cannot be used; `code` is the manifest reason code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def ffmpeg_exe() -> str:
    """The ffmpeg binary: one on PATH, else the one imageio-ffmpeg ships."""
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


# leading bytes of common containers: a file that starts like one but does not open is corrupt
_SIGNATURES = ((4, b"ftyp"), (0, b"\x1a\x45\xdf\xa3"), (0, b"RIFF"), (0, b"OggS"), (0, b"ID3"), (0, b"fLaC"),
               (0, b"\x00\x00\x01\xba"), (0, b"FLV"), (0, b"\x30\x26\xb2\x75"), (4, b"moov"), (4, b"mdat"))


def _looks_like_media(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return any(head[o:o + len(sig)] == sig for o, sig in _SIGNATURES)


def open_container(path: str | Path):
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.error.InvalidDataError:
        if _looks_like_media(path):
            raise MediaError("corrupt", "a media container that FFmpeg cannot parse (truncated or damaged)") from None
        raise MediaError("not_media", "not a media file FFmpeg can read") from None
    except av.error.ExitError:  # FFmpeg gave up because Ctrl-C arrived inside the call
        raise KeyboardInterrupt from None
    except av.error.FFmpegError as e:
        raise MediaError("unreadable", f"FFmpeg cannot open it: {e.strerror or e}") from None


def _seconds(ts, time_base) -> float | None:
    return None if ts is None or time_base is None else float(ts * time_base)


@dataclass
class StreamScan:
    """What demuxing (no decoding) a stream tells: packet count and time span."""

    packets: int
    start_s: float | None
    end_s: float | None
    vfr: bool


def scan_streams(path: str | Path, video_index: int | None, audio_index: int | None) -> dict[int, StreamScan]:
    with open_container(path) as c:
        streams = [c.streams[i] for i in (video_index, audio_index) if i is not None]
        pts: dict[int, list[int]] = {s.index: [] for s in streams}
        ends: dict[int, int] = {}
        for pkt in c.demux(streams):
            if pkt.pts is None or pkt.size == 0:
                continue
            pts[pkt.stream.index].append(pkt.pts)
            end = pkt.pts + (pkt.duration or 0)
            ends[pkt.stream.index] = max(ends.get(pkt.stream.index, end), end)
        out = {}
        for s in streams:
            p = np.sort(np.asarray(pts[s.index], dtype=np.int64))
            vfr = False
            if s.type == "video" and len(p) > 2:
                d = np.diff(p).astype(np.float64)
                med = np.median(d)
                vfr = bool(med > 0 and np.mean(np.abs(d - med) > VFR_TOLERANCE * med) > VFR_FRACTION)
            out[s.index] = StreamScan(len(p), _seconds(int(p[0]), s.time_base) if len(p) else None,
                                      _seconds(ends.get(s.index), s.time_base), vfr)
        return out


def gray_frames_at(path: str | Path, fractions: list[float], size: int = 32) -> tuple[list[np.ndarray | None], float | None]:
    """Decode the frame at each relative position (seek to the keyframe before, decode forward).

    Returns a size x size float32 luma image per position (None where decoding failed) and the
    rotation (degrees) of the first decoded frame.
    """
    out: list[np.ndarray | None] = []
    rotation = None
    with open_container(path) as c:
        v = c.streams.video[0]
        duration = _stream_duration(c, v)
        start = _seconds(v.start_time, v.time_base) or 0.0
        for frac in fractions:
            target = start + frac * duration
            try:
                c.seek(int(target / v.time_base), stream=v, backward=True, any_frame=False)
                img = None
                for frame in c.decode(v):
                    t = frame.time if frame.time is not None else target
                    if t + 1e-6 >= target or img is None:
                        img = frame.reformat(width=size, height=size, format="gray").to_ndarray()
                        rotation = rotation if rotation is not None else int(getattr(frame, "rotation", 0) or 0)
                    if t + 1e-6 >= target:
                        break
                out.append(None if img is None else img.astype(np.float32))
            except av.error.ExitError:
                raise KeyboardInterrupt from None
            except (av.error.FFmpegError, ValueError, OSError):
                out.append(None)
    return out, rotation


def _stream_duration(c, v) -> float:
    if v.duration is not None:
        return float(v.duration * v.time_base)
    if c.duration is not None:
        return c.duration / av.time_base
    return 0.0


def phash(img: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a 32x32 luma image (low 8x8 DCT band vs its median)."""
    n = img.shape[0]
    k = np.arange(n)
    basis = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))  # [n, n] DCT-II rows
    dct = basis @ img @ basis.T
    low = dct[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distance between uint64 arrays (broadcasting)."""
    x = np.bitwise_xor(a, b)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Decode the first audio stream to mono float32 at `sample_rate` (empty if none)."""
    with open_container(path) as c:
        if not c.streams.audio:
            return np.zeros(0, np.float32)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        for frame in c.decode(c.streams.audio[0]):
            for f in resampler.resample(frame):
                chunks.append(f.to_ndarray().reshape(-1))
        for f in resampler.resample(None):
            chunks.append(f.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def keyframe_times(path: str | Path) -> list[float]:
    """Presentation times (s) of the video keyframes."""
    with open_container(path) as c:
        v = c.streams.video[0]
        return sorted(float(p.pts * v.time_base) for p in c.demux(v) if p.pts is not None and p.is_keyframe)


def video_frame_count(path: str | Path) -> int:
    with open_container(path) as c:
        return sum(1 for p in c.demux(c.streams.video[0]) if p.size)


def fraction_to_float(x: Fraction | None) -> float | None:
    return None if x is None or x == 0 else float(x)


def clip_frames(path: str | Path, start_s: float, end_s: float, fps: float | None = None,
                max_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """RGB frames of [start_s, end_s) of the first video stream, decoded in order.

    `fps` samples the clip on a regular grid (the first frame at or after each grid time);
    None keeps every frame. `max_side` downscales so the longer side is at most that (aspect kept).
    Returns (frames uint8 [N, H, W, 3], presentation times in seconds [N]).
    """
    frames: list[np.ndarray] = []
    times: list[float] = []
    step = 1.0 / fps if fps else 0.0
    next_t = start_s
    with open_container(path) as c:
        v = c.streams.video[0]
        v.thread_type = "AUTO"
        if start_s > 0:
            c.seek(int(start_s / v.time_base), stream=v, backward=True, any_frame=False)
        size = None
        for frame in c.decode(v):
            if frame.time is None:
                continue
            t = float(frame.time)
            if t + 1e-6 < start_s:
                continue
            if t + 1e-6 >= end_s:
                break
            if step and t + 1e-6 < next_t:
                continue
            if size is None:
                w, h = frame.width, frame.height
                scale = min(1.0, max_side / max(w, h)) if max_side else 1.0
                size = (max(2, round(w * scale)) // 2 * 2, max(2, round(h * scale)) // 2 * 2) if scale < 1 else (w, h)
            frames.append(frame.to_ndarray(width=size[0], height=size[1], format="rgb24"))
            times.append(t)
            if step:
                next_t = start_s + step * (int(np.floor((t - start_s) / step + 1e-6)) + 1)
    if not frames:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0)
    return np.stack(frames), np.asarray(times)


def clip_audio(path: str | Path, start_s: float, end_s: float, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 audio of [start_s, end_s) at `sample_rate` (zeros where the track is missing)."""
    audio = load_audio(path, sample_rate)
    a, b = int(round(start_s * sample_rate)), int(round(end_s * sample_rate))
    out = np.zeros(max(0, b - a), np.float32)
    piece = audio[a:b]
    out[: len(piece)] = piece
    return out
