"""Media access through PyAV (bundled FFmpeg): probing, the frame index of a video, decoding at
positions, 16 kHz audio, perceptual hashes and the one video writer (VideoWriter / write_video).
`ffmpeg_exe()` names the ffmpeg binary (imageio-ffmpeg's) for what PyAV does not offer, such as
lavfi test sources. No system packages needed."""
from __future__ import annotations

import functools

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
    """The ffmpeg binary imageio-ffmpeg ships ($IMAGEIO_FFMPEG_EXE, else its own, else one on PATH)."""
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


@dataclass
class VideoIndex:
    """The frames the decoder outputs for the first video stream, found by demuxing (no decoding):
    frame i is the i-th frame in presentation order, as PyAV, OpenCV and PySceneDetect count them
    (start offsets and variable frame rates included)."""

    pts: np.ndarray  # [N] int64 presentation timestamps in stream ticks, increasing
    end_pts: int  # end of the last frame
    keyframes: np.ndarray  # [K] int64 pts of the keyframes
    time_base: Fraction

    def __len__(self) -> int:
        return len(self.pts)

    def pts_at(self, i: int) -> int:
        """Start of frame i in ticks; i == N is the end of the last frame."""
        return int(self.pts[i]) if i < len(self.pts) else self.end_pts

    def time(self, i: int) -> float:
        return float(self.pts_at(i) * self.time_base)

    def is_keyframe(self, i: int) -> bool:
        return i < len(self.pts) and bool(np.isin(self.pts[i], self.keyframes))


