"""`vidu stream --serve HOST:PORT`: the stream's one session on `vidu serve`'s server (one web stack).

PageSink is a Sink of `vidu stream` (attach / write / stats / counts / close). The page's server (the app of
stages/serve/app.py, with no model) runs in a process of its own, as `vidu serve`'s models do
(stages/serve/core.py), so that the WebRTC side (RTP, SRTP, Opus, frame conversion, the data channel) never
holds the GIL the stream's chunk loop needs for its kernel launches. The two speak core.py's language, the
stream playing the core's part for its one session: the stream's chunks go to the page (their frames
through a ring in shared memory, stages/serve/ring.py), and the page's inputs (instructions, push-to-talk,
"say" speech, spoken commands heard by its spotter) come back as events onto the stream's queue.

The page, its WebRTC video and audio tracks, the data channel, the limits, the token rule and /metrics are
vidu serve's. Differences: the page opens the stream's session from its address (http://HOST:PORT/#session=ID,
printed by `vidu stream`; http://HOST:PORT/ opens it too); POST /sessions is refused (503); the session is not
closed for want of a viewer or input (the stream ends it); and the stream does not wait for a viewer: frames
nobody is watching are dropped past `ahead_chunks` chunks.

    sink = PageSink("127.0.0.1", 8000, fps=25.0, voice="en-us")
    run_session(parts, events, [sink], opts)      # attach(session) at its start; write(rgb, audio) per chunk

Messages (tuples over one duplex multiprocessing Connection):

  stream -> page                                          page -> stream
  ("attach", profile, fps, instruction, keep, ring name)  ("ready", url, base) | ("error", message)
  ("chunk", sid, Slot | frames, audio, info)              ("event", Instruction | AudioChunk)
  ("close",)                                              ("attached",)
                                                          ("counts", counts)       after every chunk
                                                          ("closed", counts, commands heard, error)
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading

import numpy as np

from stages.serve.options import ServeError, ServeOptions, check_bind
from stages.serve.profile import Profile
from stages.serve.ring import FrameRing, Slot
from stages.serve.sessions import new_id
from stages.stream.events import SAMPLE_RATE, StreamError
from stages.stream.say import DEFAULT_VOICE

START_TIMEOUT_S = 60.0             # the page's process: imports, the spotter's classifier, the bind
CLOSE_TIMEOUT_S = 10.0
NO_COUNTS = {"frames_sent": 0, "frames_dropped": 0, "frames_unwatched": 0}


class PageSink:
    """Serve one stream's session to browsers (see the module). `commands`: spot spoken instructions in the
    page's push-to-talk (stages.serve.sessions.voice_commands, in the page's process; what it heard is `log`
    after close, and `error` why it could not, as VoiceCommands has them). `url` is the page's address, told to `announce(url)` once the session is there
    to open (attach)."""

    def __init__(self, host: str, port: int, fps: float = 25.0, voice: str = DEFAULT_VOICE, commands: bool = False,
                 token: str | None = None, title: str = "vidu stream", announce=None, quiet: bool = False):
        try:
            self.opts = ServeOptions.from_env(token, host=host, port=port, max_sessions=1)
            check_bind(self.opts)
        except ServeError as e:
            raise StreamError(str(e)) from None
        self.fps, self.voice, self.announce = fps, voice, announce
        self.id = new_id()
        self.closed = False
        self.events = None                        # the stream's EventQueue (attach)
        self.session = None
        self.ring: FrameRing | None = None
        self._counts = dict(NO_COUNTS)
        self.log: list = []                       # the spotter's commands (commands=True), after close
        self.error: str | None = None             # ... and why it could not spot, if so
        self._closed_reply = threading.Event()
        self._attached = threading.Event()
        self._send_lock = threading.Lock()
        ctx = mp.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self._proc = ctx.Process(target=_page_main, args=(theirs, self.opts, fps, voice, title, commands, self.id, quiet),
                                 daemon=True, name="vidu-page")
        self._proc.start()
        theirs.close()
        if not self.conn.poll(START_TIMEOUT_S):
            self._proc.kill()
            raise StreamError(f"the page's server did not start within {START_TIMEOUT_S:g} s")
        try:
            first = self.conn.recv()
        except EOFError:
            self._proc.join(5)
            raise StreamError(f"the page's server ended while starting (exit code {self._proc.exitcode})") from None
        if first[0] == "error":
            self._proc.join(CLOSE_TIMEOUT_S)
            raise StreamError(first[1])
        _, self.url, self.base = first
        self._reader = threading.Thread(target=self._read, daemon=True, name="vidu-page-read")
        self._reader.start()

    def _send(self, *msg) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError, TypeError):
                break
            if msg[0] == "event" and self.events is not None:
                self.events.put(msg[1])
            elif msg[0] == "counts":
                self._counts = msg[1]
            elif msg[0] == "attached":
                self._attached.set()
            elif msg[0] == "closed":
                self._counts, self.log, self.error = msg[1:4]
                self._closed_reply.set()
        self._closed_reply.set()

    # -- the Sink side (the stream's thread)
    def attach(self, session) -> None:
        """The stream's Session (stages/stream/session.py), before its first chunk: served from now on."""
        from types import SimpleNamespace
        cfg, st = session.p.cfg, session.p.engine.st
        video_s = cfg.audio.video_frames_per_latent * st.chunk_frames / cfg.audio.fps
        # the page shows the profile; its settings travel as what it shows (unpickling StreamSettings would
        # import the engine, and torch with it, into the page's process)
        profile = Profile("stream", SimpleNamespace(steps=st.steps), cfg.height, cfg.width, video_s)
        keep = int(np.ceil((self.opts.ahead_chunks + 1) * video_s * self.fps))
        self.session, self.events = session, session.events
        chunk_bytes = cfg.height * cfg.width * 3 * int(np.ceil(video_s * self.fps))
        self.ring = FrameRing.create(chunk_bytes, self.opts.ahead_chunks + 2)      # None: frames through the pipe
        self._send("attach", profile, cfg.audio.fps, session.instruction, keep, self.ring.name if self.ring else None)
        if not self._attached.wait(START_TIMEOUT_S):              # the page opens the session once it is there
            raise StreamError("the page's server did not take the stream's session")
        if self.announce is not None:
            self.announce(self.url)

    def write(self, frames: np.ndarray, audio: np.ndarray | None) -> None:
        if self.closed:
            raise StreamError("the page's server is closed")
        if self.session is None:
            return
        s = self.session
        rgb = self.ring.put(frames) if self.ring is not None else None
        # push-to-talk speech the engine has taken: at most the chunk's own length of it (the rest of what it
        # heard may be --audio's); the page counts it against what it was sent
        heard = int(round(len(frames) / self.fps * SAMPLE_RATE))
        try:
            self._send("chunk", self.id, rgb if rgb is not None else frames, audio,
                       {"chunks": s.chunks, "frames": s.frames, "instruction": s.instruction, "audio_real": heard})
        except (OSError, ValueError):
            raise StreamError("the page's server has ended") from None

    def stats(self, stats: dict) -> None:
        pass

    def counts(self) -> dict:
        """Frames sent to viewers, dropped (a viewer read late) and unwatched (skipped: no viewer, or one
        behind by more than `ahead_chunks`), for the stream's summary (as the page last reported them)."""
        return dict(self._counts)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._send("close")
        except (OSError, ValueError):
            pass
        self._closed_reply.wait(CLOSE_TIMEOUT_S)
        self._proc.join(CLOSE_TIMEOUT_S)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(CLOSE_TIMEOUT_S)
        self._reader.join(CLOSE_TIMEOUT_S)
        self.conn.close()
        if self.ring is not None:
            self.ring.close()


