"""The `--serve HOST:PORT` output of `vidu stream`: a local web page that shows the stream live.

One WebSink is one ThreadingHTTPServer on a daemon thread (stdlib + Pillow, nothing else):
  GET  /                 the page: live image, stats line, instruction box, push-to-talk button
  GET  /stream.mjpg      the frames as MJPEG (multipart/x-mixed-replace), paced at `fps`
  GET  /events           Server-Sent Events: `audio` (base64 int16 16 kHz mono, one per chunk)
                         and `stats` (JSON, one per engine stats() call)
  GET  /stats            {"stream": latest engine stats, "server": this server's counts}
  GET  /app.js           the page's script (live audio, stats, instruction box, push-to-talk)
  GET  /mic-worklet.js   the AudioWorklet that mono-mixes the microphone and decimates it to 16 kHz
  POST /instruction      {"text": "..."}                      -> Instruction(text) on the queue
  POST /audio[?format=]  raw little-endian f32le (default) or s16le 16 kHz mono -> AudioChunk
  POST /say              {"text": "..."}  spoken by espeak-ng in `voice` (stages/stream/say.py)
                                          -> AudioChunks, as push-to-talk audio

The engine never waits on a viewer: write() hands the chunk to a publisher thread (a short
backlog, oldest dropped), which encodes JPEGs and spreads the chunk's frames over T / fps
seconds; each viewer's thread sends the newest frame it has not sent and skips (counts) the rest.

The page and its scripts are package files in stages/stream/static/ (index.html, app.js,
mic-worklet.js), read once with importlib.resources; the text box's "say" toggle posts to /say.

Try it: `vidu stream ... --serve 127.0.0.1:8000`, then open http://127.0.0.1:8000/ (the browser
allows the microphone only on localhost / 127.0.0.1 or https).
"""
from __future__ import annotations

import base64
import html
import io
import json
import queue
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from stages.stream.events import (MAX_INSTRUCTION_CHARS, SAMPLE_RATE, AudioChunk, EventQueue, Instruction,
                                  StreamError)
from stages.stream.say import DEFAULT_VOICE

JPEG_QUALITY = 80
BACKLOG_CHUNKS = 3          # chunks waiting for the publisher; beyond this the oldest is dropped
AV_LEAD = 0.15              # s; the page schedules audio this far ahead, frames start as late
MAX_INSTRUCTION_BYTES = 16 * 1024
MAX_AUDIO_SECONDS = 10.0    # per POST /audio; the page sends ~0.1 s
SSE_BACKLOG = 32            # events queued per /events client before it starts losing them
KEEPALIVE = 15.0            # s between SSE comments on an idle stream
CLOSE_GRACE = 1.0           # s close() lets open streams end on a boundary before cutting them


class _Hub:
    """What the publisher hands to the viewer threads: the newest JPEG (with a sequence number),
    one event queue per /events client, the latest stats, and the server's counts."""

    def __init__(self):
        self.cond = threading.Condition()
        self.closed = False
        self.seq = 0                        # frames published so far; frame `seq` is `jpeg`
        self.jpeg = b""
        self.listeners: set[queue.Queue] = set()
        self.streams = 0                    # open /stream.mjpg and /events responses
        self.latest: dict = {}
        self.counts = dict(viewers=0, listeners=0, frames_sent=0, frames_dropped=0, events_dropped=0,
                           instructions_received=0, audio_samples_received=0, texts_said=0)

    def count(self, key: str, n: int = 1) -> None:
        with self.cond:
            self.counts[key] += n

    def publish_frame(self, jpeg: bytes) -> None:
        with self.cond:
            self.seq += 1
            self.jpeg = jpeg
            self.cond.notify_all()

    def broadcast(self, event: str, data: str) -> None:
        message = f"event: {event}\ndata: {data}\n\n".encode()
        with self.cond:
            for q in self.listeners:
                try:
                    q.put_nowait(message)
                except queue.Full:
                    self.counts["events_dropped"] += 1

    def snapshot(self) -> dict:
        with self.cond:
            return {"stream": self.latest, "server": dict(self.counts)}

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for q in self.listeners:
                _put_latest(q, None)
            self.cond.notify_all()

    def wait_streams_ended(self, timeout: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.streams == 0, timeout)