def video_index(path: str | Path) -> VideoIndex:
    """Frame timestamps of the first video stream: packets with data that the demuxer does not
    mark as discarded (edit lists), sorted into presentation order. Demuxing a long source takes
    seconds and the stages ask per clip (clip, embed, eval), so the last few files' indexes are kept,
    keyed by path, size and modification time (read-only arrays)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return _video_index(str(p), -1, -1)          # open_container says what is wrong
    return _video_index(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _video_index(path: str, size: int, mtime_ns: int) -> VideoIndex:
    with open_container(path) as c:
        if not c.streams.video:
            raise MediaError("no_video", "no video stream")
        v = c.streams.video[0]
        pts, keys, end = [], [], None
        for p in c.demux(v):
            if not p.size or p.pts is None or p.is_discard:
                continue
            pts.append(p.pts)
            if p.is_keyframe:
                keys.append(p.pts)
            end = max(p.pts if end is None else end, p.pts + (p.duration or 0))
        time_base = v.time_base
    if not pts:
        raise MediaError("no_video", "the video stream holds no frames")
    p = np.sort(np.asarray(pts, np.int64))
    if end <= p[-1]:  # the last packet has no duration: give it the median interval
        end = int(p[-1] + (np.median(np.diff(p)) if len(p) > 1 else 1))
    keys = np.sort(np.asarray(keys, np.int64))
    p.flags.writeable = keys.flags.writeable = False
    return VideoIndex(p, int(end), keys, time_base)


def fraction_to_float(x: Fraction | None) -> float | None:
    return None if x is None or x == 0 else float(x)


SHOWN_EPS = 1e-6  # a frame starting within this of a time (s) counts as shown at that time


def frames_at(path: str | Path, times, end_s: float | None = None, max_side: int | None = None,
              crop: tuple[float, float, float, float] | None = None, convert=None) -> tuple[np.ndarray, np.ndarray]:
    """The frame shown at each of `times` (seconds on the file's timeline, non-decreasing) in the first
    video stream: the last frame whose presentation time is at or before t (what a player displays at
    t; the first frame for a t before it). This is vidu's one frame-sampling convention: filter,
    diarize (the mouth track), caption, embed and `vidu eval` sample frames through it, so the frame
    that stands for time t is the same everywhere, whatever the source's frame rate (a slower or
    variable-rate source repeats frames, a faster one drops some).

    Frames starting at or after `end_s` are not used (the last one before it holds to the end).
    `max_side` / `crop` as in clip_frames; `convert(av_frame) -> array` replaces that conversion
    (called once per distinct frame shown). Returns (frames [N, ...], presentation time in seconds of
    the source frame shown at each time [N]: equal entries are the same frame); empty arrays when the
    stream yields no frame.
    """
    times = np.asarray(times, np.float64).reshape(-1)
    if len(times) and np.any(np.diff(times) < 0):
        raise ValueError("frames_at: times must be non-decreasing")
    n = len(times)
    out: list[np.ndarray] = []
    shown: list[float] = []
    last: list | None = None  # [its time, the av frame, its conversion or None]: the frame on screen
    with open_container(path) as c:
        v = c.streams.video[0]
        v.thread_type = "AUTO"
        conv = convert or _rgb_converter(max_side, crop)

        def show() -> None:
            if last[2] is None:
                last[2] = conv(last[1])
            out.append(last[2])
            shown.append(last[0])

        if n and times[0] > 0:
            c.seek(int(times[0] / v.time_base), stream=v, backward=True, any_frame=False)
        for frame in c.decode(v) if n else ():
            if frame.time is None:
                continue
            t = float(frame.time)
            if end_s is not None and t + SHOWN_EPS >= end_s:
                break
            while last is not None and len(out) < n and times[len(out)] + SHOWN_EPS < t:
                show()  # `last` is the latest frame starting at or before this time
            if len(out) == n:
                break
            last = [t, frame, None]
        while last is not None and len(out) < n:  # the last frame holds to the end
            show()
    if not out:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0)
    return np.stack(out), np.asarray(shown)


def _rgb_converter(max_side: int | None, crop: tuple[float, float, float, float] | None):
    """av frame -> RGB uint8 [H, W, 3]: cut to the relative `crop` region, the longer side at most
    `max_side` (even sizes when scaled); the size is fixed by the first frame converted."""
    size = box = None

    def convert(frame) -> np.ndarray:
        nonlocal size, box
        if size is None:
            box = _pixel_box(crop, frame.width, frame.height) if crop else None
            w, h = (box[2] - box[0], box[3] - box[1]) if box else (frame.width, frame.height)
            scale = min(1.0, max_side / max(w, h)) if max_side else 1.0
            size = (max(2, round(w * scale)) // 2 * 2, max(2, round(h * scale)) // 2 * 2) if scale < 1 else (w, h)
        if box:
            return _crop_rgb(frame, box, size)
        return frame.to_ndarray(width=size[0], height=size[1], format="rgb24")

    return convert


def grid_times(start_s: float, end_s: float, fps: float) -> np.ndarray:
    """The regular grid start_s + k / fps of the times in [start_s, end_s)."""
    n = max(0, int(np.ceil((end_s - start_s) * fps - SHOWN_EPS * fps)))
    return start_s + np.arange(n) / fps


def clip_frames(path: str | Path, start_s: float, end_s: float, fps: float | None = None,
                max_side: int | None = None,
                crop: tuple[float, float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """RGB frames of [start_s, end_s) of the first video stream, decoded in order.

    `fps` samples the clip on the regular grid start_s + k / fps (`grid_times`) by `frames_at` (the
    frame shown at each grid time); None keeps every frame starting in the span. `max_side`
    downscales so the longer side is at most that (aspect kept). `crop` (relative x0, y0, x1, y1)
    cuts that region out of the full-size frame first; `max_side` then applies to the region.
    Returns (frames uint8 [N, H, W, 3], the time in seconds each frame stands for [N]: the grid time
    with `fps`, else the frame's presentation time).
    """
    if fps:
        grid = grid_times(start_s, end_s, fps)
        frames, shown = frames_at(path, grid, end_s, max_side, crop)
        return frames, grid[:len(shown)]
    frames: list[np.ndarray] = []
    times: list[float] = []
    convert = _rgb_converter(max_side, crop)
    with open_container(path) as c:
        v = c.streams.video[0]
        v.thread_type = "AUTO"
        if start_s > 0:
            c.seek(int(start_s / v.time_base), stream=v, backward=True, any_frame=False)
        for frame in c.decode(v):
            if frame.time is None:
                continue
            t = float(frame.time)
            if t + SHOWN_EPS < start_s:
                continue
            if t + SHOWN_EPS >= end_s:
                break
            frames.append(convert(frame))
            times.append(t)
    if not frames:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0)
    return np.stack(frames), np.asarray(times)


def _pixel_box(crop: tuple[float, float, float, float], w: int, h: int) -> tuple[int, int, int, int]:
    """A relative (x0, y0, x1, y1) region in pixels of a w x h frame, clipped, at least 2 x 2."""
    x0, y0 = min(max(0, round(crop[0] * w)), w - 2), min(max(0, round(crop[1] * h)), h - 2)
    return x0, y0, min(max(x0 + 2, round(crop[2] * w)), w), min(max(y0 + 2, round(crop[3] * h)), h)


def _crop_rgb(frame, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """The pixel `box` of a decoded frame as RGB uint8, area-resized to `size` (w, h)."""
    import cv2

    x0, y0, x1, y1 = box
    rgb = frame.to_ndarray(format="rgb24")[y0:y1, x0:x1]
    if size != (x1 - x0, y1 - y0):
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)


def clip_audio(path: str | Path, start_s: float, end_s: float, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 audio of [start_s, end_s) at `sample_rate` (zeros where the track is missing)."""
    audio = load_audio(path, sample_rate)
    a, b = int(round(start_s * sample_rate)), int(round(end_s * sample_rate))
    out = np.zeros(max(0, b - a), np.float32)
    piece = audio[a:b]
    out[: len(piece)] = piece
    return out


class VideoWriter:
    """An H.264 (libx264, yuv420p) video with an optional AAC track, through PyAV: the one way vidu
    writes video.

    `write(frame, pts)` takes RGB uint8 [H, W, 3] arrays or decoded av.VideoFrames; `pts` is in
    `time_base` ticks (default 1/fps), one tick of 1/fps per frame when omitted, so variable-rate
    timing can be kept. Odd sizes get one black row/column (yuv420p needs even sides).
    `write_audio(samples)` takes float32 [N] (mono) or [C, N] at `audio_rate`, in order from time 0.
    `options` are container options, e.g. {"movflags": "+frag_keyframe+empty_moov"}.
    """

    def __init__(self, path: str | Path, fps: float | Fraction, width: int, height: int, *, crf: int = 23,
                 preset: str = "veryfast", time_base: Fraction | None = None, audio_rate: int | None = None,
                 audio_channels: int = 1, options: dict | None = None, format: str | None = None):
        rate = Fraction(fps).limit_denominator(100000)
        self.width, self.height = width, height
        self.time_base = time_base or 1 / rate
        self._tick = max(1, round(1 / (rate * self.time_base)))  # ticks per frame at fps
        self._next_pts = 0
        self._container = av.open(str(path), "w", format=format, options=options or {})
        try:
            self._video = self._container.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": preset})
            self._video.width, self._video.height = width + width % 2, height + height % 2
            self._video.pix_fmt = "yuv420p"
            self._video.codec_context.time_base = self.time_base
            self._audio = None
            if audio_rate:
                self._audio = self._container.add_stream("aac", rate=audio_rate,
                                                         layout="mono" if audio_channels == 1 else "stereo")
                self._audio_pts = 0
        except BaseException:
            self._container.close()
            raise

    def write(self, frame: np.ndarray | av.VideoFrame, pts: int | None = None) -> None:
        if self._container is None:
            raise ValueError("the writer is closed")
        if isinstance(frame, av.VideoFrame):
            if (frame.width, frame.height) != (self._video.width, self._video.height):
                frame = frame.to_ndarray(format="rgb24")
        if not isinstance(frame, av.VideoFrame):
            frame = np.asarray(frame)
            if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
                raise ValueError(f"frames must be {self.height}x{self.width}x3 uint8 RGB, got {frame.dtype} "
                                 f"{'x'.join(map(str, frame.shape))}")
            if self.width % 2 or self.height % 2:
                frame = np.pad(frame, ((0, self.height % 2), (0, self.width % 2), (0, 0)))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        frame.pts = self._next_pts if pts is None else pts
        frame.time_base = self.time_base
        self._next_pts = frame.pts + self._tick
        self._container.mux(self._video.encode(frame))

    def write_audio(self, samples: np.ndarray) -> None:
        if self._container is None:
            raise ValueError("the writer is closed")
        if self._audio is None:
            raise ValueError("this writer was opened without audio (audio_rate=None)")
        x = np.asarray(samples, np.float32)
        x = np.ascontiguousarray(x.reshape(1, -1) if x.ndim == 1 else x)
        if not x.shape[1]:
            return
        if x.shape[0] != self._audio.codec_context.channels:
            raise ValueError(f"audio must have {self._audio.codec_context.channels} channel(s), got {x.shape[0]}")
        self._container.mux(self._audio.encode(_audio_frame(x, self._audio, self._audio_pts)))
        self._audio_pts += x.shape[1]

    def close(self) -> None:
        """Flush the encoders and finish the file (idempotent)."""
        if self._container is None:
            return
        try:
            self._container.mux(self._video.encode())
            if self._audio is not None:
                self._container.mux(self._audio.encode())
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _audio_frame(x: np.ndarray, stream, pts: int) -> av.AudioFrame:
    """float32 [C, N] samples as a frame for `stream`'s encoder (which cuts it to its frame size)."""
    frame = av.AudioFrame.from_ndarray(x, format="fltp", layout=stream.layout.name)
    frame.sample_rate, frame.pts, frame.time_base = stream.rate, pts, Fraction(1, stream.rate)
    return frame


def remux(video: str | Path, out: str | Path, audio: np.ndarray | None = None, rate: int = 16000,
          bit_rate: int = 128000) -> None:
    """Copy the video packets of `video` into a new mp4 `out` (moov first, not fragmented) with,
    when given, `audio` (mono float32 at `rate`) encoded as AAC. The video keeps its timestamps."""
    with open_container(video) as src, av.open(str(out), "w", format="mp4", options={"movflags": "+faststart"}) as dst:
        v = src.streams.video[0]
        ov = dst.add_stream_from_template(v)
        if audio is not None:
            sa = dst.add_stream("aac", rate=rate, layout="mono")
            sa.bit_rate = bit_rate
            x = np.ascontiguousarray(np.asarray(audio, np.float32).reshape(1, -1))
            if x.shape[1]:
                dst.mux(sa.encode(_audio_frame(x, sa, 0)))
            dst.mux(sa.encode())
        for pkt in src.demux(v):
            if pkt.dts is None:
                continue
            pkt.stream = ov
            dst.mux(pkt)


def write_video(path: str | Path, frames, fps: int, audio: np.ndarray | None = None, sr: int = 16000,
                crf: int = 23) -> Path:
    """Encode RGB uint8 frames (an iterable) and optional mono float32 audio at `sr` into `path`
    (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        for frame in frames:
            if writer is None:
                writer = VideoWriter(path, fps, frame.shape[1], frame.shape[0], crf=crf,
                                     audio_rate=sr if audio is not None else None)
            writer.write(frame)
        if writer is None:
            raise ValueError(f"no frames to write to {path}")
        if audio is not None:
            writer.write_audio(audio)
    finally:
        if writer is not None:
            writer.close()
    return path
