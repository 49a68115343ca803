"""The HTTP side of `vidu serve` (aiohttp): sessions, WebRTC signalling, the page, metrics.

    GET    /                       the page (static/index.html; its script static/app.js)
    GET    /app.js, /mic-worklet.js  the page's scripts
    GET    /health                 {"ok": true}
    GET    /metrics                Prometheus text (stages/serve/metrics.py)
    GET    /capacity               workers, their measured load and profiles
    GET    /ice-servers            {"iceServers": [{urls, username, credential}]}: STUN / TURN for the page's
                                   peer connection (--ice-server; none: host candidates only)
    GET    /voices                 {"default", "voices": {name: {"espeak", "pitch"}}}: the character voices a
                                   session may take (POST /sessions voice; any espeak-ng voice is taken too)
    POST   /sessions               multipart: image (file, required), instruction, voice, seed -> 201 {id, profile, ...}
                                   | 503 {"error", "reason"} when no worker can keep it real time, or when the
                                   server shows one `vidu stream`'s session (stages/serve/single.py)
    GET    /sessions/{id}          the session's state and instruction history
    DELETE /sessions/{id}          close it
    POST   /sessions/{id}/offer    {"sdp", "type": "offer"} -> the answer; a new offer replaces the viewer
                                   (reconnect: the character goes on)
    POST   /sessions/{id}/instruction  {"text"} (the data channel's instruction, over HTTP)

Every error is a one-line JSON {"error": ...} with a 4xx/5xx status, never a traceback. With a token
every route but the page, its scripts and /health needs `Authorization: Bearer TOKEN`. No CORS
headers are sent; a POST or DELETE whose Origin is not this server's is refused (403). Requests are
rate-limited per client address (429). Sessions are closed after `connect_timeout_s` without a viewer
and `idle_timeout_s` without input. Peer connections gather host ICE candidates, and server-reflexive and
relayed ones where STUN / TURN servers are given (ServeOptions.ice_servers, one of each): without them,
viewers on this machine or its LAN only, not across NAT.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import io
import json
import re
import time
import warnings
from html import escape as html_escape
from importlib import resources
from urllib.parse import urlsplit

import numpy as np
from aiohttp import web

from stages.serve.core import CoreError, CoreHandle
from stages.serve.metrics import Metrics, log
from stages.serve.options import ServeError, ServeOptions, check_bind
from stages.serve.sessions import RemoteSession, ServeSession, TokenBucket, new_id, voice_commands
from stages.stream.events import MAX_INSTRUCTION_CHARS, StreamError, instruction_text
from stages.stream.say import DEFAULT_VOICE

SESSION_ID = re.compile(r"[0-9a-f]{32}")
PUBLIC = {"/", "/app.js", "/mic-worklet.js", "/health", "/favicon.ico"}
OPTIONS = web.AppKey("options", ServeOptions)
STATE = web.AppKey("state", object)


def _static(package: str, name: str) -> bytes:
    return resources.files(package).joinpath("static", name).read_bytes()


def _error(status: int, message: str, **extra) -> web.Response:
    return web.json_response({"error": message.splitlines()[0] if message else str(status), **extra}, status=status)


class State:
    def __init__(self, opts: ServeOptions, cores: list[CoreHandle], title: str):
        self.opts, self.title = opts, title
        self.metrics = Metrics()
        self.cores = cores                      # one per device; none: one stream's page
        self.sessions: dict[str, ServeSession] = {}
        self.clients: dict[str, TokenBucket] = {}
        self.reaper: asyncio.Task | None = None
        self.admitting = asyncio.Lock()
        self.stopping = False

    def on_message(self, core: CoreHandle, msg: tuple) -> None:
        """What a core sends (stages/serve/core.py), on the event loop."""
        kind = msg[0]
        if kind == "metric":
            getattr(self.metrics, msg[1])(*msg[2])
        elif kind == "ended" and not self.stopping:
            log("core_ended", worker=core.index, device=core.device)
            for s in list(self.sessions.values()):
                if s.core is core:
                    s.failed("the model process has ended")
        elif kind in ("chunk", "failed", "degraded") and (s := self.sessions.get(msg[1])) is not None:
            if kind == "chunk":
                s.delivered(*msg[2:])
            elif kind == "failed":
                s.failed(msg[2])
            else:
                s.switched(next(p for p in s.core.profiles if p.name == msg[2]), msg[3])

    def session(self, request: web.Request) -> ServeSession:
        sid = request.match_info["id"]
        s = self.sessions.get(sid) if SESSION_ID.fullmatch(sid) else None
        if s is None:
            raise web.HTTPNotFound(reason="no such session")
        return s


# --- middlewares

@web.middleware
async def errors(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.reason if e.status != 413 else f"the upload is larger than {request.app[OPTIONS].max_upload_bytes} bytes"
        if e.status == 404 and e.reason == "Not Found":
            message = "not found"
        return _error(e.status, message)
    except (ServeError, StreamError) as e:
        return _error(400, str(e))
    except Exception as e:                                    # a bug: logged, answered in one line
        log("request_failed", path=request.path, error=f"{type(e).__name__}: {e}")
        return _error(500, f"internal error ({type(e).__name__})")


@web.middleware
async def guard(request: web.Request, handler):
    opts, state = request.app[OPTIONS], request.app[STATE]
    client = request.remote or "?"
    bucket = state.clients.get(client)
    if bucket is None:
        if len(state.clients) > 10000:
            state.clients.clear()
        bucket = state.clients[client] = TokenBucket(opts.requests_per_s, opts.request_burst)
    if not bucket.take():
        state.metrics.inc("requests_limited")
        return _error(429, "too many requests: slow down")
    if request.method not in ("GET", "HEAD") and not _same_origin(request):
        return _error(403, "cross-origin requests are not accepted")
    if opts.token and request.path not in PUBLIC:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {opts.token}".encode()):
            return _error(401, "a token is required: Authorization: Bearer TOKEN")
    return await handler(request)


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return False
    if origin is None:
        return True                                           # not from a browser page (curl, the tests)
    return urlsplit(origin).netloc == request.host


# --- routes

async def page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    single = next(iter(state.sessions), "") if not state.cores else ""    # one stream's page opens it
    html = (_static("stages.serve", "index.html").decode().replace("{{max_chars}}", str(MAX_INSTRUCTION_CHARS))
            .replace("{{title}}", html_escape(state.title)).replace("{{session}}", single)
            .replace("{{voices}}", _voice_options()))
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})


@functools.cache
def _voices() -> dict:
    """The character voices (stages/synth/voice.py VOICES) as the page and GET /voices offer them, by name:
    {"espeak", "pitch"} (read once, by create_app: the import takes most of a second)."""
    from stages.synth.voice import VOICES
    return {name: {"espeak": espeak, "pitch": pitch} for name, (espeak, pitch) in sorted(VOICES.items())}


def _voice_options() -> str:
    """The page's voice choice: the default (espeak-ng's DEFAULT_VOICE), then the character voices."""
    return "".join([f'<option value="">voice: {DEFAULT_VOICE}</option>',
                    *(f'<option value="{name}">voice: {name}</option>' for name in _voices())])


async def script(request: web.Request) -> web.Response:
    name = request.path[1:]
    body = _static("stages.serve", name)
    return web.Response(body=body, content_type="text/javascript", charset="utf-8")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def ice_servers(request: web.Request) -> web.Response:
    """The STUN / TURN servers the page's peer connection uses (the server's own use the same)."""
    return web.json_response({"iceServers": request.app[OPTIONS].ice()}, headers={"Cache-Control": "no-store"})


async def voices(request: web.Request) -> web.Response:
    """The character voices, as the page offers them."""
    return web.json_response({"default": DEFAULT_VOICE, "voices": _voices()})


async def favicon(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    sessions = [{"id": s.id, "profile": s.profile.name, "fps": round(s.timeline.fps_sent(), 3)}
                for s in state.sessions.values()]
    described = await _describe(state)
    workers = [{"worker": w["worker"], "load": w["load"], "budget": w["budget"]} for w in described["workers"]]
    live = {"frames_sent": sum(s.timeline.sent for s in state.sessions.values()),   # + the closed ones' (counters)
            "frames_dropped": sum(s.timeline.dropped for s in state.sessions.values())}
    text = state.metrics.text(sessions, workers, described["gpu"], live)
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


async def _describe(state: State) -> dict:
    """The cores' workers (Worker.describe) and GPU memory; none for one stream's page. A core that has
    ended is left out."""
    out = {"workers": [], "gpu": []}
    for core in state.cores:
        try:
            d = await core.request("describe")
        except CoreError:
            continue
        out["workers"] += d["workers"]
        out["gpu"] += d["gpu"]
    return out


async def capacity(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"workers": (await _describe(state))["workers"], "sessions": len(state.sessions),
                              "max_sessions": state.opts.max_sessions, "speed": state.opts.speed,
                              "headroom": state.opts.headroom, "chunks": state.metrics.quantiles(),
                              "counts": dict(state.metrics.counters)})


async def create_session(request: web.Request) -> web.Response:
    state, opts = request.app[STATE], request.app[OPTIONS]
    if not request.content_type.startswith("multipart/"):
        return _error(415, "POST /sessions takes multipart/form-data with an image file")
    if not state.cores:
        return _error(503, "this server shows one stream (vidu stream --serve): it takes no new sessions; "
                      "vidu serve does", reason="single")
    fields = await _form(request, opts)
    rgb = _image(fields.get("image"), opts)
    voice = _text_field(fields, "voice", 64) or DEFAULT_VOICE
    if not re.fullmatch(r"[A-Za-z0-9_+\-]+", voice):
        return _error(400, f"not a voice name: {voice!r}")
    if voice != DEFAULT_VOICE:
        from stages.stream.say import check_voice
        await asyncio.to_thread(check_voice, voice)
    instruction = instruction_text(_text_field(fields, "instruction", 4 * MAX_INSTRUCTION_CHARS) or "") or None
    seed_text = _text_field(fields, "seed", 20) or "0"
    if not seed_text.isdigit() or int(seed_text) >= 2**63:
        return _error(400, f"the seed is a whole number 0..2^63-1, not {seed_text!r}")
    async with state.admitting:                 # one admission at a time, its session added before the next
        sid = new_id()
        try:
            core, made = await _admit(state, sid, rgb, int(seed_text), instruction, voice)
        except CoreError as e:
            if e.reason == "error":             # the reference could not start a session
                return _error(400, str(e))
            state.metrics.refuse(e.reason)
            log("session_refused", reason=e.reason, message=str(e))
            return _error(503, str(e), reason=e.reason)
        profile = next(p for p in core.profiles if p.name == made["profile"])
        try:
            commands = await asyncio.to_thread(voice_commands, made["fps"]) if opts.commands else None
        except BaseException:
            core.send("close", sid)
            raise
        s = ServeSession(RemoteSession(core, sid, made["instruction"]), profile, core, opts, state.metrics,
                         asyncio.get_running_loop(), voice, made["fps"], sid=sid, commands=commands)
        state.sessions[s.id] = s
    state.metrics.admit(profile.name)
    log("session_created", session=s.id, profile=profile.name, worker=core.index)
    return web.json_response(s.info(), status=201)


async def _admit(state: State, sid: str, rgb: np.ndarray, seed: int, instruction: str | None, voice: str | None = None):
    """(core, its answer) of the session made on the core that fits it at the best profile (full, fewer
    steps, half size: each core's Worker.fit), the least loaded of those; CoreError when the
    server is full or no core fits it (the least-loaded one's reason)."""
    if sum(s.closed is None for s in state.sessions.values()) >= state.opts.max_sessions:
        raise CoreError("max_sessions", f"the server is full: {state.opts.max_sessions} sessions (--max-sessions)")
    offers = []
    for core in state.cores:
        try:
            offers.append((core, await core.request("offer")))
        except CoreError:                       # that core has ended
            continue
    if not offers:
        raise CoreError("ended", "the model process has ended")
    fitting = sorted((o for o in offers if o[1]["rank"] is not None), key=lambda o: (o[1]["rank"], o[1]["load"]))
    refused = CoreError("capacity", min(offers, key=lambda o: o[1]["load"])[1]["refusal"] or "no capacity")
    for core, _ in fitting:                     # the best first; another if its load grew meanwhile
        try:
            return core, await core.request("create", sid, rgb, seed, instruction, voice)
        except CoreError as e:
            if e.reason != "capacity":
                raise
            refused = e
    raise refused


async def _form(request: web.Request, opts: ServeOptions) -> dict:
    """The multipart fields: name -> bytes (a file) or str; a path is never taken from a field."""
    out: dict = {}
    too_large = web.HTTPRequestEntityTooLarge(max_size=opts.max_upload_bytes, actual_size=request.content_length or 0)
    if (request.content_length or 0) > opts.max_upload_bytes + 64 * 1024:     # said up front: refused unread
        raise too_large
    reader = await request.multipart()
    total = 0
    async for part in reader:
        if part.name not in ("image", "instruction", "voice", "seed"):
            raise ServeError(f"unknown field {part.name!r}: expected image, instruction, voice, seed")
        data = bytearray()
        while chunk := await part.read_chunk(64 * 1024):     # never more than the limit in memory
            data += chunk
            total += len(chunk)
            if total > opts.max_upload_bytes:
                raise too_large
        if part.name == "image":
            if part.filename is None:
                raise ServeError("the image must be an uploaded file (multipart with a filename), not a path or text")
            out["image"] = bytes(data)
        else:
            out[part.name] = bytes(data).decode("utf-8", "replace")
    return out


def _text_field(fields: dict, name: str, limit: int) -> str | None:
    v = fields.get(name)
    if v is not None and len(v) > limit:
        raise ServeError(f"the {name} field is longer than {limit} characters")
    return v.strip() if v else None


def _image(data: bytes | None, opts: ServeOptions) -> np.ndarray:
    """[H, W, 3] uint8 of the upload; ServeError (one line) for a missing, unreadable or too large image."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    if not data:
        raise ServeError("an image file is required (multipart field 'image')")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if max(w, h) > opts.max_image_side or w * h > opts.max_image_pixels:
                    raise ServeError(f"the image is {w}x{h}: at most {opts.max_image_side} px a side and "
                                     f"{opts.max_image_pixels} pixels")
                if w < 16 or h < 16:
                    raise ServeError(f"the image is {w}x{h}: at least 16 px a side")
                im.load()
                rgb = ImageOps.exif_transpose(im).convert("RGB")
                return np.asarray(rgb, dtype=np.uint8).copy()
    except Image.DecompressionBombError:
        raise ServeError("the image has too many pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ServeError):
            raise
        raise ServeError(f"not a readable image ({type(e).__name__})") from None


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].session(request).info())


async def delete_session(request: web.Request) -> web.Response:
    state = request.app[STATE]
    s = state.session(request)
    state.sessions.pop(s.id, None)
    await s.close("deleted")
    return web.json_response({"ok": True, "id": s.id, "chunks": s.session.chunks})


async def _json(request: web.Request, limit: int) -> dict:
    if request.content_length is not None and request.content_length > limit:
        raise ServeError(f"the body is larger than {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise ServeError(f"the body is larger than {limit} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise ServeError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise ServeError("the body must be a JSON object")
    return body


async def offer(request: web.Request) -> web.Response:
    s = request.app[STATE].session(request)
    body = await _json(request, 64 * 1024)
    sdp, kind = body.get("sdp"), body.get("type")
    if not isinstance(sdp, str) or kind != "offer" or not sdp.startswith("v=0"):
        raise ServeError('expected {"sdp": "v=0...", "type": "offer"}')
    try:
        answer = await s.connect(sdp, kind)
    except (ValueError, KeyError, IndexError) as e:          # aiortc's SDP parser on a malformed offer
        raise ServeError(f"unusable offer ({type(e).__name__})") from None
    return web.json_response({"sdp": answer.sdp, "type": answer.type})


async def instruct(request: web.Request) -> web.Response:
    s = request.app[STATE].session(request)
    body = await _json(request, 16 * 1024)
    return web.json_response({"ok": True, **s.instruct(body.get("text"))})


async def _reap(state: State) -> None:
    """Close sessions without a viewer for connect_timeout_s, or without input for idle_timeout_s."""
    while True:
        await asyncio.sleep(min(1.0, state.opts.connect_timeout_s / 4))
        now = time.monotonic()
        for s in list(state.sessions.values()):
            reason = None
            if s.closed is not None:
                reason = s.closed
            elif not state.cores:                       # one stream's page: the stream ends its session
                continue
            elif s.viewer_left is not None and now - s.viewer_left > state.opts.connect_timeout_s:
                reason = "no viewer"
            elif s.viewer_left is None and now - s.last_input > state.opts.idle_timeout_s:
                reason = "idle"
            if reason:
                state.sessions.pop(s.id, None)
                await s.close(reason)


async def _startup(app: web.Application) -> None:
    state = app[STATE]
    for core in state.cores:
        core.start(asyncio.get_running_loop(), state.on_message)
    state.reaper = asyncio.ensure_future(_reap(state))


async def _shutdown(app: web.Application) -> None:
    state = app[STATE]
    state.stopping = True
    if state.reaper:
        state.reaper.cancel()
    for s in list(state.sessions.values()):
        await s.close("server stopped")
    state.sessions.clear()
    await asyncio.gather(*(asyncio.to_thread(core.stop) for core in state.cores))


def create_app(opts: ServeOptions, cores: list, single: bool = False,
               title: str = "vidu serve") -> web.Application:
    """The server over `cores`, one per worker device: CoreHandles (`vidu serve`: each device's model in a
    process of its own, CoreHandle.processes), or calibrated ServeModels (ServeModel.calibrate), each run by
    a core on a thread of this process; the app stops its cores when it shuts down. `single`: no core, the
    one session of a `vidu stream` (stages/serve/single.py) added to app[STATE].sessions."""
    if not cores and not single:
        raise ServeError("no model to serve")
    check_bind(opts)
    _voices()
    if not single:
        cores = [c if isinstance(c, CoreHandle) else CoreHandle.thread(c, opts, i) for i, c in enumerate(cores)]
    app = web.Application(middlewares=[errors, guard], client_max_size=opts.max_upload_bytes + 64 * 1024)
    app[OPTIONS] = opts
    app[STATE] = State(opts, [] if single else cores, title)
    app.router.add_get("/", page)
    app.router.add_get("/app.js", script)
    app.router.add_get("/mic-worklet.js", script)
    app.router.add_get("/health", health)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/capacity", capacity)
    app.router.add_get("/ice-servers", ice_servers)
    app.router.add_get("/voices", voices)
    app.router.add_post("/sessions", create_session)
    app.router.add_get("/sessions/{id}", get_session)
    app.router.add_delete("/sessions/{id}", delete_session)
    app.router.add_post("/sessions/{id}/offer", offer)
    app.router.add_post("/sessions/{id}/instruction", instruct)
    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
    return app


async def serve(opts: ServeOptions, cores: list[CoreHandle], announce=print) -> None:
    """Run until cancelled (Ctrl-C): bind, say the URL through `announce`, serve; the cores are stopped at the end."""
    app = create_app(opts, cores)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, opts.host, opts.port)
        try:
            await site.start()
        except OSError as e:
            raise ServeError(f"cannot serve on {opts.host}:{opts.port}: {e.strerror or e}") from None
        port = runner.addresses[0][1]
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        announce(f"serving on http://{host}:{port}/")
        log("serving", host=opts.host, port=port, workers=len(cores), token=bool(opts.token))
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()
