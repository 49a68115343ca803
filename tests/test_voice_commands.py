"""Voice commands (stages/stream/commands.py): spotting in held-out espeak-ng speech, rejection of
speech without commands, and `vidu stream --commands FILE` end to end (tiny preset, random weights).

The spotter's classifier of the ACTIONS vocabulary ships with vidu (bf16): nothing is trained here
unless TRAINING changed without the shipped file being written again (a test says so). Cases:
eval-split voices (held-out languages and variants) and the pass rate measured on them, and real speech
held out of training (benchmarks/voice_commands.py measures more)."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from stages.stream import commands
from stages.stream.commands import CommandSpotter, phrases, spot
from stages.stream.events import EventQueue, Instruction
from stages.synth.speech import texts, tts, voices
from tests.conftest import vidu, write_face

ROOT = Path(__file__).resolve().parents[1]

SR = 16000
LEAD = ("We walked to the market today.", "Could you check the map for me?")   # speech before the command
HELD_OUT = ["en-us+m3", "en-gb-x-rp+f4", "en-029+m2", "nl+f1", "en+klatt3", "en-gb-scotland+travis"]
# measured (2026-12-04, the 2-member ensemble at p >= 0.95 in >= 2 windows): 45 of the 54 cases right (the single
# classifier of 2026-12-03: 47), 1 other detection (nl+f1: "turn left" for "turn right"; was 2). Missed: blink in
# 3 voices, nod in 3, and en-029+m2's turn left and raise a hand.
K_RIGHT, K_WRONG = 40, 2
CASES = [("en-us+m3", "raise your hand", "raise a hand"), ("en-gb-scotland+travis", "shake your head", "shake head"),
         ("en-gb-x-rp+f4", "smile", "smile"), ("en-gb-x-rp+f4", "nod", "nod")]


def test_the_shipped_classifier_serves_the_actions_vocabulary_without_training(tmp_path, monkeypatch):
    """The shipped file is the classifier the current TRAINING and features give (its key), small, and
    read without training or a cache; another vocabulary is not served by it (it would be trained)."""
    def no_training(*a, **k):
        raise AssertionError("trained")
    monkeypatch.setenv("VIDU_CACHE", str(tmp_path))
    monkeypatch.setattr(commands, "_MODELS", {})
    monkeypatch.setattr(commands, "train_classifier", no_training)
    assert commands.SHIPPED.stat().st_size < 256 * 1024
    net, meta = commands.classifier(phrases())
    assert meta["classes"] == sorted(set(phrases().values())) and net(np.zeros((1, commands.N_MELS, commands.WINDOW),
                                                                              np.float32)).shape == (1, 9)
    assert not list(tmp_path.iterdir())                       # nothing cached: nothing was trained
    with pytest.raises(AssertionError, match="trained"):
        commands.classifier(phrases(["blink", "nod"]))


def test_the_classifier_is_the_mean_of_its_members():
    """The shipped classifier holds TRAINING["members"] nets and gives the mean of their class probabilities,
    each member computed alone (its own weights as a one-member Ensemble) on real windows of speech.
    Negative controls: the members differ, so no member alone, and not the softmax of their mean logits,
    gives the same."""
    net, _ = commands.classifier(phrases())
    k = commands.TRAINING["members"]
    assert len(net.members) == k
    audio, _ = _said("en-us+m3", "turn left")
    frames = commands.log_mel(audio)
    x = commands._windows(frames, np.arange(0, len(frames) - commands.WINDOW, 4))
    from safetensors import safe_open
    with safe_open(str(commands.SHIPPED), "pt") as f:
        state = {name: f.get_tensor(name).float() for name in f.keys()}
    alone = [commands.Ensemble({n: v for n, v in state.items() if n.startswith(f"{i}.")})(x) for i in range(k)]
    p = net(x)
    assert p.shape == (len(x), 9) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert np.abs(p - np.mean(alone, 0)).max() < 1e-6
    if k > 1:
        assert min(np.abs(p - a).max() for a in alone) > 1e-2
        logits = np.mean([m(x) for m in net.members], 0)
        assert np.abs(p - commands._softmax(logits)).max() > 1e-4     # 6e-4 (2026-12-04): far over the 1e-6 above


def test_members_are_trained_with_consecutive_seeds(monkeypatch):
    """train_classifier trains member i with seed TRAINING["seed"] + i and keeps its weights under "<i>."
    (durations: the members' mean); the spotter loads every member."""
    import torch

    def member(phr, seed, log=None):
        w = torch.full((2,), float(seed))
        return {"classes": ["a"], "durations": {"a": float(seed)}, "state": {"0.weight": w}, "train_s": 1.0}
    monkeypatch.setattr(commands, "train_member", member)
    monkeypatch.setitem(commands.TRAINING, "seed", 7)
    monkeypatch.setitem(commands.TRAINING, "members", 3)
    meta = commands.train_classifier({"a": "a"})
    assert sorted(meta["state"]) == ["0.0.weight", "1.0.weight", "2.0.weight"]
    assert [float(meta["state"][f"{i}.0.weight"][0]) for i in range(3)] == [7.0, 8.0, 9.0]
    assert meta["durations"] == {"a": 8.0}


@functools.cache
def _lead(voice: str) -> np.ndarray:
    pause = np.zeros(SR // 2, np.float32)
    return np.concatenate([x for s in LEAD for x in (tts(s, voice).audio, pause)])


def _said(voice: str, phrase: str) -> tuple[np.ndarray, float]:
    """Two lead sentences, pauses, then "Okay, <phrase> now." in `voice`: (audio, the phrase's start s)."""
    pause = np.zeros(SR // 2, np.float32)
    lead = _lead(voice)
    u = tts(f"Okay, {phrase} now.", voice)
    first = phrase.split()[0]
    t = next(t for t, w in u.words if w.lower().strip(",.") == first)
    return np.concatenate([lead, u.audio, pause]), len(lead) / SR + t


def test_held_out_voices_and_phrases():
    """Every spoken form of every action in 6 eval voices: 54 cases, each alone in its clip."""
    assert set(HELD_OUT) <= set(voices("eval"))
    right, wrong = [], []
    for voice in HELD_OUT:
        for phrase, name in phrases().items():
            audio, t = _said(voice, phrase)
            found = spot(audio)
            ok = [c for c in found if c.text == name and abs(c.start - t) <= 0.3 and c.end > c.start]
            right += [(voice, phrase)] * bool(ok)
            wrong += [(voice, phrase, c.text, c.start) for c in found if c not in ok[:1]]
    assert len(right) >= K_RIGHT, (len(right), wrong)
    assert len(wrong) <= K_WRONG, wrong


@pytest.mark.parametrize("voice, phrase, name", CASES)
def test_command_in_a_sentence_is_spotted(voice, phrase, name):
    audio, t = _said(voice, phrase)
    found = spot(audio)
    assert [c.text for c in found] == [name]
    assert abs(found[0].start - t) <= 0.3 and found[0].end > found[0].start


def test_speech_without_commands_gives_nothing():
    """Negative control: a minute of eval sentences without any instruction, in held-out voices."""
    plain = [s for s in texts("eval") if not any(w in s.lower() for w in
             ("blink", "nod", "smile", "look", "turn", "shake", "raise", "wave", "open", "close"))][:30]
    vs = voices("eval")
    audio = np.concatenate([np.concatenate([tts(s, vs[(7 * i) % len(vs)]).audio, np.zeros(SR // 4, np.float32)])
                            for i, s in enumerate(plain)])
    assert len(audio) > 55 * SR
    assert spot(audio) == []


REAL_HELD_OUT = "speech/silero_test.wav"   # benchmarks/voice_commands.py REAL_SPLIT: never trained or tuned on
# measured (2026-12-04, the 2-member ensemble): no detection at the shipped bar; at p >= 0.5 in 1 window 1 ("raise a
# hand" 29.79 s; the single classifier of 2026-12-03: 4). The classifier shipped before real negatives (2026-12-02) fired
# twice at its bar ("nod" 16.95 s, "raise a hand" 29.79 s).
K_LOW_BAR = 1


def test_held_out_real_speech_gives_nothing(shared_media):
    """A minute of one person speaking (silero_test.wav, held out of training and tuning) gives no command.
    Controls: at a low bar (p >= 0.5 in 1 window) the same audio does fire, and "raise your hand" said
    into the middle of it (a held-out voice at the recording's level) is still found."""
    from stages.sense.media import load_audio
    assert REAL_HELD_OUT not in commands.TRAINING["real"]
    audio = load_audio(shared_media / REAL_HELD_OUT, SR)
    assert spot(audio) == []
    low = spot(audio, thresholds={n: 0.5 for n in phrases().values()}, min_windows=1)
    assert len(low) >= K_LOW_BAR, low
    u = tts("Okay, raise your hand now.", "en-us+m3")
    t = next(t for t, w in u.words if w.lower().strip(",.") == "raise")
    said = u.audio * np.sqrt(np.mean(audio ** 2) / np.mean(u.audio ** 2))
    k = 30 * SR
    found = spot(np.concatenate([audio[:k], said, audio[k:]]))
    assert [c.text for c in found] == ["raise a hand"] and abs(found[0].start - (30 + t)) <= 0.3, found


def test_chunking_does_not_change_detections():
    audio, _ = _said("en-gb-scotland+travis", "look up")
    small, whole = spot(audio, chunk=160), spot(audio, chunk=len(audio))
    assert [(c.text, c.start) for c in small] == [(c.text, c.start) for c in whole] and len(small) == 1
    assert abs(small[0].end - whole[0].end) <= 0.05


def test_unknown_word_is_refused():
    with pytest.raises(ValueError, match="dictionary has no"):
        CommandSpotter(actions=["frobnicate"])


def test_paced_release_waits_for_the_chunk():
    from stages.stream.commands import VoiceCommands
    from stages.stream.events import AudioChunk, AudioEnd
    audio, _ = _said("en-gb-scotland+travis", "look up")
    events = EventQueue()
    vc = VoiceCommands(events, live=False, fps=25.0, chunk_s=0.16)
    tap = vc.tap()
    for i in range(0, len(audio), 1600):
        tap.put(AudioChunk(audio[i:i + 1600]))
    tap.put(AudioEnd())
    frames = np.zeros((4, 2, 2, 3), np.uint8)
    released_after = None
    for k in range(int(len(audio) / SR / 0.16) + 2):
        vc.write(frames, None)
        if any(isinstance(e, Instruction) for e in events.drain()):
            released_after = k + 1                   # chunks written so far
            break
    vc.close()
    text, _, end, chunk = vc.log[0]
    assert text == "look up" and chunk == released_after
    assert (chunk - 1) * 0.16 <= end - 0.16 < chunk * 0.16 + 1e-9       # next chunk [chunk, chunk+1) * 0.16 covers the end


def test_the_listener_imports_torchaudio_before_its_thread_starts():
    """The listener's thread must not be the first to import torchaudio: the stream imports it in the main
    thread at the same moment, and two threads importing it at once fail (a partly initialised module; CI,
    session 37). In a fresh process: torchaudio is complete when the listener's thread starts; the
    negative control: it is not imported by importing the module alone."""
    code = (
        "import sys, threading\n"
        "from stages.stream.commands import VoiceCommands\n"
        "from stages.stream.events import EventQueue\n"
        "before = 'torchaudio' in sys.modules\n"
        "seen = []\n"
        "start = threading.Thread.start\n"
        "threading.Thread.start = lambda self: seen.append('torchaudio.functional' in sys.modules) or start(self)\n"
        "VoiceCommands(EventQueue(), live=False)\n"
        "print(before, seen[0])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]


def test_stream_with_spoken_commands(tmp_path):
    write_face(tmp_path / "face.png")
    audio, t = _said("en-us+m3", "turn left")
    with wave.open(str(tmp_path / "talk.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes())
    vidu("stream", "--preset", "tiny", "--image", str(tmp_path / "face.png"), "--audio", str(tmp_path / "talk.wav"),
         "--commands", str(tmp_path / "talk.wav"), "--out", str(tmp_path / "out.mp4"),
         "--summary", str(tmp_path / "s.json"), "-q", input="")
    s = json.loads((tmp_path / "s.json").read_text())
    [(text, start, end, chunk)] = s["voice_commands"]
    assert text == "turn left" and abs(start - t) <= 0.3
    # tiny preset: chunk 0 is 1 frame (0.04 s), every later chunk 4 frames (0.16 s) at 25 fps
    span = lambda k: (0.0, 0.04) if k == 0 else (0.04 + 0.16 * (k - 1), 0.04 + 0.16 * k)
    assert span(chunk)[0] <= end < span(chunk)[1] + 0.1
    assert [chunk, "turn left"] in s["instructions"]


def test_push_to_talk_audio_reaches_the_spotter(tmp_path):
    """What `vidu stream --serve` does with --commands page: the page's push-to-talk speech (a viewer's data
    channel, 0.1-s pieces of s16le, as the browser sends them) drives the lips and the spotter in the page's
    process, whose command becomes an instruction on the stream's queue and in the session's history
    (source voice); what the spotter heard is the sink's log after close."""
    import asyncio
    import time

    from aiohttp import ClientSession

    from stages.serve.single import PageSink
    from stages.stream.events import AudioChunk
    from stages.stream.session import Session, SessionOptions, load_parts
    from tests.test_serve_webrtc import Viewer
    audio, _ = _said("en-us+m3", "turn left")
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    events = EventQueue()
    sink = PageSink("127.0.0.1", 0, commands=True)
    try:
        sink.attach(Session(load_parts(write_face(tmp_path / "face.png"), seed=0), events, SessionOptions(live_audio=True)))

        async def talk():
            async with ClientSession() as http:
                v = Viewer()
                await v.connect(http, sink.base.rstrip("/"), sink.id)
                for i in range(0, len(pcm), SR // 10):
                    v.channel.send(pcm[i:i + SR // 10].tobytes())
                    await asyncio.sleep(0.02)
                got, deadline = [], time.monotonic() + 30
                while time.monotonic() < deadline and not (
                        any(isinstance(e, Instruction) for e in got)
                        and sum(len(e.samples) for e in got if isinstance(e, AudioChunk)) >= len(pcm)):
                    got += events.drain()
                    await asyncio.sleep(0.1)
                async with http.get(f"{sink.base}sessions/{sink.id}") as r:
                    info = await r.json()
                await v.close()
                return got, info
        got, info = asyncio.run(talk())
    finally:
        sink.close()
    assert Instruction("turn left") in got
    heard = np.concatenate([e.samples for e in got if isinstance(e, AudioChunk)])
    assert np.array_equal(heard, pcm.astype(np.float32) / 32768.0)                 # the lips get it all
    assert [(h["text"], h["source"]) for h in info["history"]] == [("turn left", "voice")]
    assert sink.log[0][0] == "turn left" and sink.log[0][3] is None and sink.error is None
