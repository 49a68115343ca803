"""A stream stopped with `--save-state` and continued with `--resume` gives, bit for bit, the frames of
the stream that never stopped: cut by --seconds (the CLI, raw frames on stdout) and by Ctrl-C with an
instruction arriving at the cut (run_session, as the CLI calls it, the instructions put on its queue
after given chunks as a typed line would be); dropping the noise generator's or the caches' state
from the file does change the frames (negative controls); a state of another stream, a missing or a
damaged file is refused in one line.

The tiny preset with random weights large enough that noise, speech and text change the frames (as
tests/test_stream_pure.py makes them), TwinCache and --recache on: every part of the state is used."""
from __future__ import annotations

import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch

from stages.stream.events import EventQueue, Instruction
from tests.conftest import cli, scramble_stream_models, write_face, write_speech_tone

SR = 16000
SIZE = 64                                 # the tiny preset's frames: 64 x 64
WAVING = ("--instruction", "a person waving")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A face, 3 s of speech-like audio, a tiny-preset checkpoint and a TAEHV with scaled random weights."""
    from models.checkpoint import save_model
    from models.config import PRESETS
    from models.dit import DiT
    from models.taehv import TAEHV
    d = tmp_path_factory.mktemp("resume")
    write_face(d / "face.png")
    write_face(d / "other.png", (90, 150, 200))
    write_speech_tone(d / "speech.wav", 3, seed=3)
    cfg = PRESETS["tiny"]
    dit, tae = DiT(cfg.dit), TAEHV()
    scramble_stream_models(dit, tae)
    save_model(d / "dit.safetensors", dit, cfg)
    save_model(d / "tall.safetensors", dit, cfg.replace(height=2 * cfg.height))
    torch.save(tae.state_dict(), d / "taehv.pth")
    return {"dir": d, "face": d / "face.png", "other": d / "other.png", "audio": d / "speech.wav",
            "ckpt": d / "dit.safetensors", "tall": d / "tall.safetensors", "tae": d / "taehv.pth"}


@pytest.fixture(scope="module")
def cut(inputs) -> dict:
    """2 s of the stream uncut, and the same 2 s as 1 s saved to a state file, then 1 s resumed from it
    (with no --instruction: the state's goes on); a copy of the state cut in half."""
    d = inputs["dir"]
    whole = raw_frames(inputs, "--seconds", "2", *WAVING)
    first = raw_frames(inputs, "--seconds", "1", *WAVING, "--save-state", str(d / "s.state"),
                       "--summary", str(d / "a.json"))
    second = raw_frames(inputs, "--seconds", "1", "--resume", str(d / "s.state"), "--summary", str(d / "b.json"))
    data = (d / "s.state").read_bytes()
    (d / "damaged.state").write_bytes(data[:len(data) // 2])
    return {"whole": whole, "first": first, "second": second, "state": d / "s.state",
            "summaries": [json.loads((d / f"{n}.json").read_text()) for n in "ab"]}


def raw_frames(inputs, *extra) -> np.ndarray:
    """`vidu stream` in this process (typer's CliRunner): its frames [T, 64, 64, 3], raw on stdout."""
    from typer.testing import CliRunner

    from vidu_cli.app import app
    res = CliRunner().invoke(app, ["stream", "--ckpt", str(inputs["ckpt"]), "--decoder-weights", str(inputs["tae"]),
                                   "--image", str(inputs["face"]), "--audio", str(inputs["audio"]), "--out", "-",
                                   "-q", "--recache", *extra])
    assert res.exit_code == 0, res.stderr + repr(res.exception)
    out = np.frombuffer(res.stdout_bytes, np.uint8)
    assert out.size and out.size % (SIZE * SIZE * 3) == 0, out.size
    return out.reshape(-1, SIZE, SIZE, 3)


def test_a_stream_cut_by_seconds_and_resumed_gives_the_uncut_frames(cut):
    """1 s + 1 s resumed == 2 s, bit for bit; the frame count, audio offset and instruction carry over."""
    whole, first, second = cut["whole"], cut["first"], cut["second"]
    assert len(whole) == 53 and len(first) == 25 and len(second) == 28     # 14 chunks: 1 + 4 x 13 frames
    assert np.array_equal(np.concatenate([first, second]), whole)
    a, b = cut["summaries"]
    assert a["state_saved"] and a["reason"] == "duration reached" and a["first_frame"] == 0
    assert (b["first_frame"], b["frames"], b["chunks"]) == (25, 53, 14)     # the count goes on
    assert b["audio_samples"] - a["audio_samples"] == 28 * SR // 25
    assert b["instructions"] == [[0, "a person waving"]]                     # the state's, from the first run


@pytest.fixture(scope="module")
def parts(inputs):
    from stages.stream.session import load_parts
    return load_parts(inputs["face"], inputs["ckpt"], settings={"recache": True}, decoder_weights=inputs["tae"])


class Recorder:
    """A sink that keeps the frames it is given and runs actions[n]() after its n-th write."""

    def __init__(self, actions: dict | None = None):
        self.frames, self.actions = [], actions or {}

    def write(self, frames, audio):
        self.frames.append(frames)
        if len(self.frames) in self.actions:
            self.actions[len(self.frames)]()

    def stats(self, s):
        pass

    def close(self):
        pass


def session(inputs, parts, seconds: float, actions=None, resume: dict | None = None, save=None):
    """run_session over the speech file (from the state's offset when resuming), as `vidu stream` runs it,
    with `parts`' model and a fresh engine: (frames, summary)."""
    from stages.stream.engine import StreamEngine
    from stages.stream.io import open_audio
    from stages.stream.session import SessionOptions, run_session
    engine = StreamEngine(parts.engine.model, parts.cfg, parts.engine.st)
    engine.start(parts.engine.ref)
    events = EventQueue()
    rec = Recorder({n: (lambda a=a: a(events)) for n, a in (actions or {}).items()})
    source = open_audio(str(inputs["audio"]), events, start=resume["audio_samples"] if resume else 0)
    try:
        summary = run_session(dataclasses.replace(parts, engine=engine), events, [rec],
                              SessionOptions(max_seconds=seconds), resume=resume, save=save)
    finally:
        source.close()
    return np.concatenate(rec.frames), summary


def test_ctrl_c_with_an_instruction_at_the_cut_resumes_exactly(inputs, parts, tmp_path):
    """An instruction after chunk 2, and one typed just as Ctrl-C stops the stream after chunk 5: it is
    still queued at the cut, so the state carries it and it acts at chunk 5 as in the uncut stream (where,
    with --recache, the history is re-read under it). Negative controls: the same state with the noise
    generator reset, or with the caches zeroed, gives other frames."""
    from stages.stream.state import identity, read_state, write_state

    def say(text):
        return lambda events: events.put(Instruction(text))

    def say_and_stop(events):
        events.put(Instruction("a person nodding"))
        os.kill(os.getpid(), signal.SIGINT)              # handled between chunks: the state stays whole

    whole, ref = session(inputs, parts, 37 / 25, {2: say("a person raising a hand"), 5: say("a person nodding")})
    path = tmp_path / "s.state"
    first, summary = session(inputs, parts, 37 / 25, {2: say("a person raising a hand"), 5: say_and_stop},
                             save=lambda st: write_state(path, st, identity(parts, inputs["face"])))
    assert summary["reason"] == "interrupted" and summary["state_saved"] and len(first) == 17
    state, _ = read_state(path)
    second, end = session(inputs, parts, 20 / 25, resume=state)
    assert np.array_equal(np.concatenate([first, second]), whole)
    assert end["instructions"] == ref["instructions"] == [(0, "a person talking to the camera"),
                                                          (2, "a person raising a hand"), (5, "a person nodding")]
    reset = dict(state, **{"engine.gen": torch.Generator().manual_seed(0).get_state()})
    assert not np.array_equal(session(inputs, parts, 4 / 25, resume=reset)[0], whole[17:21])
    zeroed = {k: torch.zeros_like(v) if k.startswith(("engine.k.", "engine.v.")) else v for k, v in state.items()}
    assert not np.array_equal(session(inputs, parts, 4 / 25, resume=zeroed)[0], whole[17:21])


@pytest.mark.parametrize("args, message", [
    (["--resume", "{dir}/missing.state"], "cannot resume from {dir}/missing.state: no such file"),
    (["--resume", "{dir}/damaged.state"], "it is damaged or not a safetensors file"),
    (["--resume", "{dir}/dit.safetensors"], "it is not a state written by vidu stream --save-state"),
    (["--resume", "{state}", "--image", "{dir}/other.png"], "it was saved from another --image"),
    (["--resume", "{state}", "--ckpt", "{dir}/tall.safetensors"], "it was saved at 64x64, this stream is 64x128"),
    (["--resume", "{state}", "--preset", "tiny"], "it was saved from another model"),
    (["--resume", "{state}", "--no-recache"], "it was saved with recache True, this stream has False"),
    (["--resume", "{state}", "--kernels"], "it was saved with --no-kernels, this stream has --kernels"),
    (["--resume", "{state}", "--attention", "int8"], "it was saved with --attention sdpa, this stream has --attention int8"),
    (["--resume", "{state}", "--gpus", "2"], "--save-state and --resume keep the state of one process"),
    (["--save-state", "{dir}/nowhere/s.state"], "the folder {dir}/nowhere does not exist"),
])
def test_a_state_of_another_stream_or_a_bad_file_is_refused_in_one_line(inputs, cut, args, message):
    fill = {"dir": inputs["dir"], "state": cut["state"]}
    args = [a.format(**fill) for a in args]
    ours = {"--image": inputs["face"], "--ckpt": inputs["ckpt"], "--decoder-weights": inputs["tae"]}
    skip = set(args) | ({"--ckpt", "--decoder-weights"} if "--preset" in args else set())
    base = [str(x) for flag, value in ours.items() if flag not in skip for x in (flag, value)]
    res = cli("stream", *base, "--audio", str(inputs["audio"]), "--out", "-",
              "--recache", "--seconds", "0.2", *args, check=False)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(lines) == 1 and message.format(**fill) in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_a_state_of_an_older_format_is_refused_by_name(tmp_path, monkeypatch):
    """Format 1 cached keys before RoPE (format 2: rotated at absolute positions, ref and sink kept before RoPE
    too): read as format 2 it would stream garbage or fail on a missing tensor; it is refused in one line."""
    from stages.stream import state as state_mod
    from stages.stream.events import StreamError
    path = tmp_path / "old.state"
    monkeypatch.setattr(state_mod, "FORMAT", "vidu stream state 1")
    state_mod.write_state(path, {"chunks": 3, "engine.k.clean.0": torch.zeros(2)}, {"image": "x"})
    monkeypatch.undo()
    with pytest.raises(StreamError, match=r"another version of vidu stream \('vidu stream state 1'; this one reads "
                                          r"'vidu stream state 2'\)"):
        state_mod.read_state(path)
    monkeypatch.setattr(state_mod, "FORMAT", "vidu stream state 2")           # the control: the same file, current
    state_mod.write_state(path, {"chunks": 3, "engine.k.clean.0": torch.zeros(2)}, {"image": "x"})
    assert state_mod.read_state(path)[0]["chunks"] == 3
