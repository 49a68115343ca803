"""`vidu stream --serve`: the stream's one session on vidu serve's server and page (stages/serve/single.py).
Without a browser, an aiortc viewer (tests/test_serve_webrtc.py) watches a PageSink attached to a real tiny
Session, which a thread feeds with synthetic chunks in real time (the engine's part); in a real headless
Chromium, the page streams the starter model from `vidu stream --serve`."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from aiohttp import ClientSession

from stages.serve.single import PageSink
from stages.stream.events import SAMPLE_RATE, AudioChunk, EventQueue, Instruction, StreamError
from tests.browser import CAPTURE, browser, wait  # noqa: F401  (browser: the headless Chromium fixture)
from tests.conftest import write_face
from tests.serve_helpers import parse_prometheus, value
from tests.test_serve_webrtc import Viewer, _until

FPS = 25.0
T = 4                       # frames per write after the first, as the tiny preset's chunks
SIZE = 64


def _chunk(i: int) -> tuple[np.ndarray, np.ndarray]:
    """T frames of a 16-px square that moves 3 px a frame and changes colour; a 440 Hz tone."""
    frames = np.zeros((T, SIZE, SIZE, 3), np.uint8)
    for t in range(T):
        n = i * T + t
        x = (3 * n) % (SIZE - 16)
        frames[t, 24:40, x:x + 16] = ((40 * n) % 256, 255 - (40 * n) % 256, 128)
    seconds = np.arange(int(T / FPS * SAMPLE_RATE)) / SAMPLE_RATE + i * T / FPS
    return frames, (0.2 * np.sin(2 * np.pi * 440 * seconds)).astype(np.float32)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from stages.stream.session import load_parts
    face = tmp_path_factory.mktemp("face") / "face.png"
    write_face(face)
    return load_parts(face, seed=0)


def _attached(parts, **kw) -> tuple[PageSink, EventQueue]:
    from stages.stream.session import Session, SessionOptions
    events = EventQueue()
    sink = PageSink("127.0.0.1", 0, fps=FPS, **kw)
    sink.attach(Session(parts, events, SessionOptions(live_audio=True)))
    return sink, events


@pytest.fixture
def page(parts, request):
    """A PageSink attached to a tiny Session, written to in real time by a thread: (sink, events)."""
    sink, events = _attached(parts, title="vidu test")
    stop = threading.Event()

    def engine():
        i = 0
        while not stop.is_set():
            try:
                sink.write(*_chunk(i))
            except StreamError:                   # a test closed the sink
                return
            i += 1
            stop.wait(T / FPS)

    thread = threading.Thread(target=engine, daemon=True)
    thread.start()

    def finish():
        stop.set()
        thread.join()
        sink.close()

    request.addfinalizer(finish)
    return sink, events


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        body = r.read()
        return json.loads(body) if r.headers["Content-Type"].startswith("application/json") else body.decode()


@pytest.mark.timeout(120)
def test_a_viewer_gets_the_streams_frames_and_audio_and_talks_to_it(page):
    """The stream's frames in order at their times, its tone on the audio track; an instruction over the data
    channel is acknowledged and queued for the stream; push-to-talk speech reaches the stream's queue; a "say"
    is spoken in the stream's voice."""
    from stages.stream.say import speech
    sink, events = page
    url = sink.base.rstrip("/")

    async def main():
        async with ClientSession() as http:
            v = Viewer()
            await v.connect(http, url, sink.id)
            await _until(lambda: len(v.frames) >= 20, 30, "20 video frames")
            assert {f.shape for _, _, f in v.frames} == {(SIZE, SIZE, 3)}
            assert len({f.tobytes() for _, _, f in v.frames}) >= 10          # the square moves
            pts = [p for _, p, _ in v.frames]
            assert pts == sorted(pts) and len(set(pts)) == len(pts)
            await _until(lambda: len(v.audio) > 50, 10, "audio")
            loud = np.concatenate([a for _, a in v.audio[-25:]])
            assert np.sqrt(np.mean(loud ** 2)) > 0.05                          # the stream's tone, not silence
            v.channel.send(json.dumps({"type": "instruction", "text": "make a heart", "id": 3}))
            await _until(lambda: any(m["type"] == "ack" for m in v.replies), 10, "the ack")
            v.channel.send((np.full(1600, 8000, "<i2")).tobytes())            # 0.1 s of push-to-talk
            v.channel.send(json.dumps({"type": "say", "text": "hello", "id": 4}))
            await _until(lambda: sum(m["type"] == "ack" for m in v.replies) >= 2, 20, "the say's ack")
            info = (await (await http.get(f"{url}/sessions/{sink.id}")).json())
            await v.close()
            return v.replies, info

    replies, info = asyncio.run(main())
    ack = next(m for m in replies if m.get("id") == 3)
    assert ack["text"] == "make a heart" and ack["source"] == "text"
    said = next(m for m in replies if m.get("id") == 4)
    assert said["said"] == "hello" and info["voice"] == sink.voice and info["viewer"] is True
    got = events.drain()
    assert [e for e in got if isinstance(e, Instruction)] == [Instruction("make a heart")]
    heard = [e.samples for e in got if isinstance(e, AudioChunk)]
    assert np.allclose(heard[0], 8000 / 32768) and len(heard[0]) == 1600                 # the push-to-talk
    assert np.array_equal(np.concatenate(heard[1:]), speech("hello", sink.voice))     # the say, in its voice
    assert sink.counts()["frames_sent"] >= 20


