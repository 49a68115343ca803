"""The timeline and tracks of `vidu serve` without a network: frames and audio of a chunk leave together
(the audio packet holding a click leaves within a packet of the frame it belongs to), also after the
generator fell behind (the picture waited and the audio kept silent instead of running ahead), and a
viewer that reads late skips to the frame due now."""
from __future__ import annotations

import asyncio
import time

import numpy as np

from stages.serve.media import AUDIO_PACKET, AUDIO_PTIME, AUDIO_RATE, AudioTrack, Timeline, VideoTrack, upsample

FPS = 25.0
T = 4                                   # frames per chunk
SPF = int(16000 / FPS)                  # 16 kHz samples per frame


def chunk(i: int, click_at: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """T frames whose pixels hold their index; audio silent but for a click at frame `click_at`."""
    frames = np.stack([np.full((16, 16, 3), (i * T + t) % 256, np.uint8) for t in range(T)])
    audio = np.zeros(T * SPF, np.float32)
    if click_at is not None:
        k = click_at - i * T
        audio[k * SPF:(k + 1) * SPF] = 0.8
    return frames, audio


async def play(tl: Timeline, seconds: float, produce) -> tuple[list, list]:
    """Run both tracks for `seconds` while `produce` pushes chunks: (frame index, send time), (loud?, time)."""
    video, audio = VideoTrack(tl), AudioTrack(tl)
    frames, packets = [], []

    async def v():
        while True:
            f = await video.recv()
            frames.append((int(f.to_ndarray(format="rgb24")[0, 0, 0]), time.monotonic()))

    async def a():
        while True:
            f = await audio.recv()
            packets.append((np.abs(f.to_ndarray()).max() > 10000, time.monotonic()))

    tasks = [asyncio.ensure_future(x()) for x in (v, a, produce)]
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
    return frames, packets


def _click_lag(frames, packets, frame_index: int) -> float:
    """Send time of the first loud audio packet minus that of frame `frame_index`, s."""
    t_frame = next(t for n, t in frames if n == frame_index)
    t_audio = next(t for loud, t in packets if loud)
    return t_audio - t_frame


def test_upsample_keeps_length_and_tone():
    x = np.sin(2 * np.pi * 440 * np.arange(1600) / 16000).astype(np.float32)
    y = upsample(x)
    assert y.shape == (4800,) and y.dtype == np.float32
    ref = np.sin(2 * np.pi * 440 * np.arange(4800) / AUDIO_RATE)
    assert np.abs(y[:4797] - ref[:4797]).max() < 0.02


def test_audio_and_video_leave_together_and_after_a_stall():
    async def main():
        tl = Timeline(FPS, lead_s=0.05)

        async def produce():
            for i in range(6):                   # 24 frames on time, the click at frame 10
                tl.push(*chunk(i, click_at=10 if i == 2 else None))
                await asyncio.sleep(T / FPS * 0.5)

        frames, packets = await play(tl, 1.6, produce)
        assert [n for n, _ in frames] == list(range(24))
        assert abs(_click_lag(frames, packets, 10)) <= 2 * AUDIO_PTIME          # within a packet or two
        gaps = np.diff([t for _, t in frames])
        assert abs(np.median(gaps) - 1 / FPS) < 0.005                           # paced at the stream's fps
        assert tl.stalled_s == 0 and tl.dropped == 0

        tl = Timeline(FPS, lead_s=0.05)

        async def late():
            tl.push(*chunk(0))
            await asyncio.sleep(0.6)             # the generator falls 0.44 s behind
            tl.push(*chunk(1, click_at=6))
            tl.push(*chunk(2))

        frames, packets = await play(tl, 1.5, late)
        assert [n for n, _ in frames] == list(range(12))
        assert tl.stalled_s > 0.3
        lag = _click_lag(frames, packets, 6)
        assert abs(lag) <= 2 * AUDIO_PTIME, lag                                  # still in step after the wait
        # negative control: the same click placed one chunk (4 frames = 160 ms) later is measurably off
        assert abs(_click_lag(frames, packets, 2)) > 0.1
    asyncio.run(main())


def test_a_viewer_reading_late_skips_to_the_frame_due_now():
    async def main():
        tl = Timeline(FPS, lead_s=0.0)
        for i in range(10):
            tl.push(*chunk(i))
        track = VideoTrack(tl)
        first = await track.recv()
        await asyncio.sleep(0.5)                 # 12.5 frames' time without reading
        f = await track.recv()
        n = int(f.to_ndarray(format="rgb24")[0, 0, 0])
        assert first.pts == 0 and 11 <= n <= 14 and tl.dropped == n - 1
        assert f.pts == n * 90000 / FPS
        assert AUDIO_PACKET == 960
    asyncio.run(main())
