"""The `--serve` web page in a real headless Chromium (Debian's chromium + chromium-driver), and
its HTTP edges without a browser. The sink is real; a thread plays the engine's part."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from stages.stream.events import SAMPLE_RATE, AudioChunk, EventQueue, Instruction, StreamError
from stages.stream.serve import WebSink

FPS = 25.0
T = 5                       # frames per write, as the engine writes one chunk at a time
SIZE = 64


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def _browser_paths() -> tuple[str, str]:
    chromium = _find("chromium", "/usr/bin/chromium", "chromium-browser", "/usr/bin/chromium-browser")
    driver = _find("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    return chromium, driver


def _chunk(i: int) -> tuple[np.ndarray, np.ndarray]:
    """T frames of a 16-px square that moves 3 px a frame and changes colour; a 440 Hz tone."""
    frames = np.zeros((T, SIZE, SIZE, 3), np.uint8)
    for t in range(T):
        n = i * T + t
        x = (3 * n) % (SIZE - 16)
        frames[t, 24:40, x:x + 16] = ((40 * n) % 256, 255 - (40 * n) % 256, 128)
    seconds = np.arange(int(T / FPS * SAMPLE_RATE)) / SAMPLE_RATE + i * T / FPS
    return frames, (0.2 * np.sin(2 * np.pi * 440 * seconds)).astype(np.float32)


@pytest.fixture
def sink(request):
    """A WebSink on a free port, written to in real time by a thread: (sink, events)."""
    events = EventQueue()
    sink = WebSink("127.0.0.1", 0, events, fps=FPS, title="vidu test")
    stop = threading.Event()

    def engine():
        i = 0
        while not stop.is_set():
            try:
                sink.write(*_chunk(i))
            except StreamError:                   # a test closed the sink
                return
            sink.stats({"chunk": i, "rtf": 1.0})
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


@pytest.fixture
def browser(request, tmp_path):
    return chromium_driver(request, tmp_path)


def chromium_driver(request, tmp_path, *extra_flags: str):
    """Headless Chromium through selenium (skips where neither is installed), with `extra_flags`; quit at the
    test's end."""
    chromium, chromedriver = _browser_paths()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required", *extra_flags):
        options.add_argument(flag)
    # the page is ready when its document is (its scripts run): the live image never finishes loading, and its
    # first frame waits for the model's first chunk, which a busy 2-core CI machine can take longer than the
    # page-load timeout to make (the renderer then timed out in a CI rehearsal); the tests wait for frames themselves
    options.page_load_strategy = "eager"
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    request.addfinalizer(driver.quit)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    return driver


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


# the image's current pixels, drawn through a canvas (same origin, so readable)
CAPTURE = """const img = document.getElementById('view');
const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
c.getContext('2d').drawImage(img, 0, 0); return c.toDataURL('image/png');"""


@pytest.mark.timeout(60)
def test_page_shows_live_frames(sink, browser):
    web, _ = sink
    browser.get(web.url)
    assert browser.title == "vidu test"
    _wait(lambda: browser.execute_script("return document.getElementById('view').naturalWidth") == SIZE,
          10, "the first frame in the page")
    first = browser.execute_script(CAPTURE)
    sent = web.counts()["frames_sent"]
    shots = {first}
    _wait(lambda: shots.add(browser.execute_script(CAPTURE)) or len(shots) >= 3, 10, "the image to change")
    _wait(lambda: _get_json(web.url + "stats")["server"]["frames_sent"] >= sent + 10, 5, "frames_sent to grow")
    assert _get_json(web.url + "stats")["server"]["viewers"] == 1
    _wait(lambda: "chunk" in browser.find_element("id", "stats").text, 5, "the stats line")


@pytest.mark.timeout(60)
def test_enter_sends_an_instruction(sink, browser):
    from selenium.webdriver.common.keys import Keys

    web, events = sink
    browser.get(web.url)
    box = browser.find_element("id", "text")
    box.send_keys("raise a tennis racket" + Keys.ENTER)
    got = _wait(lambda: events.drain(), 5, "the instruction on the queue")
    time.sleep(0.3)
    assert got + events.drain() == [Instruction("raise a tennis racket")]
    assert _get_json(web.url + "stats")["server"]["instructions_received"] == 1
    _wait(lambda: box.get_attribute("value") == "", 5, "the box to clear")


@pytest.mark.timeout(60)
def test_push_to_talk_sends_microphone_audio(sink, browser):
    from selenium.webdriver.common.action_chains import ActionChains

    web, events = sink
    browser.get(web.url)
    talk = browser.find_element("id", "talk")
    ActionChains(browser).click_and_hold(talk).perform()
    time.sleep(1.2)
    ActionChains(browser).release(talk).perform()
    chunks: list[AudioChunk] = []

    def enough():
        chunks.extend(e for e in events.drain() if isinstance(e, AudioChunk))
        return sum(len(c.samples) for c in chunks) > 0.5 * SAMPLE_RATE

    _wait(enough, 10, "0.5 s of microphone audio")
    time.sleep(0.5)
    chunks.extend(e for e in events.drain() if isinstance(e, AudioChunk))
    samples = np.concatenate([c.samples for c in chunks])
    assert all(c.samples.dtype == np.float32 and c.samples.ndim == 1 for c in chunks)
    assert len(samples) < 3 * SAMPLE_RATE            # stopped on release
    assert np.abs(samples).max() > 0.05              # the fake device beeps
    assert _get_json(web.url + "stats")["server"]["audio_samples_received"] == len(samples)


