"""Spoken instructions, offline: a keyword spotter over the actions the model knows.

pocketsphinx's wheel ships an English acoustic model and CMUdict; its keyphrase search (kws)
tracks each command phrase against a phone loop and fires when the phrase's path beats the loop
by the phrase's threshold (no language model: the general one garbles espeak-ng speech, "raise
your hand" -> "the old and"). Not good enough yet: on held-out espeak-ng speech it finds 7 % of the
commands and fires 5.6 times per 10 minutes of other speech, more on real speech; no threshold
separates the two (benchmarks/RESULTS.md, 2026-12-01 voice commands).

    spotter = CommandSpotter()                       # the phrases of stages.synth.world.ACTIONS
    for cmd in spotter.feed(samples_16k):            # any chunk size, float32 in [-1, 1]
        print(cmd.text, cmd.start, cmd.end)          # "raise a hand" 6.88 7.55 (s from the first sample)
    spotter.finish()                                 # the end of the audio: flushes the last frames

`vidu stream --commands SRC` wires it in (VoiceCommands): audio from SRC (the --audio source, a
file, the mic or the page's push-to-talk) feeds the spotter on a thread; each command becomes an
Instruction(text) event. From a file or stdin it is paced by the stream's own clock: a command is
put on the queue just before the chunk whose time span covers the command's end, so it takes
effect at that chunk (the session reads events between chunks), however fast the stream runs.
From the mic or the page it is put as soon as it is spotted.

Thresholds are tuned on train-split espeak-ng speech and measured on the eval split by
`python benchmarks/voice_commands.py` (benchmarks/RESULTS.md); `tests/test_voice_commands.py`
checks them.
"""
from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

from stages.stream.events import SAMPLE_RATE, AudioChunk, AudioEnd, EventQueue, Instruction, StreamError

FRAME_S = 0.01               # pocketsphinx's frame shift
# Spoken forms of an action: its name, and what people say for it. Names not listed are spoken as
# written. Every word must be in CMUdict (checked when a spotter is made).
SPOKEN = {"shake head": ("shake your head",), "raise a hand": ("raise a hand", "raise your hand")}
# kws threshold per spoken phrase, as a power of ten (a path must beat the phone loop by 1e-N to
# fire): short phrases need strict ones. Tuned on train-split speech (benchmarks/voice_commands.py --tune).
THRESHOLDS = {"blink": -5, "nod": 5, "smile": 0, "look up": 0, "turn left": -20, "turn right": -20,
              "shake your head": -40, "raise a hand": -40, "raise your hand": -40}
DEFAULT_THRESHOLD = -20
REFIRE_S = 1.0               # the same action spotted again within this many seconds is one command


@dataclass(frozen=True)
class Command:
    text: str                # the ACTIONS name, e.g. "raise a hand"
    start: float             # s from the first sample fed
    end: float


def phrases(actions=None) -> dict[str, str]:
    """{spoken phrase: ACTIONS name} for `actions` (default: every stages.synth.world.ACTIONS name)."""
    if actions is None:
        from stages.synth.world import ACTIONS
        actions = list(ACTIONS)
    return {p: a for a in actions for p in SPOKEN.get(a, (a,))}


class CommandSpotter:
    """Streaming keyword spotter: `feed(samples)` -> the commands completed in them."""

    def __init__(self, actions=None, thresholds: dict[str, float] | None = None):
        import pocketsphinx
        self.phrases = phrases(actions)
        limits = {**THRESHOLDS, **(thresholds or {})}
        self.thresholds = {p: limits.get(p, DEFAULT_THRESHOLD) for p in self.phrases}
        model = pocketsphinx.get_model_path()
        dic = os.path.join(model, "en-us", "cmudict-en-us.dict")
        words = {w for p in self.phrases for w in p.split()}
        known = _dictionary_words(dic, words)
        if missing := sorted(words - known):
            raise StreamError(f"voice commands: pocketsphinx's dictionary has no {', '.join(missing)}")
        with tempfile.NamedTemporaryFile("w", suffix=".kws", delete=False) as f:   # kws takes a file
            f.write("".join(f"{p} /1e{t:+g}/\n" for p, t in self.thresholds.items()))
        try:
            self.decoder = pocketsphinx.Decoder(hmm=os.path.join(model, "en-us", "en-us"), dict=dic, lm=None,
                                                kws=f.name, loglevel="FATAL")
        finally:
            os.unlink(f.name)
        self.offset = 0.0        # s of audio in utterances already ended
        self.fed = 0             # samples fed
        self.last: dict[str, float] = {}
        self.seen: set[tuple[str, int]] = set()      # detections of this utterance already returned
        self.decoder.start_utt()

    @property
    def seconds(self) -> float:
        return self.fed / SAMPLE_RATE

    def feed(self, samples: np.ndarray) -> list[Command]:
        samples = np.asarray(samples, np.float32).reshape(-1)
        if not len(samples):
            return []
        self.fed += len(samples)
        pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
        self.decoder.process_raw(pcm, False, False)
        return self._detections()

    def finish(self) -> list[Command]:
        """The end of the audio: the last frames are decoded; the spotter can be fed again after."""
        self.decoder.end_utt()
        out = self._collect()
        self.offset += self.decoder.n_frames() * FRAME_S
        self.seen.clear()
        self.decoder.start_utt()
        return out

    def _detections(self) -> list[Command]:
        if self.decoder.hyp() is None:
            return []
        return self._collect()

    def _collect(self) -> list[Command]:
        out = []
        for seg in self.decoder.seg() or ():
            name = self.phrases.get(seg.word.strip())
            if name is None or (seg.word, seg.start_frame) in self.seen:
                continue
            self.seen.add((seg.word, seg.start_frame))
            start, end = self.offset + seg.start_frame * FRAME_S, self.offset + (seg.end_frame + 1) * FRAME_S
            if start - self.last.get(name, -1e9) < REFIRE_S:
                continue
            self.last[name] = start
            out.append(Command(name, round(start, 3), round(end, 3)))
        return sorted(out, key=lambda c: c.end)