# --- the page's process

class _StreamLink:
    """The page's side of the link, in place of a CoreHandle: of what a ServeSession tells its core, the
    stream takes only its events (the viewer's position does not pace a stream that never waits)."""
    index = None

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, kind: str, *args) -> None:
        if kind == "event":
            self.reply("event", args[1])

    def reply(self, *msg) -> None:
        with self.lock:
            try:
                self.conn.send(msg)
            except (OSError, ValueError):         # the stream has ended
                pass


def _page_main(conn, opts: ServeOptions, fps: float, voice: str, title: str, commands: bool, sid: str,
               quiet: bool) -> None:
    """The page's process: the server, then the stream's messages until ("close",) or the stream's end.
    `quiet`: its JSON event lines on stderr are warnings only."""
    import logging
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the stream's: it closes the page
    from stages.serve.metrics import logger
    if quiet:
        logger().setLevel(logging.WARNING)
    from aiohttp import web

    from stages.serve.app import STATE, create_app
    from stages.serve.sessions import RemoteSession, ServeSession, voice_commands
    link = _StreamLink(conn)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        spotter = voice_commands(fps) if commands else None
        app = create_app(opts, [], single=True, title=title)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, opts.host, opts.port)
        try:
            loop.run_until_complete(site.start())
        except OSError as e:
            raise ServeError(f"cannot serve on {opts.host}:{opts.port}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001  -- ServeError, a missing package: told to the stream in one line
        said = str(e).splitlines()[0] if str(e) else ""
        link.reply("error", said if isinstance(e, ServeError) else
                   f"cannot serve on {opts.host}:{opts.port}: {type(e).__name__}: {said}".rstrip(": "))
        return
    port = runner.addresses[0][1]
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    link.reply("ready", f"http://{host}:{port}/#session={sid}", f"http://{host}:{port}/")
    state = app[STATE]
    box: dict = {}

    def counts() -> dict:
        s = box.get("session")
        tl = s.timeline if s is not None else None
        return {"frames_sent": tl.sent, "frames_dropped": tl.dropped, "frames_unwatched": tl.skipped} if tl \
            else dict(NO_COUNTS)

    def attach(profile, media_fps: float, instruction: str | None, keep: int) -> None:
        s = ServeSession(RemoteSession(link, sid, instruction), profile, link, opts, state.metrics, loop, voice,
                         media_fps, sid=sid, commands=spotter, keep=keep)
        state.sessions[sid] = box["session"] = s
        link.reply("attached")

    def chunk(rgb, audio, info: dict) -> None:
        s = box.get("session")
        if s is not None:
            s.delivered(rgb, audio, info)
            link.reply("counts", counts())

    async def close() -> None:
        s = box.get("session")
        if s is not None:
            await s.close("stream ended")
        await runner.cleanup()
        if spotter is not None:
            await asyncio.to_thread(spotter.close)
        link.reply("closed", counts(), list(spotter.log) if spotter is not None else [],
                   spotter.error if spotter is not None else None)
        loop.stop()

    def read() -> None:
        while True:
            try:
                msg = conn.recv()
                if msg[0] == "chunk" and isinstance(msg[2], Slot):
                    msg = (*msg[:2], box["ring"].take(msg[2]), *msg[3:])
            except (EOFError, OSError, TypeError):          # the stream has ended without closing: close here
                msg = ("close",)
            if msg[0] == "attach":
                box["ring"] = FrameRing.attach(msg[5]) if msg[5] else None      # before the chunks that use it
                loop.call_soon_threadsafe(attach, *msg[1:5])
            elif msg[0] == "chunk":
                loop.call_soon_threadsafe(chunk, *msg[2:])
            elif msg[0] == "close":
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(close()))
                return

    threading.Thread(target=read, daemon=True, name="vidu-page-stream").start()
    loop.run_forever()
    if box.get("ring") is not None:
        box["ring"].close()
    conn.close()
