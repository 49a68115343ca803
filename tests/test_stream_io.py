"""Stream inputs (file, stdin PCM, mic, stdin instructions) and outputs (mp4, raw pipe) on small
generated media; outputs are checked by decoding them back with PyAV."""
from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from stages.sense.media import load_audio
from stages.stream.events import AudioChunk, AudioEnd, EventQueue, Instruction, StreamError
from stages.stream.io import Mp4Sink, RawSink, open_audio, read_instructions
from stages.sense.media import write_video
from stages.synth.render import render_clip
from stages.synth.world import random_identity, random_scene
from tests.test_runner import _as_in_a_terminal

SR = 16000
REPO = Path(__file__).resolve().parents[1]


def _collect(events: EventQueue, timeout: float = 10) -> tuple[np.ndarray, list]:
    """Events up to and including AudioEnd; returns the concatenated samples and all events."""
    got, deadline = [], time.monotonic() + timeout
    while not got or not isinstance(got[-1], AudioEnd):
        assert time.monotonic() < deadline, "no AudioEnd"
        e = events.wait(0.1)
        if e is not None:
            got.append(e)
    chunks = [e.samples for e in got if isinstance(e, AudioChunk)]
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), got


def _write_wav(path: Path, samples: np.ndarray) -> Path:
    """16 kHz mono s16 wav through PyAV."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=SR, layout="mono")
        pcm = (samples * 32767).astype(np.int16)[None]
        f = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        f.sample_rate, f.pts, f.time_base = SR, 0, Fraction(1, SR)
        c.mux(s.encode(f))
        c.mux(s.encode())
    return path


def _sine(seconds: float, hz: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def _frames(n: int, width: int = 64, height: int = 48, seed: int = 2) -> np.ndarray:
    """Varied but smooth content (a talking world character), as H.264 would see in use (seed 2: one whose
    detail at 64 x 48 H.264 keeps within these tests' tolerances)."""
    rng = np.random.default_rng(seed)
    identity = random_identity(rng, "human")
    scene = dataclasses.replace(random_scene(rng, identity), texture="plain", props=())  # smooth, as H.264 likes it
    return render_clip(identity, {"mouth": (np.arange(n) % 10) / 10}, width, height, scene)


def _probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(v)])
        rate = v.average_rate
    with av.open(str(path)) as c:
        a = c.streams.audio[0] if c.streams.audio else None
        audio_s = None if a is None else float(a.duration * a.time_base)
    return {"frames": frames, "fps": rate, "audio_s": audio_s}


# ---- audio sources


def test_wav_file_gives_all_samples_in_chunks_then_end(tmp_path):
    wav = _write_wav(tmp_path / "tone.wav", _sine(0.73))
    events = EventQueue()
    src = open_audio(str(wav), events)
    samples, got = _collect(events)
    src.close()
    assert src.total_samples == len(load_audio(wav)) == int(0.73 * SR)
    np.testing.assert_array_equal(samples, load_audio(wav))
    assert [len(e.samples) for e in got[:-1]] == [1600] * 7 + [int(0.73 * SR) - 7 * 1600]
    assert all(e.samples.dtype == np.float32 for e in got[:-1])


def test_mp4_file_audio_equals_load_audio(tmp_path):
    mp4 = write_video(tmp_path / "talk.mp4", _frames(25), 25, audio=_sine(1.0, 300))
    events = EventQueue()
    src = open_audio(str(mp4), events)
    samples, _ = _collect(events)
    assert src.total_samples == len(samples) > 0.95 * SR
    np.testing.assert_array_equal(samples, load_audio(mp4))


def test_realtime_file_is_paced_and_close_stops_it(tmp_path):
    wav = _write_wav(tmp_path / "half.wav", _sine(0.5))
    events = EventQueue()
    t0 = time.monotonic()
    open_audio(str(wav), events, realtime=True)
    samples, _ = _collect(events)
    assert time.monotonic() - t0 >= 0.45  # 0.5 s of audio arrives no faster than it plays
    np.testing.assert_array_equal(samples, load_audio(wav))

    long = _write_wav(tmp_path / "long.wav", _sine(5.0))
    src = open_audio(str(long), events, realtime=True)
    time.sleep(0.25)
    src.close()
    time.sleep(0.2)
    got = events.drain()
    assert 1 <= len(got) <= 4 and not any(isinstance(e, AudioEnd) for e in got)