def _put_latest(q: queue.Queue, item) -> None:
    """Put without blocking, making room by dropping the oldest item."""
    while True:
        try:
            q.put_nowait(item)
            return
        except queue.Full:
            try:
                q.get_nowait()
            except queue.Empty:
                pass


def _jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _pcm16_b64(audio: np.ndarray) -> str:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode("ascii")


def _static(name: str) -> bytes:
    """A file of stages/stream/static/ (package data)."""
    return resources.files("stages.stream").joinpath("static", name).read_bytes()


def _json_default(o):
    return o.item() if hasattr(o, "item") else str(o)  # numpy scalars, paths, ...


class _BadRequest(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"           # one request per connection: streams end by closing
    timeout = 10                            # s; a client that stops reading or sending is dropped

    def log_message(self, format, *args):  # noqa: A002 (stdlib signature)
        pass

    # --- routing

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/":
            self._send(200, "text/html; charset=utf-8", self.server.page)
        elif path in ("/app.js", "/mic-worklet.js"):
            self._send(200, "text/javascript; charset=utf-8", _static(path[1:]))
        elif path == "/stats":
            self._send_json(200, self.server.hub.snapshot())
        elif path == "/stream.mjpg":
            self._stream(self._mjpeg, "viewers")
        elif path == "/events":
            self._stream(self._sse, "listeners")
        elif path == "/favicon.ico":
            self._send(204, "image/x-icon", b"")
        else:
            self._send_json(404, {"error": f"no such page: {path}"})

    def do_POST(self):
        url = urlsplit(self.path)
        try:
            if url.path == "/instruction":
                self._instruction()
            elif url.path == "/audio":
                self._audio(parse_qs(url.query).get("format", ["f32le"])[0])
            elif url.path == "/say":
                self._say()
            else:
                self._send_json(404, {"error": f"no such endpoint: {url.path}"})
        except _BadRequest as e:
            self._send_json(400, {"error": str(e)})

    # --- plain responses

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, code: int, obj) -> None:
        self._send(code, "application/json", json.dumps(obj, default=_json_default).encode())

    def _body(self, limit: int) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _BadRequest("a Content-Length header is required") from None
        if length <= 0:
            raise _BadRequest("the request body is empty")
        if length > limit:
            self.close_connection = True
            raise _BadRequest(f"the request body is {length} bytes, more than {limit}")
        body = self.rfile.read(length)
        if len(body) != length:
            raise _BadRequest("the request body ended early")
        return body

    def _text(self, what: str) -> str:
        try:
            text = json.loads(self._body(MAX_INSTRUCTION_BYTES))["text"]
        except (ValueError, KeyError, TypeError):
            raise _BadRequest('expected a JSON body {"text": "..."}') from None
        if not isinstance(text, str) or not text.strip():
            raise _BadRequest(f"the {what} is empty")
        text = text.strip()
        if len(text) > MAX_INSTRUCTION_CHARS:
            raise _BadRequest(f"the {what} has {len(text)} characters, more than {MAX_INSTRUCTION_CHARS}")
        return text

    def _instruction(self) -> None:
        self.server.events.put(Instruction(self._text("instruction")))
        self.server.hub.count("instructions_received")
        self._send_json(200, {"ok": True})

    def _say(self) -> None:
        from stages.stream.say import say
        try:
            n = say(self._text("text"), self.server.events, self.server.voice)
        except StreamError as e:
            raise _BadRequest(str(e)) from None
        self.server.hub.count("texts_said")
        self.server.hub.count("audio_samples_received", n)
        self._send_json(200, {"ok": True, "samples": n, "seconds": n / SAMPLE_RATE})

    def _audio(self, fmt: str) -> None:
        dtype = {"f32le": "<f4", "s16le": "<i2"}.get(fmt)
        if dtype is None:
            raise _BadRequest(f"unknown audio format {fmt!r}; expected f32le or s16le")
        size = np.dtype(dtype).itemsize
        body = self._body(int(MAX_AUDIO_SECONDS * SAMPLE_RATE) * size)
        if len(body) % size:
            raise _BadRequest(f"{len(body)} bytes is not a whole number of {fmt} samples")
        samples = np.frombuffer(body, dtype).astype(np.float32)
        if dtype == "<i2":
            samples /= 32768.0
        if not np.isfinite(samples).all():
            raise _BadRequest("the audio has NaN or infinite samples")
        samples = np.clip(samples, -1.0, 1.0)   # [N] float32 at 16 kHz
        self.server.events.put(AudioChunk(samples))
        self.server.hub.count("audio_samples_received", len(samples))
        self._send_json(200, {"ok": True, "samples": len(samples)})

    # --- streams

    def _stream(self, body, counter: str) -> None:
        hub = self.server.hub
        with hub.cond:
            closed = hub.closed
            if not closed:
                hub.streams += 1
                hub.counts[counter] += 1
        if closed:
            self._send_json(503, {"error": "the stream has ended"})
            return
        try:
            body(hub)
        except OSError:                     # the client went away (broken pipe, reset, timeout)
            pass
        finally:
            with hub.cond:
                hub.streams -= 1
                hub.counts[counter] -= 1
                hub.cond.notify_all()

    def _mjpeg(self, hub: _Hub) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        # each part is followed at once by the next boundary, so the browser shows it without
        # waiting for the next frame
        self.wfile.write(b"--frame\r\n")
        with hub.cond:
            sent = max(hub.seq - 1, 0)      # a new viewer gets the current frame at once
        while True:
            with hub.cond:
                hub.cond.wait_for(lambda: hub.closed or hub.seq > sent, KEEPALIVE)
                if hub.closed:
                    return
                if hub.seq == sent:
                    continue
                hub.counts["frames_dropped"] += hub.seq - sent - 1
                sent, jpeg = hub.seq, hub.jpeg
            self.wfile.write(b"Content-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
                             + jpeg + b"\r\n--frame\r\n")
            self.wfile.flush()
            hub.count("frames_sent")

    def _sse(self, hub: _Hub) -> None:
        q: queue.Queue = queue.Queue(SSE_BACKLOG)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        with hub.cond:
            if hub.closed:                  # closed after _stream's check: no sentinel will come
                return
            hub.listeners.add(q)
        try:
            first = json.dumps(hub.snapshot(), default=_json_default)
            self.wfile.write(f"retry: 1000\nevent: stats\ndata: {first}\n\n".encode())
            self.wfile.flush()
            while True:
                try:
                    message = q.get(timeout=KEEPALIVE)
                except queue.Empty:
                    message = b": keepalive\n\n"
                if message is None:
                    return
                self.wfile.write(message)
                self.wfile.flush()
        finally:
            with hub.cond:
                hub.listeners.discard(q)