def spot(samples: np.ndarray, actions=None, thresholds: dict[str, float] | None = None,
         chunk: int = 1600) -> list[Command]:
    """The commands in a whole clip, fed in `chunk`-sample pieces as a stream would be."""
    s = CommandSpotter(actions, thresholds)
    out = []
    for i in range(0, len(samples), chunk):
        out += s.feed(samples[i:i + chunk])
    return out + s.finish()


def _dictionary_words(path: str, words: set[str]) -> set[str]:
    found = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            w = line.split(" ", 1)[0]
            if w in words:
                found.add(w)
    return found


class VoiceCommands:
    """Spoken instructions for a stream: a spotter on its own thread, fed through `tap()`, turning
    commands into Instruction events on `events`.

    live (mic, the page): an Instruction is put as soon as its command is spotted.
    not live (a file, stdin): it is also a Sink of the session (its `write` sees each chunk's
    frames), and puts a command's Instruction right after the chunk before the one whose time span
    covers the command's end, so the session applies it at that chunk; before releasing, it waits
    (up to WAIT_S) for the spotter to have heard the audio up to the next chunk's end.
    `log` holds (text, start s, end s, chunk index it took effect at, or None when live)."""

    WAIT_S = 30.0
    LAG_S = 0.1                               # the spotter fires a few frames after a phrase ends

    def __init__(self, events: EventQueue, live: bool, fps: float = 25.0, chunk_s: float = 0.16,
                 spotter: CommandSpotter | None = None):
        self.events, self.live, self.fps, self.chunk_s = events, live, fps, chunk_s
        self.spotter = spotter or CommandSpotter()
        self.log: list[tuple[str, float, float, int | None]] = []
        self.error: str | None = None
        self._audio: queue.Queue = queue.Queue()
        self._pending: list[Command] = []
        self._heard = 0.0                     # s of audio the spotter has decoded
        self._ended = False
        self._cond = threading.Condition()
        self._frames = 0
        self._chunks = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="vidu-commands")
        self._thread.start()

    def tap(self, forward: EventQueue | None = None) -> _Tap:
        """An EventQueue stand-in for an audio source (io.open_audio) or the page (WebSink): its
        AudioChunk / AudioEnd events feed the spotter; with `forward` every event also goes on there."""
        return _Tap(self, forward)

    def _run(self) -> None:
        try:
            while True:
                item = self._audio.get()
                found = self.spotter.finish() if item is None else self.spotter.feed(item)
                with self._cond:
                    self._heard = self.spotter.seconds
                    self._ended = item is None
                    for cmd in found:
                        if self.live:
                            self.log.append((cmd.text, cmd.start, cmd.end, None))
                            self.events.put(Instruction(cmd.text))
                        else:
                            self._pending.append(cmd)
                    self._cond.notify_all()
                if item is None:
                    return
        except Exception as e:  # noqa: BLE001  -- a decoder failure stops voice commands, not the stream
            with self._cond:
                self.error, self._ended = f"voice commands stopped: {e}", True
                self._cond.notify_all()

    # -- the Sink side (not live): pace commands by the stream's clock --
    def write(self, frames: np.ndarray, audio: np.ndarray | None) -> None:
        self._frames += len(frames)
        self._chunks += 1
        if self.live:
            return
        horizon = self._frames / self.fps + self.chunk_s      # the end of the next chunk, s
        deadline = time.monotonic() + self.WAIT_S
        with self._cond:
            while not self._ended and self._heard < horizon + self.LAG_S and time.monotonic() < deadline:
                self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            due = [c for c in self._pending if c.end < horizon]
            self._pending = [c for c in self._pending if c.end >= horizon]
        for cmd in due:
            self.log.append((cmd.text, cmd.start, cmd.end, self._chunks))
            self.events.put(Instruction(cmd.text))

    def stats(self, stats: dict) -> None:
        pass

    def close(self) -> None:
        self._audio.put(None)
        self._thread.join(timeout=1.0)


class _Tap:
    def __init__(self, owner: VoiceCommands, forward: EventQueue | None):
        self.owner, self.forward = owner, forward

    def put(self, event) -> None:
        if isinstance(event, AudioChunk):
            self.owner._audio.put(np.asarray(event.samples, np.float32).reshape(-1))
        elif isinstance(event, AudioEnd):
            self.owner._audio.put(None)
        if self.forward is not None:
            self.forward.put(event)

    def __getattr__(self, name):             # drain / wait / depth of the queue it forwards to
        if self.forward is None:
            raise AttributeError(name)
        return getattr(self.forward, name)