@pytest.mark.parametrize("name, why", [("missing.wav", "no such file"), ("notes.txt", "not a media file"),
                                       ("silent.mp4", "has no audio")])
def test_unusable_audio_files_are_refused_before_starting(tmp_path, name, why):
    (tmp_path / "notes.txt").write_text("hello\n")
    write_video(tmp_path / "silent.mp4", _frames(5), 25)
    events = EventQueue()
    with pytest.raises(StreamError) as e:
        open_audio(str(tmp_path / name), events)
    msg = str(e.value)
    assert msg.startswith(f"cannot read audio from {tmp_path / name}: ") and why in msg and "\n" not in msg
    assert events.depth() == 0


def _pcm(samples: np.ndarray) -> bytes:
    return (samples * 32767).astype("<i2").tobytes()


def test_stdin_pcm_from_a_pipe(tmp_path):
    pcm = _pcm(_sine(0.3)) + b"\x01"  # an odd trailing byte is dropped
    r, w = os.pipe()
    with os.fdopen(r, "rb") as reader:
        events = EventQueue()
        open_audio("-", events, stdin=reader)
        for i in range(0, len(pcm), 1000):  # arrives in pieces that split samples
            os.write(w, pcm[i:i + 1000])
        os.close(w)
        samples, _ = _collect(events)
    expected = np.frombuffer(pcm[:-1], "<i2").astype(np.float32) / 32768
    np.testing.assert_array_equal(samples, expected)