class _Server(ThreadingHTTPServer):
    daemon_threads = False                  # server_close() joins the handler threads

    def __init__(self, host: str, port: int, hub: _Hub, events: EventQueue, page: bytes):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.hub, self.events, self.page = hub, events, page
        self.voice = DEFAULT_VOICE          # espeak-ng voice of POST /say
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__((host, port), _Handler)

    def server_bind(self):
        # HTTPServer.server_bind would call socket.getfqdn(host), a DNS lookup that can hang
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request_thread(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)

    def drop_connections(self) -> None:
        """Unblock handlers still reading or writing (idle browser preconnects, stuck clients)."""
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def parse_address(spec: str) -> tuple[str, int]:
    """"HOST:PORT" (or ":PORT", "[::1]:PORT") -> (host, port); StreamError for anything else."""
    host, _, port = spec.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise StreamError(f"--serve takes HOST:PORT with a port 0-65535, not {spec!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_address(host: str, port: int) -> None:
    """StreamError unless a server can listen on host:port now (bound and released at once, the way
    ThreadingHTTPServer binds: `vidu stream` calls it before loading the model)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(1)
    except (OSError, OverflowError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise StreamError(f"cannot serve on {host}:{port}: {reason}") from None


class WebSink:
    """A Sink that serves the stream to browsers and feeds their instructions and speech to
    `events`. The server runs from construction until close(). `voice`: the espeak-ng voice in
    which the page's "say" toggle speaks (stages/stream/say.py)."""

    def __init__(self, host: str, port: int, events: EventQueue, fps: float = 25.0, title: str = "vidu"):
        if not 0 <= port <= 65535:
            raise StreamError(f"cannot serve on {host}:{port}: the port must be 0-65535")
        if fps <= 0:
            raise StreamError(f"fps must be positive, got {fps}")
        self.fps = fps
        self._hub = _Hub()
        self._chunks: queue.Queue = queue.Queue(BACKLOG_CHUNKS)
        self._closing = threading.Event()
        self._close_lock = threading.Lock()
        page = (_static("index.html").decode().replace("{{title}}", html.escape(title))
                .replace("{{lead}}", str(AV_LEAD)).replace("{{max_chars}}", str(MAX_INSTRUCTION_CHARS)))
        try:
            self._server = _Server(host, port, self._hub, events, page.encode())
        except (OSError, OverflowError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise StreamError(f"cannot serve on {host}:{port}: {reason}") from None
        bound = self._server.server_address[1]
        shown = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        self.url = f"http://[{shown}]:{bound}/" if ":" in shown else f"http://{shown}:{bound}/"
        self._serve_thread = threading.Thread(target=self._server.serve_forever, args=(0.2,),
                                              name="vidu-web", daemon=True)
        self._publish_thread = threading.Thread(target=self._publish_loop, name="vidu-web-publish", daemon=True)
        self._serve_thread.start()
        self._publish_thread.start()

    def write(self, frames: np.ndarray, audio: np.ndarray | None) -> None:
        """frames [T, H, W, 3] uint8; audio [N] float32 16 kHz or None. Never blocks on viewers."""
        if self._closing.is_set():
            raise StreamError("the web output is closed")
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise StreamError(f"frames must be [T, H, W, 3] uint8, got {list(frames.shape)} {frames.dtype}")
        if audio is not None and audio.ndim != 1:
            raise StreamError(f"audio must be [N] samples, got shape {list(audio.shape)}")
        chunk = (frames.copy(), None if audio is None else audio.astype(np.float32))
        while True:
            try:
                self._chunks.put_nowait(chunk)
                return
            except queue.Full:
                try:
                    dropped, _ = self._chunks.get_nowait()
                    self._hub.count("frames_dropped", len(dropped))
                except queue.Empty:
                    pass

    @property
    def voice(self) -> str:
        return self._server.voice

    @voice.setter
    def voice(self, voice: str) -> None:
        self._server.voice = voice

    def stats(self, stats: dict) -> None:
        with self._hub.cond:
            self._hub.latest = dict(stats)
        self._hub.broadcast("stats", json.dumps(self._hub.snapshot(), default=_json_default))

    def counts(self) -> dict:
        """The server's own counts (viewers, frames_sent, frames_dropped, ...)."""
        return self._hub.snapshot()["server"]

    def close(self) -> None:
        with self._close_lock:
            if self._closing.is_set():
                return
            self._closing.set()
        self._publish_thread.join()
        self._hub.close()
        self._server.shutdown()
        self._hub.wait_streams_ended(CLOSE_GRACE)
        self._server.drop_connections()
        self._server.server_close()
        self._serve_thread.join()

    def _publish_loop(self) -> None:
        due = 0.0                           # monotonic time the next frame is due
        while not self._closing.is_set():
            try:
                frames, audio = self._chunks.get(timeout=0.2)
            except queue.Empty:
                continue
            if due < time.monotonic():      # (re)starting after a gap: frames follow the audio lead
                due = time.monotonic() + AV_LEAD
            if audio is not None and len(audio):
                self._hub.broadcast("audio", _pcm16_b64(audio))
            for frame in frames:
                jpeg = _jpeg(frame)
                if self._closing.wait(max(0.0, due - time.monotonic())):
                    return
                self._hub.publish_frame(jpeg)
                due += 1.0 / self.fps
