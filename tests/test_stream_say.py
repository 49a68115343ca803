"""`vidu stream --say TEXT --voice NAME` (typed text spoken offline by espeak-ng as the character's
speech) on the tiny preset with random weights, and the glue it shares with the page's "say" toggle
(stages/stream/say.py; the page's own path: tests/test_stream_web.py)."""
from __future__ import annotations

import json
import struct

import av
import numpy as np
import pytest

from stages.sense.media import load_audio
from stages.stream.events import StreamError
from stages.synth.speech import tts
from tests.conftest import cli, vidu, scramble_stream_models, write_face

SR = 16000
TEXT = "hello"
OTHER = "en-gb-x-rp+m2"
FAST = ("--steps", "1", "--no-twin")     # frames are noise either way (random weights); 2-core CI


@pytest.fixture(scope="module")
def face(tmp_path_factory):
    d = tmp_path_factory.mktemp("say")
    return write_face(d / "face.png")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> list[str]:
    """--ckpt and --decoder-weights: the tiny preset and TAEHV with random weights large enough that
    the speech changes the frames (at the default init it does not), as test_stream_cli perturbs them."""
    import torch
    from models.checkpoint import save_model
    from models.config import PRESETS
    from models.dit import DiT
    from models.taehv import TAEHV
    d = tmp_path_factory.mktemp("weights")
    dit, tae = DiT(PRESETS["tiny"].dit), TAEHV()
    scramble_stream_models(dit, tae)
    save_model(d / "dit.safetensors", dit, PRESETS["tiny"])
    torch.save(tae.state_dict(), d / "taehv.pth")
    return ["--ckpt", str(d / "dit.safetensors"), "--decoder-weights", str(d / "taehv.pth")]


def write_f32_wav(path, samples: np.ndarray) -> None:
    """A 16 kHz mono IEEE-float WAV: the samples exactly (the stdlib's wave writes integers only)."""
    data = np.asarray(samples, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, SR, 4 * SR, 4, 32)
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
                     + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def expected_frames(samples: int) -> int:          # as tests/test_stream_cli.py: 1 frame, then 4 per chunk
    return 1 + 4 * -(-(samples - 640) // 2560)


def audio_seconds(path) -> float:
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        return float(a.duration * a.time_base)


def video_frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def similarity(track: np.ndarray, speech: np.ndarray) -> float:
    """The best correlation of `speech` with `track` over lags of +-30 ms (AAC's priming and
    padding), on the speech's length."""
    best = -1.0
    for lag in range(-480, 481, 4):
        a, b = track[max(lag, 0):], speech[max(-lag, 0):]
        a, b = a[:min(len(a), len(b))], b[:min(len(a), len(b))]
        best = max(best, float(np.corrcoef(a, b)[0, 1]))
    return best


def stream(face, out, *extra):
    """The real CLI in a process of its own, as a user runs it. The frames are compared as decoded from
    the mp4s, and libx264 is reproducible only from a fresh process: it reads memory it never
    initialised, so inside the full suite's process the --say and --audio files differed (2 of 3 CI
    rehearsals) though the streams' frames did not (tests/test_stream_pure.py)."""
    model = () if "--ckpt" in extra else ("--preset", "tiny")      # random weights unless a checkpoint is given
    res = vidu("stream", *model, "--image", str(face), "--out", str(out), "--summary", str(out.with_suffix(".json")),
              "-q", *FAST, *extra)
    return res, json.loads(out.with_suffix(".json").read_text())


def test_say_is_the_speech_the_audio_track_and_the_lips_hear(face, weights, tmp_path):
    """--say gives the mp4 tts()'s speech as its audio track and the video an --audio file of the
    same samples gives (frame for frame); another --voice gives other speech (negative control)."""
    mine, other = tts(TEXT, "en-us").audio, tts(TEXT, OTHER).audio
    _, summary = stream(face, tmp_path / "said.mp4", "--say", TEXT, *weights)
    assert summary["reason"] == "audio ended" and summary["said"]["voice"] == "en-us"
    track = load_audio(tmp_path / "said.mp4", SR)
    n = expected_frames(len(mine))
    assert summary["frames"] == n and abs(audio_seconds(tmp_path / "said.mp4") - n / 25) < 0.05
    assert similarity(track, mine) > 0.9
    assert np.abs(track[len(mine) + 800:]).max(initial=0) < 0.02        # then the padding: silence

    write_f32_wav(tmp_path / "speech.wav", mine)                       # the same samples as an --audio file
    stream(face, tmp_path / "file.mp4", "--audio", str(tmp_path / "speech.wav"), *weights)
    said, filed = video_frames(tmp_path / "said.mp4"), video_frames(tmp_path / "file.mp4")
    assert said.shape == filed.shape and said.shape[0] == n
    assert np.array_equal(said, filed)                                 # the lips heard the same

    _, summary = stream(face, tmp_path / "other.mp4", "--say", TEXT, "--voice", OTHER, *weights)
    track2 = load_audio(tmp_path / "other.mp4", SR)
    assert summary["said"]["voice"] == OTHER and summary["frames"] == expected_frames(len(other))
    assert similarity(track2, other) > 0.9
    assert similarity(track2, mine) < 0.5 and similarity(track, other) < 0.5
    voiced = video_frames(tmp_path / "other.mp4")
    assert not np.array_equal(said[1:], voiced[1:len(said)])           # other speech, other lips


@pytest.mark.parametrize("args, message", [
    (["--say", TEXT, "--audio", "{face}"], "--say and --audio"),
    (["--say", ""], "nothing to say"),
    (["--say", "   "], "nothing to say"),
    (["--say", TEXT, "--voice", "xx-nowhere"], "unknown voice 'xx-nowhere'"),
    (["--say", TEXT, "--voice", "en-us+nobody"], "unknown voice 'en-us+nobody'"),
    (["--serve", "127.0.0.1:0", "--voice", "xx-nowhere"], "unknown voice 'xx-nowhere'"),
])
def test_bad_say_or_voice_is_one_line(face, tmp_path, args, message):
    args = [a.format(face=face) for a in args]
    out = [] if "--serve" in args else ["--out", str(tmp_path / "never.mp4")]
    res = cli("stream", "--preset", "tiny", "--image", str(face), *out, *args, check=False)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "never.mp4").exists()
    if "voice" in message:
        assert "LANGUAGE[+VARIANT]" in lines[0] and "voices/!v" in lines[0]     # how to find valid ones


def test_speech_is_the_voices_tts_and_bad_text_or_voice_is_one_line():
    from stages.stream.say import speech
    expect = tts(TEXT, "en-us+f3").audio
    assert np.array_equal(speech(f"  {TEXT} ", "en-us+f3"), expect)
    assert not np.array_equal(speech(TEXT), expect[:len(speech(TEXT))])     # the voice matters
    for bad in ("", " \n"):
        with pytest.raises(StreamError, match="nothing to say"):
            speech(bad)
    with pytest.raises(StreamError, match="unknown voice") as err:
        speech(TEXT, "xx-nowhere")
    assert "\n" not in str(err.value) and "ada, bea, ben" in str(err.value)     # the character voices named
    # a character voice (the page's choice, `vidu eval --voice`'s names) is its espeak-ng voice at its pitch
    from stages.synth.voice import VOICES
    assert VOICES["ada"] == ("en-us+Annie", 55)
    ada = speech(TEXT, "ada")
    assert np.array_equal(ada, tts(TEXT, "en-us+Annie", pitch=55).audio)
    assert not np.array_equal(ada[:4000], tts(TEXT, "en-us+Annie").audio[:4000])   # the pitch is ada's, not 50
