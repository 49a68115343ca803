"""`vidu serve`'s page in a real headless Chromium: upload a reference image, receive the WebRTC video
(frames that change) and audio, send an instruction over the data channel and see it acknowledged.
Skips where chromium / chromedriver are missing (tests/browser.py)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import pytest

from stages.serve.model import ServeModel
from stages.serve.options import ServeOptions
from tests.serve_helpers import png, running
from tests.browser import CAPTURE, chromium_driver
from tests.browser import wait as _wait

STATS = """const done = arguments[arguments.length - 1];
window.vidu.pc.getStats().then(r => { const out = {};
  r.forEach(s => { if (s.type === 'inbound-rtp') out[s.kind] = {packets: s.packetsReceived, frames: s.framesDecoded || 0}; });
  done(out); });"""


@pytest.fixture
def chromium(request, tmp_path):
    return chromium_driver(request, tmp_path)


@pytest.fixture
def server(tmp_path):
    """vidu serve (tiny preset, random weights) on a loopback port, its event loop on a thread: the URL."""
    model = ServeModel(None, "tiny")
    model.calibrate(1)
    ready, stop, box = threading.Event(), None, {}

    async def main():
        nonlocal stop
        stop = asyncio.Event()
        async with running(ServeOptions(speed=0.01), [model]) as url:
            box["url"] = url
            ready.set()
            await stop.wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    yield box["url"]
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


@pytest.mark.timeout(120)
def test_page_receives_webrtc_video_and_audio_and_acks_an_instruction(server, chromium, tmp_path):
    from selenium.webdriver.common.keys import Keys
    (tmp_path / "ref.png").write_bytes(png(96, 96))
    chromium.get(server + "/")
    assert chromium.title == "vidu serve" and chromium.execute_script("return document.body.dataset.session") == ""
    chromium.find_element("id", "image").send_keys(str(tmp_path / "ref.png"))
    from selenium.webdriver.support.ui import Select
    from stages.synth.voice import VOICES
    voices = Select(chromium.find_element("id", "voice"))
    assert [o.get_attribute("value") for o in voices.options] == ["", *sorted(VOICES)]
    voices.select_by_value("zoe")
    chromium.find_element("css selector", "#start button").click()
    _wait(lambda: chromium.execute_script("return document.getElementById('view').videoWidth") == 64, 40,
          "the first video frame")
    shots = set()
    _wait(lambda: shots.add(chromium.execute_script(CAPTURE)) or len(shots - {None}) >= 3, 20, "the video to change")
    _wait(lambda: chromium.execute_async_script(STATS).get("audio", {}).get("packets", 0) > 20, 20, "audio packets")
    stats = chromium.execute_async_script(STATS)
    assert stats["video"]["frames"] >= 3
    box = chromium.find_element("id", "text")
    box.send_keys("turn to the left" + Keys.ENTER)
    _wait(lambda: chromium.execute_script("return window.vidu.acks") == 1, 10, "the instruction's ack")
    sid = chromium.execute_script("return window.vidu.id")

    def info():
        with urllib.request.urlopen(f"{server}/sessions/{sid}", timeout=5) as r:
            return json.loads(r.read())
    _wait(lambda: info()["frames_sent"] > 10, 10, "more than 10 frames sent")
    info = info()
    assert [h["text"] for h in info["history"]] == ["turn to the left"]
    assert "turn to the left" in chromium.find_element("id", "note").text
    assert info["viewer"] is True and info["voice"] == "zoe"              # the voice chosen on the page
    # push-to-talk: the fake microphone's beeps, 16 kHz s16le over the data channel, reach the session
    from selenium.webdriver.common.action_chains import ActionChains
    talk = chromium.find_element("id", "talk")
    ActionChains(chromium).click_and_hold(talk).perform()
    time.sleep(1.5)
    ActionChains(chromium).release(talk).perform()

    def heard() -> float:
        with urllib.request.urlopen(f"{server}/metrics", timeout=5) as r:
            line = next(ln for ln in r.read().decode().splitlines() if ln.startswith("vidu_serve_audio_samples_total "))
        return float(line.split()[1])
    _wait(lambda: heard() > 0.5 * 16000, 10, "0.5 s of microphone audio at the server")
    time.sleep(0.5)
    assert heard() < 3 * 16000                                    # it stopped on release
