"""One served character as the server sees it: its session in a core (stages/serve/core.py: engine
caches, ring, audio FIFO; here a RemoteSession) or in a `vidu stream` (stages/serve/single.py), its events
(sent there), its timeline of output, its
instruction history, and its current viewer (a peer connection with a video track, an audio track and
the "control" data channel).

Data channel messages (text is JSON, binary is speech):
  {"type": "instruction", "text": "...", "id": any}  -> Instruction on the queue; reply {"type": "ack", "id",
                                                        "text", "chunk": the chunk it acts from}
  {"type": "say", "text": "...", "id": any}          -> the text spoken by espeak-ng in the session's voice, as
                                                        push-to-talk audio; reply {"type": "ack", ...}
  binary: s16le 16 kHz mono PCM                      -> AudioChunk (push-to-talk); nothing replied, but a
                                                        command spotted in it (an action the model knows, said:
                                                        "raise your hand") becomes an instruction, sent as
                                                        {"type": "command", "text", "chunk", "source": "voice"}
  anything else                                      -> {"type": "error", "error": "...", "id"}

Memory is bounded: the output is at most `ahead_chunks` (+ 1 in a batch) chunks ahead of the viewer, push-to-talk
speech at most `max_audio_buffer_s` ahead of the engine, the history at most `history` entries; the
engine's caches are allocated once (stages/stream/engine.py).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque

import numpy as np

from stages.serve.media import AUDIO_RATE, AudioTrack, Timeline, VideoTrack
from stages.serve.metrics import Metrics, log
from stages.serve.profile import Profile
from stages.serve.options import ServeOptions
from stages.stream.events import MAX_INSTRUCTION_CHARS, SAMPLE_RATE, AudioChunk, Instruction, StreamError


class TokenBucket:
    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.t = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def new_id() -> str:
    return uuid.uuid4().hex


class _Heard:
    """The spotter's side of a session (VoiceCommands puts an Instruction here from its thread): the command
    goes to the event loop, where it is queued and recorded like a typed instruction."""

    def __init__(self):
        self.session: ServeSession | None = None

    def put(self, event) -> None:
        s = self.session
        if s is not None and isinstance(event, Instruction):
            s.loop.call_soon_threadsafe(s.heard, event.text)


def voice_commands(fps: float):
    """A live spotter of spoken commands for one session (the first one made loads the classifier: seconds,
    so call it off the event loop); `.events.session` is set by the ServeSession that takes it."""
    from stages.stream.commands import VoiceCommands
    return VoiceCommands(_Heard(), live=True, fps=fps)


class RemoteSession:
    """The server's view of a session that runs in the core (stages/serve/core.py): its counts as of the
    last chunk, and its event queue, whose events travel to the core."""

    def __init__(self, core, sid: str, instruction: str):
        """`instruction`: the one in force at the start (the core's, or the stream's)."""
        self.chunks = self.frames = 0
        self.instruction = instruction
        self.events = _Events(core, sid)


class _Events:
    def __init__(self, core, sid: str):
        self.core, self.sid = core, sid

    def put(self, event) -> None:
        self.core.send("event", self.sid, event)


class ServeSession:
    """`session`: a RemoteSession, whose chunks are made in a core (`core` its CoreHandle) or, for `vidu stream
    --serve` (stages/serve/single.py), by the stream (`core` the link to it; `keep`: at most this many frames
    stay unsent, the older ones skipped, since the stream does not wait for a viewer)."""

    def __init__(self, session, profile: Profile, core, opts: ServeOptions, metrics: Metrics,
                 loop: asyncio.AbstractEventLoop, voice: str, fps: float, sid: str | None = None, commands=None,
                 keep: int | None = None):
        self.id = sid or new_id()
        self.session, self.events = session, session.events
        self.profile, self.core, self.opts, self.metrics, self.loop = profile, core, opts, metrics, loop
        self.worker = core.index                        # the worker (device) it is pinned to
        self.voice = voice
        self.fps = fps
        self.keep = keep
        self.timeline = Timeline(self.fps, opts.lead_s)
        self.timeline.changed = self._timeline_changed
        self._told = (None, None)                       # the viewer's clock (offset, since) as last told the core
        self._wakes: list[int] = []                     # viewer positions the core wants to hear of (CoreSession.wakes)
        self.history: deque[dict] = deque(maxlen=opts.history)
        self.created = self.last_input = time.monotonic()
        self.viewer_left: float | None = self.created  # no viewer since (None: one is connected)
        self.pc = None
        self.channel = None
        self.messages = TokenBucket(opts.messages_per_s, opts.message_burst)
        self.audio_in = 0                               # push-to-talk samples received
        self.audio_used = 0                             # ... and consumed by the engine
        self.closed: str | None = None
        self.error: str | None = None
        self.degraded: list[str] = []                   # profiles switched to while running
        self.commands = commands                        # voice_commands(): spoken instructions in push-to-talk
        self._spotter = None
        if commands is not None:
            commands.events.session = self
            self._spotter = commands.tap()

    # -- what the core tells (the event loop)
    def delivered(self, rgb: np.ndarray, audio, info: dict) -> None:
        """A chunk from the core: onto the timeline; the counts it carries."""
        s = self.session
        s.chunks, s.frames, s.instruction = info["chunks"], info["frames"], info["instruction"]
        self.audio_used = min(self.audio_in, self.audio_used + info["audio_real"])
        if self.closed is None:
            self.timeline.push(rgb, audio, keep=self.keep)
            self._wakes = info.get("wakes", [])
            self._timeline_changed()

    def switched(self, profile: Profile, wakes: list[int]) -> None:
        """The core moved this session to fewer steps (its measured load outgrew the budget)."""
        self.profile = profile
        self.degraded.append(profile.name)
        self._wakes = wakes
        self._timeline_changed()

    def failed(self, error: str) -> None:
        self.error = error
        log("session_failed", session=self.id, error=error)
        asyncio.ensure_future(self.close("error"))

    def _timeline_changed(self) -> None:
        """Tell the core where the viewer is when its clock moved or it reached a position the core waits for."""
        tl = self.timeline
        reached = [w for w in self._wakes if w <= tl.next_frame]
        if (tl.offset, tl.since) == self._told and not reached:
            return
        self._wakes = [w for w in self._wakes if w > tl.next_frame]
        self._told = (tl.offset, tl.since)
        self.core.send("timeline", self.id, tl.offset, tl.since, tl.next_frame)

    # -- event loop side
    def info(self) -> dict:
        return {"id": self.id, "profile": self.profile.describe(), "fps": self.fps,
                "width": self.profile.width, "height": self.profile.height, "voice": self.voice,
                "chunks": self.session.chunks, "frames": self.session.frames, "frames_sent": self.timeline.sent,
                "frames_dropped": self.timeline.dropped, "stalled_s": round(self.timeline.stalled_s, 3),
                "frames_buffered": self.timeline.buffered(), "frames_unwatched": self.timeline.skipped,
                "audio_held_s": round(self.timeline.audio.size / AUDIO_RATE, 4),
                "viewer": self.viewer_left is None, "instruction": self.session.instruction,
                "history": list(self.history), "worker": self.worker, "error": self.error,
                "degraded": list(self.degraded)}

    def instruct(self, text, source: str = "text") -> dict:
        """Validate and queue an instruction (`source`: text, typed; voice, spotted in speech); its history
        entry (StreamError for a bad one)."""
        if not isinstance(text, str) or not text.strip():
            raise StreamError("the instruction is empty")
        text = text.strip()
        if len(text) > MAX_INSTRUCTION_CHARS:
            raise StreamError(f"the instruction has {len(text)} characters, more than {MAX_INSTRUCTION_CHARS}")
        self.events.put(Instruction(text))
        self.last_input = time.monotonic()
        self.metrics.inc("instructions")
        entry = {"text": text, "chunk": self.session.chunks, "t": round(time.time(), 3), "source": source}
        self.history.append(entry)
        log("instruction", session=self.id, chars=len(text), chunk=entry["chunk"], source=source)
        return entry

    def heard(self, text: str) -> None:
        """A command the spotter heard in this session's speech (the event loop): queued like a typed one, and
        told to the viewer."""
        if self.closed is not None:
            return
        entry = self.instruct(text, source="voice")
        self.metrics.inc("voice_commands")
        if self.channel is not None:
            self._reply(self.channel, {"type": "command", **entry})

    def speech(self, samples: np.ndarray) -> None:
        """Push-to-talk samples [N] float32 16 kHz (StreamError when too much is already waiting)."""
        waiting = (self.audio_in - self.audio_used) / SAMPLE_RATE
        if waiting + len(samples) / SAMPLE_RATE > self.opts.max_audio_buffer_s:
            raise StreamError(f"{waiting:.1f} s of speech is already waiting (at most {self.opts.max_audio_buffer_s:g} s)")
        self.events.put(AudioChunk(samples))
        if self._spotter is not None:
            self._spotter.put(AudioChunk(samples))
        self.audio_in += len(samples)
        self.last_input = time.monotonic()
        self.metrics.inc("audio_samples", len(samples))

    async def connect(self, offer_sdp: str, offer_type: str):
        """A viewer's SDP offer -> the answer (RTCSessionDescription). A previous viewer is replaced:
        the character, its caches and history go on (reconnect)."""
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
        await self._drop_viewer()
        ice = self.opts.ice()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(**d) for d in ice])) if ice else RTCPeerConnection()
        self.pc = pc
        self.timeline.restart()
        pc.addTrack(VideoTrack(self.timeline))
        pc.addTrack(AudioTrack(self.timeline))

        @pc.on("datachannel")
        def on_channel(channel):
            self.channel = channel
            channel.on("message", lambda m: self._message(channel, m))

        @pc.on("connectionstatechange")
        async def on_state():
            if pc is self.pc and pc.connectionState in ("failed", "closed", "disconnected"):
                await self._drop_viewer()

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type=offer_type))
            await pc.setLocalDescription(await pc.createAnswer())
        except BaseException:
            self.pc = None
            await pc.close()
            raise
        self.viewer_left = None
        self.last_input = time.monotonic()
        self.core.send("viewer", self.id, True)
        log("viewer_connected", session=self.id)
        return pc.localDescription

    async def _drop_viewer(self) -> None:
        pc, self.pc, self.channel = self.pc, None, None
        if self.viewer_left is None:
            self.viewer_left = time.monotonic()
            self.core.send("viewer", self.id, False)
            log("viewer_left", session=self.id)
        if pc is not None:
            await pc.close()

    def _reply(self, channel, obj: dict) -> None:
        if channel.readyState == "open":
            channel.send(json.dumps(obj))

    def _message(self, channel, message) -> None:
        if not self.messages.take():
            self.metrics.inc("messages_rejected")
            return self._reply(channel, {"type": "error", "error": "too many messages: slow down"})
        size = len(message) if isinstance(message, (bytes, str)) else 0
        if size > self.opts.max_message_bytes:
            self.metrics.inc("messages_rejected")
            return self._reply(channel, {"type": "error", "error": f"a message is at most {self.opts.max_message_bytes} bytes"})
        if isinstance(message, bytes):
            try:
                if len(message) % 2:
                    raise StreamError(f"{len(message)} bytes is not a whole number of s16le samples")
                self.speech(np.frombuffer(message, "<i2").astype(np.float32) / 32768.0)
            except StreamError as e:
                self.metrics.inc("messages_rejected")
                self._reply(channel, {"type": "error", "error": str(e)})
            return
        mid = None
        try:
            msg = json.loads(message)
            if not isinstance(msg, dict):
                raise ValueError
            mid = msg.get("id")
            kind = msg.get("type")
            if kind == "instruction":
                entry = self.instruct(msg.get("text"))
                self._reply(channel, {"type": "ack", "id": mid, **entry})
            elif kind == "say":
                text = msg.get("text")
                if not isinstance(text, str) or not text.strip():
                    raise StreamError("nothing to say: the text is empty")
                asyncio.ensure_future(self._say(channel, text.strip()[:MAX_INSTRUCTION_CHARS], mid))
            else:
                raise StreamError(f"unknown message type {kind!r}: expected instruction or say")
        except (ValueError, StreamError) as e:
            self.metrics.inc("messages_rejected")
            error = str(e) if isinstance(e, StreamError) else 'expected a JSON object {"type": ..., "text": ...}'
            self._reply(channel, {"type": "error", "id": mid, "error": error})

    async def _say(self, channel, text: str, mid) -> None:
        from stages.stream.say import speech
        try:
            samples = await asyncio.to_thread(speech, text, self.voice)
            self.speech(samples)
            self._reply(channel, {"type": "ack", "id": mid, "said": text, "seconds": len(samples) / SAMPLE_RATE})
        except StreamError as e:
            self._reply(channel, {"type": "error", "id": mid, "error": str(e)})

    async def close(self, reason: str) -> None:
        if self.closed is not None:
            return
        self.closed = reason
        self.core.send("close", self.id)
        self.timeline.close()
        # counted before the awaits below: the session has already left the table, so /metrics must see it closed
        self.metrics.inc("sessions_closed")
        self.metrics.inc("frames_sent", self.timeline.sent)
        self.metrics.inc("frames_dropped", self.timeline.dropped)
        self.metrics.inc("frames_unsent", self.timeline.buffered())
        await self._drop_viewer()
        if self.commands is not None:
            await asyncio.to_thread(self.commands.close)
        log("session_closed", session=self.id, reason=reason, chunks=self.session.chunks, error=self.error)
