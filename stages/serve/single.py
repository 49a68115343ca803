"""`vidu stream --serve HOST:PORT`: the stream's one session on `vidu serve`'s server (one web stack).

PageSink is a Sink of `vidu stream` (write / stats / close). It runs the app of stages/serve/app.py on an
event loop thread of its own, with no model and no scheduler: its one session is the stream's, whose chunk
loop `vidu stream` runs (stages/stream/session.py: run_session) and whose chunks land here. The page, its
WebRTC video and audio tracks, the data channel (instructions, push-to-talk, say, spoken commands), the
limits, the token rule and /metrics are vidu serve's. Differences: the page opens the stream's session from
its address (http://HOST:PORT/#session=ID, printed by `vidu stream`; http://HOST:PORT/ opens it too); POST
/sessions is refused (503); the
session is not closed for want of a viewer or input (the stream ends it); and the stream does not wait for a
viewer: frames nobody is watching are dropped past `ahead_chunks` chunks.

    sink = PageSink("127.0.0.1", 8000, fps=25.0, voice="en-us")
    run_session(parts, events, [sink], opts)      # attach(session) at its start; write(rgb, audio) per chunk
"""
from __future__ import annotations

import asyncio
import threading

import numpy as np

from stages.serve.app import STATE, create_app
from stages.serve.model import Profile
from stages.serve.options import ServeError, ServeOptions, check_bind
from stages.serve.sessions import ServeSession, new_id
from stages.stream.events import SAMPLE_RATE, StreamError
from stages.stream.say import DEFAULT_VOICE

START_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 10.0


class PageSink:
    """Serve one stream's session to browsers (see the module). `commands`: a live spotter of spoken
    instructions in the page's push-to-talk (stages.serve.sessions.voice_commands), or None. `url` is the
    page's address, told to `announce(url)` once the session is there to open (attach); `session` the
    ServeSession from then on."""

    def __init__(self, host: str, port: int, fps: float = 25.0, voice: str = DEFAULT_VOICE, commands=None,
                 token: str | None = None, title: str = "vidu stream", announce=None):
        try:
            self.opts = ServeOptions.from_env(token, host=host, port=port, max_sessions=1)
            check_bind(self.opts)
        except ServeError as e:
            raise StreamError(str(e)) from None
        self.fps, self.voice, self.commands, self.title, self.announce = fps, voice, commands, title, announce
        self.id = new_id()
        self.session: ServeSession | None = None
        self._keep = 0                            # frames kept unsent (attach: ahead_chunks + 1 chunks)
        self.closed = False
        self.loop = asyncio.new_event_loop()
        self._runner = None
        self._started = threading.Event()
        self._error: str | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="vidu-page")
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S):
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise StreamError(f"the page's server did not start within {START_TIMEOUT_S:g} s")
        if self._error:                           # the thread has ended, its loop closed
            self._thread.join(CLOSE_TIMEOUT_S)
            raise StreamError(self._error)

    # -- the event loop thread
    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except ServeError as e:
            self._error = str(e)
        except Exception as e:  # noqa: BLE001  -- reported to the constructor in one line
            self._error = f"cannot serve on {self.opts.host}:{self.opts.port}: {type(e).__name__}: {e}"
        self._started.set()
        if self._error is None:
            self.loop.run_forever()
        self.loop.close()

    async def _start(self) -> None:
        from aiohttp import web
        self.app = create_app(self.opts, [], single=True, title=self.title)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.opts.host, self.opts.port)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise ServeError(f"cannot serve on {self.opts.host}:{self.opts.port}: {e.strerror or e}") from None
        port = self._runner.addresses[0][1]
        host = f"[{self.opts.host}]" if ":" in self.opts.host else self.opts.host
        self.url = f"http://{host}:{port}/#session={self.id}"
        self.base = f"http://{host}:{port}/"

    def _call(self, fn, *args, timeout: float = CLOSE_TIMEOUT_S):
        """fn(*args) (a coroutine function) on the event loop; its result."""
        return asyncio.run_coroutine_threadsafe(fn(*args), self.loop).result(timeout)

    # -- the Sink side (the stream's thread)
    def attach(self, session) -> None:
        """The stream's Session (stages/stream/session.py), before its first chunk: served from now on."""
        async def add():
            cfg, st = session.p.cfg, session.p.engine.st
            video_s = cfg.audio.video_frames_per_latent * st.chunk_frames / cfg.audio.fps
            profile = Profile("stream", st, cfg.height, cfg.width, video_s)
            self._keep = int(np.ceil((self.opts.ahead_chunks + 1) * video_s * self.fps))
            s = ServeSession(session, profile, None, self.opts, self.app[STATE].metrics, self.loop, self.voice,
                             cfg.audio.fps, sid=self.id, commands=self.commands)
            self.app[STATE].sessions[s.id] = s
            return s
        self.session = self._call(add)
        if self.announce is not None:
            self.announce(self.url)

    def write(self, frames: np.ndarray, audio: np.ndarray | None) -> None:
        if self.closed:
            raise StreamError("the page's server is closed")
        if self.session is not None:
            self.loop.call_soon_threadsafe(self._push, frames, audio)

    def _push(self, frames: np.ndarray, audio: np.ndarray | None) -> None:
        s = self.session
        if s.closed is not None:
            return
        s.timeline.push(frames, audio, keep=self._keep)
        # push-to-talk speech the engine has taken: at most the chunk's own length of it (the rest of what it
        # heard may be --audio's)
        s.audio_used = min(s.audio_in, s.audio_used + int(round(len(frames) / self.fps * SAMPLE_RATE)))

    def stats(self, stats: dict) -> None:
        pass

    def counts(self) -> dict:
        """Frames sent to viewers, dropped (a viewer read late) and unwatched (skipped: no viewer, or one
        behind by more than `ahead_chunks`), for the stream's summary."""
        tl = self.session.timeline if self.session is not None else None
        return {"frames_sent": tl.sent if tl else 0, "frames_dropped": tl.dropped if tl else 0,
                "frames_unwatched": tl.skipped if tl else 0}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.session is not None:
                self._call(self.session.close, "stream ended")
            if self._runner is not None:
                self._call(self._runner.cleanup)
        except (TimeoutError, RuntimeError):
            pass                                  # a loop already stopped or stuck: the thread is a daemon
        finally:
            if not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(CLOSE_TIMEOUT_S)