def test_one_streams_server_refuses_new_sessions_and_bad_requests_in_one_line(page):
    sink, events = page
    base, session = sink.base, f"{sink.base}sessions/{sink.id}"
    status, body = _post(base + "sessions", b"--x--\r\n", "multipart/form-data; boundary=x")
    assert status == 503 and body["reason"] == "single" and "one stream" in body["error"]
    for payload, message in ((json.dumps({"text": "  "}).encode(), "empty"),
                             (json.dumps({"text": "x" * 5000}).encode(), "characters"),
                             (b"not json", "not JSON")):
        status, body = _post(session + "/instruction", payload)
        assert status == 400 and message in body["error"] and "\n" not in body["error"]
    status, body = _post(f"{base}sessions/{'0' * 32}/instruction", json.dumps({"text": "nod"}).encode())
    assert status == 404
    status, body = _post(f"{base}sessions/..%2F..%2Fetc%2Fpasswd/offer", b"{}")
    assert status == 404
    assert _get(session)["id"] == sink.id                                  # still serving
    assert [e for e in events.drain() if isinstance(e, Instruction)] == []
    fams = parse_prometheus(_get(base + "metrics"))
    assert value(fams, "vidu_serve_sessions") == 1 and value(fams, "vidu_serve_instructions_total") == 0


def test_unwatched_frames_are_skipped_not_kept(parts):
    """With no viewer the stream goes on (it does not wait for one) and the page keeps at most ahead_chunks + 1
    chunks of it: memory stays bounded over hours."""
    sink, _ = _attached(parts)
    try:
        for i in range(40):
            sink.write(*_chunk(i))
        keep = (sink.opts.ahead_chunks + 1) * T
        wait(lambda: sink.counts()["frames_unwatched"] == 40 * T - keep, 10, "the chunks on the page's timeline")
        assert sink.counts() == {"frames_sent": 0, "frames_dropped": 0, "frames_unwatched": 40 * T - keep}
        info = _get(f"{sink.base}sessions/{sink.id}")
        assert info["frames_buffered"] == keep and info["frames_unwatched"] == 40 * T - keep
        # audio trimmed with its frames: what is unsent plus the 2 s behind the picture, of 40 chunks' 6.4 s
        assert info["audio_held_s"] == pytest.approx(keep / FPS + 2.0, abs=1 / 48000) and info["audio_held_s"] < 40 * T / FPS
    finally:
        sink.close()


def test_port_in_use_or_an_open_bind_without_a_token_is_a_one_line_stream_error(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StreamError) as err:
            PageSink("127.0.0.1", port)
    assert f"127.0.0.1:{port}" in str(err.value) and "in use" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.delenv("VIDU_SERVE_TOKEN", raising=False)
    with pytest.raises(StreamError, match="token"):
        PageSink("0.0.0.0", 0)


def test_close_ends_the_session_and_is_idempotent(page):
    sink, _ = page
    start = time.monotonic()
    sink.close()
    sink.close()
    assert time.monotonic() - start < 5
    assert not sink._proc.is_alive() and sink._proc.exitcode == 0          # the page's process ended by itself
    with pytest.raises(StreamError):
        sink.write(*_chunk(0))
    with pytest.raises(urllib.error.URLError):
        _get(sink.base + "health")


