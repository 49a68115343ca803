"""A session's media on the wire: the timeline its chunks land on, and the WebRTC tracks that play it.

Both tracks read one Timeline, whose `offset` is the wall time (time.monotonic, the event loop's
clock) at which media time 0 plays. Video frame n is sent at offset + n / fps; audio at 48 kHz is
sent in 20 ms packets from the same clock, so the two leave in step and the receiver's RTCP
sender-report mapping lines them up. When the generator falls behind (frame n is not there at its
time) the video waits and the offset moves later by the wait: the audio then sends silence, never
audio ahead of its picture. A viewer that reads late skips to the frame due now (counted dropped).
"""
from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

AUDIO_RATE = 48000
AUDIO_PTIME = 0.02                      # s per audio packet (Opus frame)
AUDIO_PACKET = int(AUDIO_RATE * AUDIO_PTIME)
VIDEO_CLOCK = 90000
UP = 3                                  # 16 kHz -> 48 kHz


def upsample(x: np.ndarray) -> np.ndarray:
    """[N] float32 at 16 kHz -> [3 N] float32 at 48 kHz (linear interpolation; speech band kept)."""
    if x.size == 0:
        return x.astype(np.float32)
    t = np.arange(x.size * UP) / UP
    return np.interp(t, np.arange(x.size), x).astype(np.float32)


class Timeline:
    """Frames and 48 kHz audio of one session, indexed by media position. Lives on the event loop;
    the worker hands chunks over with loop.call_soon_threadsafe(timeline.push, ...)."""

    def __init__(self, fps: float, lead_s: float):
        self.fps, self.lead = fps, lead_s
        self.frames: deque[np.ndarray] = deque()
        self.first = 0                  # media index of frames[0]
        self.end = 0                    # frames generated so far (media index of the next one)
        self.audio = np.zeros(0, np.float32)
        self.audio_first = 0            # 48 kHz sample index of audio[0]
        self.offset: float | None = None
        self.since = time.monotonic()   # when the current viewer connected (a deadline before the first frame)
        self.next_frame = 0             # the next frame a viewer is sent
        self.sent = 0
        self.dropped = 0                # frames a viewer read late and skipped
        self.skipped = 0                # frames push() discarded unsent (keep)
        self.stalled_s = 0.0
        self.closed = False
        self.arrived = asyncio.Event()
        self.sent_times: deque[float] = deque(maxlen=64)
        self.changed = None             # called when the viewer's clock or position moves (the core follows them)

    # -- producer side
    def push(self, frames: np.ndarray, audio: np.ndarray | None, keep: int | None = None) -> None:
        """frames [T, H, W, 3] uint8; audio [T * 16000 / fps] float32 at 16 kHz or None (silence). `keep`: at
        most this many frames stay unsent; older ones are skipped (counted: never sent, the producer ran ahead of
        its viewer or had none), the viewer's clock moved on by as many (a producer that does not wait for its
        viewer: `vidu stream --serve`)."""
        n = frames.shape[0]
        self.frames.extend(frames)
        self.end += n
        up = upsample(audio) if audio is not None else np.zeros(int(round(n / self.fps * AUDIO_RATE)), np.float32)
        self.audio = np.concatenate([self.audio, up])
        over = self.end - self.next_frame - keep if keep is not None else 0
        if over > 0:
            self.next_frame += over
            self.skipped += over
            if self.offset is not None:
                self.offset -= over / self.fps
            while self.first < self.next_frame:
                self.frames.popleft()
                self.first += 1
            self._trim_audio()
        self.arrived.set()

    def buffered(self) -> int:
        """Frames generated and not yet sent."""
        return self.end - self.next_frame

    def restart(self) -> None:
        """A (new) viewer: the next unsent frame plays `lead` from now."""
        self.offset = None
        self.since = time.monotonic()
        self._changed()

    def _changed(self) -> None:
        if self.changed is not None:
            self.changed()

    def close(self) -> None:
        self.closed = True
        self.arrived.set()

    # -- consumer side
    async def _started(self) -> float:
        while self.offset is None:
            if self.closed:
                raise MediaStreamError
            if self.end > self.next_frame:
                self.offset = time.monotonic() + self.lead - self.next_frame / self.fps
                break
            self.arrived.clear()
            await self.arrived.wait()
        return self.offset

    async def video_frame(self) -> tuple[int, np.ndarray]:
        """(media index, frame) of the next frame, at its time."""
        await self._started()
        n = self.next_frame
        delay = self.offset + n / self.fps - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if self.closed:                                     # closed while waiting: its counts are final
            raise MediaStreamError
        behind = int((time.monotonic() - self.offset) * self.fps) - n
        if behind > 1:                                      # the viewer read late: skip to the frame due now
            skip = min(behind, self.end - 1 - n)
            if skip > 0:
                n += skip
                self.dropped += skip
        while n >= self.end:                                # not generated yet: wait, and play everything later
            if self.closed:
                raise MediaStreamError
            t = time.monotonic()
            self.arrived.clear()
            await self.arrived.wait()
            waited = time.monotonic() - t
            self.offset += waited
            self.stalled_s += waited
        while self.first < n:
            self.frames.popleft()
            self.first += 1
        frame = self.frames[0]
        self.next_frame = n + 1
        self.sent += 1
        self.sent_times.append(time.monotonic())
        self._trim_audio()
        self._changed()
        return n, frame

    def audio_packet(self, pos: int) -> np.ndarray | None:
        """AUDIO_PACKET samples from 48 kHz position `pos` if generated, else None."""
        i = pos - self.audio_first
        if i < 0 or i + AUDIO_PACKET > self.audio.size:
            return None
        return self.audio[i:i + AUDIO_PACKET]

    def audio_due(self) -> int | None:
        """The 48 kHz position playing now (None before the first frame's time)."""
        if self.offset is None:
            return None
        return int((time.monotonic() - self.offset) * AUDIO_RATE)

    def _trim_audio(self) -> None:
        keep = int(max(0, self.next_frame - 2 * self.fps) / self.fps * AUDIO_RATE)   # 2 s behind the picture
        if keep > self.audio_first:
            self.audio = self.audio[keep - self.audio_first:]
            self.audio_first = keep

    def fps_sent(self) -> float:
        t = self.sent_times
        if len(t) < 2 or time.monotonic() - t[-1] > 2.0:
            return 0.0
        return (len(t) - 1) / max(1e-6, t[-1] - t[0])


class VideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, timeline: Timeline):
        super().__init__()
        self.tl = timeline

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        n, rgb = await self.tl.video_frame()
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = int(round(n * VIDEO_CLOCK / self.tl.fps))
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return frame


class AudioTrack(MediaStreamTrack):
    """48 kHz mono s16 in 20 ms packets, sent on the wall clock; the session's audio where its picture is
    playing, silence before its first frame and while the picture waits for the generator."""
    kind = "audio"

    def __init__(self, timeline: Timeline):
        super().__init__()
        self.tl = timeline
        self.packets = 0
        self.start: float | None = None
        self.pos: int | None = None     # 48 kHz media position of the next packet

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live" or self.tl.closed:
            raise MediaStreamError
        if self.start is None:
            self.start = time.monotonic()
        delay = self.start + self.packets * AUDIO_PTIME - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        samples = None
        due = self.tl.audio_due()
        if due is not None and due >= 0:
            now = due // AUDIO_PACKET * AUDIO_PACKET
            if self.pos is None or (due - self.pos > 3 * AUDIO_PACKET and self.tl.audio_packet(now) is not None):
                self.pos = now          # (re)locked onto the picture's clock: the audio fell behind media that exists
                                        # (not the generator behind both: then the picture waits and so does the audio)
            if self.pos <= due + AUDIO_PACKET:              # else the picture waited: silence until it catches up
                samples = self.tl.audio_packet(self.pos)
                if samples is not None:
                    self.pos += AUDIO_PACKET
        pcm = np.zeros(AUDIO_PACKET, np.int16) if samples is None else \
            (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = self.packets * AUDIO_PACKET
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self.packets += 1
        return frame