def test_stdin_pcm_through_a_real_stdin():
    script = textwrap.dedent("""
        from stages.stream.events import AudioChunk, AudioEnd, EventQueue
        from stages.stream.io import open_audio
        q = EventQueue(); open_audio("-", q); n = 0
        while not isinstance(e := q.wait(10), AudioEnd):
            n += len(e.samples)
        print(n)
    """)
    pcm = _pcm(_sine(0.25))
    out = subprocess.run([sys.executable, "-c", script], input=pcm, capture_output=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert int(out.stdout) == len(pcm) // 2


def test_mic_fails_with_the_fix_or_is_skipped():
    try:
        import sounddevice as sd
        devices_ok = bool(sd.query_devices(kind="input"))
    except OSError:
        with pytest.raises(StreamError) as e:
            open_audio("mic", EventQueue())
        assert "libportaudio2" in str(e.value) and "--audio FILE" in str(e.value) and "\n" not in str(e.value)
        return
    except Exception:  # noqa: BLE001  -- sounddevice.PortAudioError: no input device
        devices_ok = False
    if devices_ok:
        pytest.skip("a microphone is present: a live input cannot be asserted")
    with pytest.raises(StreamError, match="no microphone"):
        open_audio("mic", EventQueue())


def test_instructions_from_lines_blank_lines_skipped():
    events = EventQueue()
    read_instructions(io.StringIO("smile\n\n   \n  look left  \nwave"), events).join(5)
    assert events.drain() == [Instruction("smile"), Instruction("look left"), Instruction("wave")]


# ---- sinks


def test_mp4_sink_frames_fps_and_audio(tmp_path):
    frames, audio = _frames(50), _sine(2.0)
    sink = Mp4Sink(tmp_path / "out.mp4", 25, 64, 48)
    for i in range(0, 50, 5):  # 5 frames = 0.2 s = 3200 samples per write
        sink.write(frames[i:i + 5], audio[i * 640:(i + 5) * 640])
    sink.close()
    sink.close()
    got = _probe(tmp_path / "out.mp4")
    assert got["frames"].shape == (50, 48, 64, 3) and got["fps"] == 25
    assert abs(got["audio_s"] - 2.0) < 0.1
    assert np.abs(got["frames"].astype(int) - frames).mean() < 4
    decoded = load_audio(tmp_path / "out.mp4")
    assert abs(np.sqrt(np.mean(decoded ** 2)) - np.sqrt(np.mean(audio ** 2))) < 0.02  # same level
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temp parts left


def test_mp4_sink_without_audio_writes_video_only(tmp_path):
    sink = Mp4Sink(tmp_path / "v.mp4", 10, 32, 32)
    sink.write(_frames(7, 32, 32), None)
    sink.close()
    got = _probe(tmp_path / "v.mp4")
    assert len(got["frames"]) == 7 and got["audio_s"] is None and got["fps"] == 10


def test_mp4_sink_interrupted_gives_a_playable_file(tmp_path):
    frames = _frames(40)
    sink = Mp4Sink(tmp_path / "cut.mp4", 25, 64, 48)
    try:
        for i in range(40):
            if i == 13:
                raise KeyboardInterrupt
            sink.write(frames[i:i + 1], _sine(0.04) if i >= 3 else None)  # audio begins late
    except KeyboardInterrupt:
        sink.close()
    got = _probe(tmp_path / "cut.mp4")
    assert len(got["frames"]) == 13 and abs(got["audio_s"] - 13 / 25) < 0.1
    assert np.abs(got["frames"].astype(int) - frames[:13]).mean() < 4


def test_mp4_sink_survives_ctrl_c_to_the_process_group(tmp_path):
    """SIGINT to the whole group, as a terminal sends it: the encoder thread keeps running and
    close() in the except clause finalises the file with every frame write() accepted."""
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from stages.stream.io import Mp4Sink
        sink = Mp4Sink({str(tmp_path / 'live.mp4')!r}, 25, 64, 48)
        frame = np.full((3, 48, 64, 3), 128, np.uint8)
        try:
            while True:
                sink.write(frame, np.zeros(1920, np.float32))
                print("wrote", flush=True)
        except KeyboardInterrupt:
            sink.close()
            print(sink.frames, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_as_in_a_terminal)
    for _ in range(10):
        assert proc.stdout.readline() == "wrote\n"
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    n = int(out.split()[-1])
    assert n >= 30 and n % 3 == 0
    assert len(_probe(tmp_path / "live.mp4")["frames"]) == n


def test_mp4_sink_odd_size_is_padded_to_even(tmp_path):
    frames = _frames(5, 63, 47)
    sink = Mp4Sink(tmp_path / "odd.mp4", 25, 63, 47)
    sink.write(frames, None)
    sink.close()
    got = _probe(tmp_path / "odd.mp4")["frames"]
    assert got.shape == (5, 48, 64, 3)
    assert np.abs(got[:, :47, :63].astype(int) - frames).mean() < 4


def test_mp4_sink_errors_are_one_line(tmp_path):
    with pytest.raises(StreamError, match="does not exist"):
        Mp4Sink(tmp_path / "nowhere" / "x.mp4", 25, 64, 48)
    sink = Mp4Sink(tmp_path / "x.mp4", 25, 64, 48)
    with pytest.raises(StreamError, match=r"frames are 32x32, the sink was opened for 64x48"):
        sink.write(np.zeros((1, 32, 32, 3), np.uint8), None)
    sink.close()
    with pytest.raises(StreamError, match="closed"):
        sink.write(_frames(1), None)
    assert not (tmp_path / "x.mp4").exists()  # no frames: no file

    dying = Mp4Sink(tmp_path / "y.mp4", 25, 64, 48)
    dying._video.close()  # the encoder goes away under the sink
    with pytest.raises(StreamError, match="ffmpeg stopped while writing") as e:
        for _ in range(20):
            dying.write(_frames(1), None)
            time.sleep(0.05)
    assert "\n" not in str(e.value)
    with pytest.raises(StreamError):
        dying.close()
    assert not (tmp_path / "y.mp4").exists() and [p.name for p in tmp_path.iterdir()] == []


def test_raw_sink_bytes_and_closed_pipe():
    frames = _frames(4)
    buf = io.BytesIO()
    sink = RawSink(buf)
    sink.write(frames[:1], None)
    sink.write(frames[1:], np.zeros(4800, np.float32))
    sink.close()
    assert buf.getvalue() == frames.tobytes()

    r, w = os.pipe()
    os.close(r)
    with os.fdopen(w, "wb") as pipe:
        sink = RawSink(pipe)
        with pytest.raises(StreamError, match="^output pipe closed$"):
            sink.write(frames, None)
        sink.close()
