"""`vidu stream` end to end on the tiny preset (random weights): files, pipes, Ctrl-C, bad input,
and the session's handling of instructions and live audio between chunks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from stages.stream.events import AudioChunk, EventQueue, Instruction
from tests.conftest import vidu, scramble_stream_models, write_face
from tests.test_runner import _as_in_a_terminal
from tests.test_stream_reliability import _working_bytes

SR = 16000


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    from stages.synth.speech import tts
    d = tmp_path_factory.mktemp("stream")
    write_face(d / "face.png")
    said = tts("hello there, nice to meet you").audio[: int(1.3 * SR)]
    wave = np.pad(said, (0, int(1.3 * SR) - len(said)))
    import wave as wavmod
    with wavmod.open(str(d / "speech.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(wave, -1, 1) * 32767).astype(np.int16).tobytes())
    (d / "notes.txt").write_text("not an image")
    return {"dir": d, "face": d / "face.png", "speech": d / "speech.wav", "samples": len(wave)}


def expected_frames(samples: int) -> int:
    chunks = 1 + -(-(samples - 640) // 2560)          # first chunk: 1 frame (640 samples), then 4 frames
    return 1 + 4 * (chunks - 1)


def probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        out = {"frames": sum(1 for _ in c.decode(v)), "size": (v.width, v.height), "fps": float(v.average_rate)}
    with av.open(str(path)) as c:
        out["audio_s"] = float(c.streams.audio[0].duration * c.streams.audio[0].time_base) if c.streams.audio else 0
    return out


def test_stream_audio_file_to_mp4(inputs, tmp_path):
    out = tmp_path / "out.mp4"
    res = vidu("stream", "--preset", "tiny", "--image", str(inputs["face"]), "--audio", str(inputs["speech"]), "--out", str(out),
               "--summary", str(tmp_path / "s.json"), input="")
    info = probe(out)
    n = expected_frames(inputs["samples"])
    assert info["frames"] == n and info["size"] == (64, 64) and info["fps"] == 25
    assert abs(info["audio_s"] - n / 25) < 0.05
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["reason"] == "audio ended" and summary["frames"] == n
    assert summary["settings"]["twin"] is True and summary["chunk_ms_median"] > 0
    assert "random weights" in res.stderr
    last = json.loads(res.stderr.strip().splitlines()[-1])
    assert last["frames"] == n


def test_raw_frames_on_stdout(inputs):
    proc = subprocess.run([sys.executable, "-m", "vidu_cli", "stream", "--preset", "tiny", "--image", str(inputs["face"]), "--out", "-",
                           "--seconds", "0.4", "-q"], capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    frames = 1 + 4 * 3                                   # 0.4 s = 10 frames -> 3 chunks after the first
    assert len(proc.stdout) == frames * 64 * 64 * 3


@pytest.mark.parametrize("args, message", [
    (["--image", "{dir}/missing.png"], "image not found"),
    (["--image", "{dir}/notes.txt"], "not a readable image"),
    (["--image", "{face}", "--audio", "{dir}/notes.txt"], "cannot read audio from"),
    (["--image", "{face}", "--audio", "mic"], "no microphone"),
    (["--image", "{face}", "--ckpt", "{dir}/notes.txt"], "cannot read checkpoint"),
    (["--image", "{face}", "--ckpt", "{dir}/notes.txt", "--preset", "tiny"], "--ckpt and --preset both"),
    (["--image", "{face}"], "give an output"),
    (["--image", "{face}", "--sampler", "heun"], "unknown sampler 'heun'"),
    (["--image", "{face}", "--guidance", "-1"], "--guidance"),
    (["--image", "{face}", "--guide", "speech"], "unknown guide 'speech'"),
    (["--image", "{face}", "--preset", "tiny", "--compile", "--gpus", "2", "--device", "cpu"], "--compile is for one GPU"),
    (["--image", "{face}", "--preset", "tiny", "--attention", "flash"], "unknown attention 'flash'; choose one of: sdpa, int8, sparse"),
])
def test_bad_input_is_one_line(inputs, args, message):
    args = [a.format(dir=inputs["dir"], face=inputs["face"]) for a in args]
    if "--out" not in args and message != "give an output":
        args += ["--out", str(inputs["dir"] / "never.mp4")]
    if message == "no microphone":
        try:
            import sounddevice  # noqa: F401
            pytest.skip("a PortAudio library is present here; no-mic error not reproducible")
        except OSError:
            pass
    res = vidu("stream", *args, check=False)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_incompatible_checkpoint_is_named(inputs, tmp_path):
    from models.checkpoint import save_model
    from models.config import PRESETS
    from models.dit import DiT
    import dataclasses
    cfg = PRESETS["tiny"]
    other = cfg.replace(dit=dataclasses.replace(cfg.dit, text_dim=32))
    path = save_model(tmp_path / "odd.safetensors", DiT(other.dit), other)
    res = vidu("stream", "--image", str(inputs["face"]), "--ckpt", str(path), "--out", str(tmp_path / "x.mp4"),
               check=False)
    assert res.returncode == 2 and "text encoder gives 384-d features; the model takes 32" in res.stderr


def test_ctrl_c_finalises_a_playable_file(inputs, tmp_path):
    out = tmp_path / "live.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "vidu_cli", "stream", "--preset", "tiny", "--image", str(inputs["face"]), "--out",
                             str(out), "--seconds", "600", "-q", "--summary", str(tmp_path / "s.json")],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_as_in_a_terminal)
    deadline = time.monotonic() + 300                    # a few chunks written (not a fixed sleep: a loaded
    while _working_bytes(tmp_path) < 40_000 and time.monotonic() < deadline:   # machine may take seconds a chunk)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)                   # as a terminal's Ctrl-C: the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    info = probe(out)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["reason"] == "interrupted" and info["frames"] == summary["frames"] > 1
    assert (info["frames"] - 1) % 4 == 0


class Recorder:
    """A sink that keeps what it is given, and runs an action after a given write."""

    def __init__(self, after: int | None = None, action=None):
        self.frames, self.after, self.action = [], after, action

    def write(self, frames, audio):
        self.frames.append(frames)
        if self.action is not None and len(self.frames) == self.after:
            self.action()

    def stats(self, s):
        pass

    def close(self):
        pass


def test_instruction_mid_stream_changes_the_next_chunk_only(inputs):
    from stages.stream.session import SessionOptions, load_parts, run_session
    runs = []
    for send in (False, True):
        parts = load_parts(inputs["face"], seed=0)
        scramble_stream_models(parts.engine.model, parts.decoder)   # text matters, frames not flat
        events = EventQueue()
        rec = Recorder(after=3, action=(lambda: events.put(Instruction("raise a tennis racket"))) if send else None)
        summary = run_session(parts, events, [rec], SessionOptions(max_seconds=0.5, live_audio=True))
        runs.append((rec.frames, summary))
    (base, _), (changed, summary) = runs
    assert [tuple(x) for x in summary["instructions"]] == [(0, "a person talking to the camera"),
                                                           (3, "raise a tennis racket")]
    for j in range(3):
        assert np.array_equal(base[j], changed[j])
    assert not np.array_equal(base[3], changed[3])


def test_the_fast_path_is_on_by_default_on_a_gpu_and_streams_as_without(inputs, monkeypatch):
    """stages.stream.session.fast_path: the fused kernels by default on a CUDA device only (vidu stream / serve on
    a GPU); a stream with them (here under the Triton interpreter) gives the frames of one without, to a level of
    rounding, and the summary says which path ran."""
    from models.config import PRESETS
    from models.dit import DiT
    from stages.stream.session import SessionOptions, fast_path, load_parts, run_session
    from vidu_kernels import adaln
    model = DiT(PRESETS["tiny"].dit)
    for device, kernels, on in (("cuda", None, True), ("cuda:1", None, True), ("cpu", None, False),
                                ("cuda", False, False), ("cpu", True, True)):
        assert fast_path(model, device, kernels) == [] and model.kernel_settings()["on"] is on, (device, kernels)
    assert fast_path(model, "cpu", attention="int8") == ["self-attention by the int8 kernel approximates it (--attention sdpa is exact)"]
    launches = []
    launch = adaln._launch
    monkeypatch.setattr(adaln, "_launch", lambda *a: launches.append(1) or launch(*a))
    frames = {}
    for kernels in (False, True):
        parts = load_parts(inputs["face"], seed=0, kernels=kernels)
        scramble_stream_models(parts.engine.model, parts.decoder)   # frames not flat
        rec, before = Recorder(), len(launches)
        summary = run_session(parts, EventQueue(), [rec], SessionOptions(max_seconds=0.5, live_audio=True))
        assert summary["kernels"] == {"on": kernels, "attention": "sdpa", "keep_context": True}
        assert (len(launches) > before) is kernels                  # the fused path ran, and only when asked
        frames[kernels] = np.concatenate(rec.frames).astype(np.int16)
    diff = np.abs(frames[True] - frames[False])
    assert frames[True].shape == frames[False].shape and diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert frames[False].std() > 10                                   # control: frames that could differ


def test_recache_rereads_the_history_when_the_instruction_changes(inputs):
    """--recache: at a switch the history's keys/values are recomputed under the new text, so the
    chunk after it differs from the one without recache; the chunks before are the same (control)."""
    from stages.stream.session import SessionOptions, load_parts, run_session
    frames = {}
    for recache in (False, True):
        parts = load_parts(inputs["face"], settings={"recache": recache}, seed=0)
        scramble_stream_models(parts.engine.model, parts.decoder)   # text matters, frames not flat
        events = EventQueue()
        rec = Recorder(after=3, action=lambda: events.put(Instruction("raise a tennis racket")))
        summary = run_session(parts, events, [rec], SessionOptions(max_seconds=0.5, live_audio=True))
        assert summary["settings"]["recache"] is recache
        frames[recache] = rec.frames
    assert all(np.array_equal(a, b) for a, b in zip(frames[False][:3], frames[True][:3]))
    assert not np.array_equal(frames[False][3], frames[True][3])


def test_live_audio_arriving_mid_stream_is_used_from_the_next_chunk(inputs):
    from stages.stream.session import Session, SessionOptions, load_parts
    parts = load_parts(inputs["face"], seed=0)
    events = EventQueue()
    s = Session(parts, events, SessionOptions(live_audio=True))
    chunks = [s.next_chunk() for _ in range(2)]
    events.put(AudioChunk(np.full(8000, 0.1, np.float32)))     # barge-in: half a second of speech
    chunks += [s.next_chunk() for _ in range(2)]
    assert [c[2]["audio_real"] for c in chunks] == [0, 0, 2560, 2560]
    # the frames a session hands its sinks are C-ordered [T, H, W, 3] uint8: a permuted view (the decoder's
    # [T, 3, H, W] memory) made the hour's np.save of 7,500 frames take 33-43 s instead of < 1 s
    rgb = chunks[0][0]
    assert rgb.dtype == np.uint8 and rgb.shape[-1] == 3 and rgb.flags["C_CONTIGUOUS"]


def test_serve_takes_instructions_over_http_and_stops_on_ctrl_c(inputs, tmp_path):
    import urllib.error
    import urllib.request
    proc = subprocess.Popen([sys.executable, "-m", "vidu_cli", "stream", "--preset", "tiny", "--image", str(inputs["face"]), "--serve",
                             "127.0.0.1:0", "-q", "--summary", str(tmp_path / "s.json")], stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_as_in_a_terminal)
    try:
        url = None
        while url is None:
            line = proc.stderr.readline()
            assert line, "vidu stream ended before serving"
            if line.startswith("serving on "):
                url = line.split()[-1]
        base, _, fragment = url.partition("/#session=")              # the page opens the stream's session
        session = f"{base}/sessions/{fragment}"
        assert len(fragment) == 32

        def stats():
            with urllib.request.urlopen(session, timeout=10) as r:
                return json.loads(r.read())
        deadline = time.monotonic() + 120
        while stats()["chunks"] < 2:                                  # it streams without a viewer
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert stats()["viewer"] is False and stats()["width"] == 64
        req = urllib.request.Request(session + "/instruction", data=json.dumps({"text": "make a heart"}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=10).read()
        while stats()["instruction"] != "make a heart":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        # one stream's page: no new sessions
        req = urllib.request.Request(base + "/sessions", data=b"--x--\r\n", method="POST",
                                     headers={"Content-Type": "multipart/form-data; boundary=x"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 503 and "one stream" in json.loads(refused.value.read())["error"]
        # paced to real time while serving: over a few seconds at most 25 fps, plus the chunks
        # that may be in flight at either end of the interval
        s1, t1 = stats(), time.monotonic()
        time.sleep(4.0)
        s2, t2 = stats(), time.monotonic()
        per_chunk = s1["frames"] / s1["chunks"]
        assert s2["frames"] - s1["frames"] <= 25 * (t2 - t1) + 2 * per_chunk
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert '"event"' not in rest                     # -q: the server's JSON event lines (session_closed ...) too
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["reason"] == "interrupted" and [tuple(x)[1] for x in summary["instructions"]][-1] == "make a heart"


@pytest.mark.parametrize("audio, serving, seconds, realtime, expect", [
    (None, False, None, None, (10.0, True, False, False)),        # no audio, no page: 10 s of video
    (None, True, None, None, (None, True, False, True)),          # the page: live audio, paced, no end
    ("mic", False, None, None, (None, True, False, True)),
    ("talk.wav", False, None, None, (None, False, True, False)),  # a file: waited for, ends the stream
    ("-", True, 3.0, False, (3.0, False, True, False)),
])
def test_session_policy_lives_in_the_library(audio, serving, seconds, realtime, expect):
    from stages.stream.session import SessionOptions
    o = SessionOptions.for_inputs(audio, serving, seconds, realtime)
    assert (o.max_seconds, o.live_audio, o.audio_ends_stream, o.realtime) == expect
    assert o.instruction == "a person talking to the camera"      # models.config.NEUTRAL_TEXT
    assert SessionOptions.for_inputs(audio, serving, instruction="w" * 3000).instruction == "w" * 1000   # as stdin


class Closing(Recorder):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.closed = 0

    def close(self):
        self.closed += 1


def test_sinks_are_closed_once_also_after_ctrl_c(inputs):
    from stages.stream.session import SessionOptions, load_parts, run_session

    def ctrl_c():
        raise KeyboardInterrupt
    a, b = Closing(after=2, action=ctrl_c), Closing()
    summary = run_session(load_parts(inputs["face"], seed=0), EventQueue(), [a, b],
                          SessionOptions(max_seconds=60, live_audio=True))
    assert summary["reason"] == "interrupted" and len(a.frames) == 2 and (a.closed, b.closed) == (1, 1)


def test_outputs_opened_before_a_failing_one_are_closed(tmp_path):
    import socket
    from models.config import PRESETS
    from stages.serve.single import PageSink
    from stages.stream.events import StreamError
    from stages.stream.session import open_outputs
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(StreamError, match="cannot serve on"):
            open_outputs(str(tmp_path / "x.mp4"), PRESETS["tiny"], [lambda: PageSink("127.0.0.1", busy.getsockname()[1])])
    assert list(tmp_path.iterdir()) == []                 # the mp4 sink's working folder is gone