def test_bad_requests_get_400(sink):
    web, events = sink
    status, body = _post(web.url + "instruction", json.dumps({"text": "  "}).encode(), "application/json")
    assert status == 400 and "empty" in body["error"]
    status, body = _post(web.url + "instruction", json.dumps({"text": "x" * 5000}).encode(), "application/json")
    assert status == 400 and "characters" in body["error"]
    status, body = _post(web.url + "instruction", b"not json", "application/json")
    assert status == 400
    status, body = _post(web.url + "audio", b"\x00" * 7, "application/octet-stream")
    assert status == 400 and "whole number" in body["error"]
    status, body = _post(web.url + "audio", np.array([np.nan], "<f4").tobytes(), "application/octet-stream")
    assert status == 400
    status, body = _post(web.url + "audio?format=s16le", np.array([16384, -16384], "<i2").tobytes(),
                         "application/octet-stream")
    assert status == 200 and body["samples"] == 2
    assert [e for e in events.drain() if not isinstance(e, AudioChunk)] == []
    assert _get_json(web.url + "stats")["server"]["instructions_received"] == 0


def test_port_in_use_is_a_one_line_stream_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StreamError) as err:
            WebSink("127.0.0.1", port, EventQueue())
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "\n" not in message


def test_close_ends_open_streams_and_is_idempotent(sink):
    web, _ = sink
    mjpeg = urllib.request.urlopen(web.url + "stream.mjpg", timeout=5)
    sse = urllib.request.urlopen(web.url + "events", timeout=5)
    assert mjpeg.read(9) == b"--frame\r\n"
    assert sse.readline().startswith(b"retry:")
    start = time.monotonic()
    web.close()
    web.close()
    assert time.monotonic() - start < 3
    mjpeg.read()                                      # both end at EOF, without a reset
    sse.read()
    with pytest.raises(StreamError):
        web.write(*_chunk(0))


def test_page_and_scripts_are_package_files_with_the_shared_instruction_limit(sink):
    from importlib import resources
    from stages.stream.events import MAX_INSTRUCTION_CHARS
    web, _ = sink
    with urllib.request.urlopen(web.url, timeout=5) as r:
        page = r.read().decode()
    assert f'maxlength="{MAX_INSTRUCTION_CHARS}"' in page and "{{" not in page      # every placeholder filled
    assert '<script src="/app.js"></script>' in page and "<title>vidu test</title>" in page
    static = resources.files("stages.stream").joinpath("static")
    for name, marker in (("app.js", "new EventSource('/events')"), ("mic-worklet.js", "registerProcessor('mic-16k'")):
        with urllib.request.urlopen(web.url + name, timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/javascript")
            body = r.read()
        assert body == static.joinpath(name).read_bytes() and marker in body.decode()
    status, body = _post(web.url + "instruction", json.dumps({"text": "x" * (MAX_INSTRUCTION_CHARS + 1)}).encode(),
                         "application/json")
    assert status == 400                                           # the page's limit is stdin's (events.py)
    status, _ = _post(web.url + "instruction", json.dumps({"text": "x" * MAX_INSTRUCTION_CHARS}).encode(),
                      "application/json")
    assert status == 200


@pytest.mark.timeout(300)
def test_page_streams_the_starter_model(browser, tmp_path):
    """`vidu stream --serve` with no --ckpt (the starter model, on this CPU) in headless Chromium: the
    page's image is the model's 256 x 256 frames, not blank, and changes as chunks arrive; a screenshot
    of the page is kept (tmp_path/page.png; benchmarks/figures/starter_live_page.png is one)."""
    import io
    import os
    import signal
    import subprocess
    import sys

    from PIL import Image

    from stages import synth
    from tests.test_runner import _as_in_a_terminal
    s = synth.make_sample(7, 256, 256, 25, 0.2, split="eval")
    Image.fromarray(synth.render(s.identity, synth.State(), 256, 256, s.scene)).save(tmp_path / "ref.png")
    proc = subprocess.Popen([sys.executable, "-m", "vidu_cli", "stream", "--image", str(tmp_path / "ref.png"), "--serve",
                             "127.0.0.1:0", "--device", "cpu"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_as_in_a_terminal)   # SIGINT acts even when the suite runs as a background job
    try:
        url, said = None, []
        while url is None:
            line = proc.stderr.readline()
            assert line, "vidu stream ended before serving: " + "".join(said)
            said.append(line)
            if line.startswith("serving on "):
                url = line.split()[-1]
        assert any("running the starter model" in ln for ln in said)
        browser.get(url)
        _wait(lambda: browser.execute_script("return document.getElementById('view').naturalWidth") == 256, 120,
              "the first frame")
        shots = []

        def grab():
            png = browser.execute_script(CAPTURE).split(",", 1)[1]
            import base64
            px = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB"))
            if not shots or not np.array_equal(px, shots[-1]):
                shots.append(px)
            return len(shots) >= 3
        _wait(grab, 120, "three different frames")
        for px in shots:
            assert px.shape == (256, 256, 3) and px.std() > 20            # a picture, not a blank or flat frame
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