def test_the_page_and_its_scripts_are_package_files(page):
    from importlib import resources

    from stages.stream.events import MAX_INSTRUCTION_CHARS
    sink, _ = page
    html = _get(sink.base)
    assert f'maxlength="{MAX_INSTRUCTION_CHARS}"' in html and "{{" not in html and "<title>vidu test</title>" in html
    assert f'<body data-session="{sink.id}">' in html                    # the page opens the stream's session
    static = resources.files("stages.serve").joinpath("static")
    for name, marker in (("app.js", "params.get('session')"), ("mic-worklet.js", "registerProcessor('mic-16k'")):
        with urllib.request.urlopen(sink.base + name, timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/javascript")
            body = r.read()
        assert body == static.joinpath(name).read_bytes() and marker in body.decode()


@pytest.mark.timeout(300)
def test_page_streams_the_starter_model(browser, tmp_path):  # noqa: F811
    """`vidu stream --serve` with no --ckpt (the starter model, on this CPU) in headless Chromium: the page
    opens the stream at the server's plain address, its video is the model's 256 x 256 frames, not blank, and
    changes as chunks arrive; an instruction typed in the page is acknowledged and reaches the stream (its
    summary); a screenshot of the page is kept (tmp_path/page.png)."""
    import base64
    import io
    import signal
    import subprocess
    import sys

    from PIL import Image
    from selenium.webdriver.common.keys import Keys

    from stages import synth
    from tests.test_runner import _as_in_a_terminal
    s = synth.make_sample(7, 256, 256, 25, 0.2, split="eval")
    Image.fromarray(synth.render(s.identity, synth.State(), 256, 256, s.scene)).save(tmp_path / "ref.png")
    proc = subprocess.Popen([sys.executable, "-m", "vidu_cli", "stream", "--image", str(tmp_path / "ref.png"), "--serve",
                             "127.0.0.1:0", "--device", "cpu", "--summary", str(tmp_path / "s.json")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_as_in_a_terminal)   # SIGINT acts in a background job
    try:
        url, said = None, []
        while url is None:
            line = proc.stderr.readline()
            assert line, "vidu stream ended before serving: " + "".join(said)
            said.append(line)
            if line.startswith("serving on "):
                url = line.split()[-1]
        assert any("running the starter model" in ln for ln in said) and "#session=" in url
        browser.get(url.split("#")[0])                                        # the plain address, as `make demo` says
        assert not browser.find_element("id", "start").is_displayed()          # no upload: the stream's own
        wait(lambda: browser.execute_script("return document.getElementById('view').videoWidth") == 256, 120,
             "the first frame")
        shots = []

        def grab():
            data = browser.execute_script(CAPTURE)
            if data is None:
                return False
            px = np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB"))
            if not shots or not np.array_equal(px, shots[-1]):
                shots.append(px)
            return len(shots) >= 3
        wait(grab, 120, "three different frames")
        for px in shots:
            assert px.shape == (256, 256, 3) and px.std() > 20            # a picture, not a blank or flat frame
        browser.find_element("id", "text").send_keys("raise a hand" + Keys.ENTER)
        wait(lambda: browser.execute_script("return window.vidu.acks") == 1, 30, "the instruction's ack")
        session = url.replace("/#session=", "/sessions/")
        wait(lambda: _get(session)["instruction"] == "raise a hand", 60, "the stream to take the instruction")
        Image.open(io.BytesIO(browser.get_screenshot_as_png())).save(tmp_path / "page.png")
        assert np.asarray(Image.open(tmp_path / "page.png")).std() > 10
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:      # never leave a server streaming through the rest of the suite
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    summary = json.loads((tmp_path / "s.json").read_text())
    assert "raise a hand" in [text for _, text in summary["instructions"]]


def test_the_page_process_imports_no_model():
    """The page's process (stages/serve/single.py: the server, the session, the ring) imports neither torch nor the
    model: it starts in about a second and holds little memory beside the stream (torch alone: ~2.5 s, ~0.6 GB).
    Control: the model side (stages/serve/model.py) does."""
    import subprocess
    import sys
    probe = "import sys, {}; print('torch' in sys.modules)"
    for module, torch_loaded in (("stages.serve.single, stages.serve.app", "False"), ("stages.serve.model", "True")):
        out = subprocess.run([sys.executable, "-c", probe.format(module)], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == torch_loaded, (module, out.stderr[-500:])
