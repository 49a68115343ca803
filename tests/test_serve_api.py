"""`vidu serve`'s HTTP API on a real server (aiohttp on a loopback port) over the tiny preset with
random weights: sessions, bad input, tokens, origins, rate limits, admission, metrics. Sessions here
have no viewer, so they generate nothing: the admission decisions rest on the calibrated, measured
chunk times alone and are exact."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from aiohttp import ClientSession

from stages.serve.model import ServeModel
from stages.serve.options import ServeError, ServeOptions
from tests.conftest import cli
from tests.serve_helpers import parse_prometheus, png, running, upload, value

SLOW = 0.01          # speed: admit sessions at 1/100 of real time (the tiny preset on 2 CPU cores is not real time)


@pytest.fixture(scope="module")
def model():
    m = ServeModel(None, "tiny")
    m.calibrate(2)
    return m


def run(coro):
    return asyncio.run(coro)


async def _post_session(http, url, form=None, **kw):
    r = await http.post(url + "/sessions", data=form if form is not None else upload(png()), **kw)
    return r.status, await r.json()


def _one_line(body: dict) -> str:
    assert set(body) >= {"error"} and isinstance(body["error"], str) and body["error"]
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    return body["error"]


def test_create_read_and_close_a_session(model):
    async def main():
        async with running(ServeOptions(speed=SLOW), [model]) as url, ClientSession() as http:
            status, info = await _post_session(http, url, upload(png(), instruction="wave hello", seed=3, voice="cleo"))
            assert status == 201 and len(info["id"]) == 32 and info["profile"]["name"] == "full"
            assert info["voice"] == "cleo"                               # a character voice (the page offers them)
            r = await http.get(url + "/voices")
            listed = await r.json()
            from stages.synth.voice import VOICES
            assert listed["default"] == "en-us" and list(listed["voices"]) == sorted(VOICES)
            assert listed["voices"]["cleo"] == {"espeak": VOICES["cleo"][0], "pitch": VOICES["cleo"][1]}
            assert (info["width"], info["height"], info["fps"]) == (64, 64, 25)
            assert info["instruction"] == "wave hello" and info["chunks"] == 0 and info["viewer"] is False
            r = await http.get(f"{url}/sessions/{info['id']}")
            assert r.status == 200 and (await r.json())["id"] == info["id"]
            r = await http.post(f"{url}/sessions/{info['id']}/instruction", json={"text": "nod"})
            assert r.status == 200 and (await r.json())["text"] == "nod"
            assert [h["text"] for h in (await (await http.get(f"{url}/sessions/{info['id']}")).json())["history"]] == ["nod"]
            r = await http.delete(f"{url}/sessions/{info['id']}")
            assert r.status == 200 and (await r.json())["ok"] is True
            for method in ("get", "delete"):
                r = await getattr(http, method)(f"{url}/sessions/{info['id']}")
                assert r.status == 404 and _one_line(await r.json()) == "no such session"
    run(main())


def test_bad_requests_get_one_line_4xx_and_the_server_keeps_serving(model):
    opts = ServeOptions(speed=SLOW, max_upload_bytes=100_000, max_image_side=512)

    async def main():
        async with running(opts, [model]) as url, ClientSession() as http:
            status, good = await _post_session(http, url)
            assert status == 201
            cases = [
                (upload(b"hello, not an image\n"), 400, "not a readable image"),
                (upload(), 400, "an image file is required"),
                (upload("/etc/passwd"), 400, "must be an uploaded file"),   # a path, as text
                (upload(png(), path="../../etc/passwd"), 400, "unknown field 'path'"),
                (upload(png(600, 20)), 400, "at most 512 px"),
                (upload(png(8, 8)), 400, "at least 16 px"),
                (upload(png(300, 300)), 413, "larger than 100000 bytes"),               # ~270 kB of noise
                (upload(png(), seed="-1"), 400, "the seed"),
                (upload(png(), voice="../../x"), 400, "not a voice name"),
            ]
            for form, code, words in cases:
                status, body = await _post_session(http, url, form)
                assert status == code and words in _one_line(body), (code, words, status, body)
            r = await http.post(url + "/sessions", data=b"x" * 5_000_000,           # said up front: refused unread
                                headers={"Content-Type": "multipart/form-data; boundary=b"})
            assert r.status == 413 and "larger than 100000 bytes" in _one_line(await r.json())

            async def stream():                                                      # not said: cut at the limit
                yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
                for _ in range(100):
                    yield b"\0" * 65536
            r = await http.post(url + "/sessions", data=stream(), headers={"Content-Type": "multipart/form-data; boundary=b"})
            assert r.status == 413
            r = await http.post(url + "/sessions", json={"image": "/etc/passwd"})
            assert r.status == 415 and "multipart" in _one_line(await r.json())
            sid = good["id"]
            for path, body, code in ((f"/sessions/{sid}/instruction", b"{not json", 400),
                                     (f"/sessions/{sid}/instruction", b"[1, 2]", 400),
                                     (f"/sessions/{sid}/instruction", json.dumps({"text": "  "}).encode(), 400),
                                     (f"/sessions/{sid}/instruction", json.dumps({"text": "x" * 5000}).encode(), 400),
                                     (f"/sessions/{sid}/offer", b'{"sdp": "hello", "type": "offer"}', 400),
                                     (f"/sessions/{sid}/offer", b'{"sdp": "v=0\\r\\nnonsense", "type": "offer"}', 400),
                                     ("/sessions/0123456789abcdef0123456789abcdef/instruction", b'{"text": "a"}', 404),
                                     ("/sessions/..%2F..%2Fetc%2Fpasswd/instruction", b'{"text": "a"}', 404)):
                r = await http.post(url + path, data=body, headers={"Content-Type": "application/json"})
                assert r.status == code, (path, body, r.status)
                _one_line(await r.json())
            for path in ("/../pyproject.toml", "/static/../../pyproject.toml", "/%2e%2e/%2e%2e/etc/passwd",
                         "/app.js/../../pyproject.toml", "/sessions/../../etc/passwd"):
                r = await http.get(url + path)
                text = await r.text()
                assert r.status == 404 and "[project]" not in text and "root:" not in text, (path, r.status)
            # the server still serves the first session and admits another
            r = await http.post(f"{url}/sessions/{sid}/instruction", json={"text": "still here"})
            assert r.status == 200
            info = await (await http.get(f"{url}/sessions/{sid}")).json()
            assert [h["text"] for h in info["history"]] == ["still here"]
            status, other = await _post_session(http, url)
            assert status == 201 and other["id"] != sid
    run(main())


def test_binding_beyond_loopback_needs_a_token_and_requests_need_it(model):
    with pytest.raises(ServeError, match="--token"):
        from stages.serve.app import create_app
        create_app(ServeOptions(host="0.0.0.0"), [model])
    res = cli("serve", "--host", "0.0.0.0", "--preset", "tiny", "--device", "cpu", check=False,
              env={"VIDU_SERVE_TOKEN": None})
    assert res.returncode == 2 and "--token" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    token = "correct-horse-battery"

    async def main():
        async with running(ServeOptions(token=token, speed=SLOW), [model]) as url, ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer wrong-token-xx"}, {"Authorization": token}):
                for method, path in (("get", "/metrics"), ("get", "/capacity"), ("get", "/voices"), ("post", "/sessions")):
                    r = await getattr(http, method)(url + path, headers=headers)
                    assert r.status == 401 and "token" in _one_line(await r.json())
            auth = {"Authorization": f"Bearer {token}"}
            status, info = await _post_session(http, url, headers=auth)
            assert status == 201
            r = await http.get(f"{url}/sessions/{info['id']}")
            assert r.status == 401
            assert (await http.get(f"{url}/sessions/{info['id']}", headers=auth)).status == 200
            assert (await http.get(url + "/")).status == 200          # the page itself is public; its API calls are not
    run(main())


def test_cross_origin_requests_are_refused_and_no_cors_headers_are_sent(model):
    async def main():
        async with running(ServeOptions(speed=SLOW), [model]) as url, ClientSession() as http:
            status, body = await _post_session(http, url, headers={"Origin": "http://evil.example"})
            assert status == 403 and "cross-origin" in _one_line(body)
            status, body = await _post_session(http, url, headers={"Sec-Fetch-Site": "cross-site"})
            assert status == 403
            r = await http.options(url + "/sessions", headers={"Origin": "http://evil.example",
                                                             "Access-Control-Request-Method": "POST"})
            assert r.status >= 400 and "Access-Control-Allow-Origin" not in r.headers
            status, body = await _post_session(http, url, headers={"Origin": url})     # the page's own origin
            assert status == 201
            r = await http.get(f"{url}/sessions/{body['id']}", headers={"Origin": "http://evil.example"})
            assert "Access-Control-Allow-Origin" not in r.headers
    run(main())


def test_requests_beyond_the_per_client_rate_get_429(model):
    async def main():
        async with running(ServeOptions(speed=SLOW, requests_per_s=0.01, request_burst=5), [model]) as url, \
                ClientSession() as http:
            codes = [(await http.get(url + "/health")).status for _ in range(8)]
            assert codes == [200] * 5 + [429] * 3
            r = await http.get(url + "/health")
            assert r.status == 429 and "too many" in _one_line(await r.json())
    run(main())


def test_the_session_after_max_sessions_is_refused_503(model):
    async def main():
        async with running(ServeOptions(speed=SLOW, max_sessions=2), [model]) as url, ClientSession() as http:
            a = [await _post_session(http, url) for _ in range(2)]
            assert [s for s, _ in a] == [201, 201]
            status, body = await _post_session(http, url)
            assert status == 503 and body["reason"] == "max_sessions" and "--max-sessions" in _one_line(body)
            await http.delete(f"{url}/sessions/{a[0][1]['id']}")
            status, _ = await _post_session(http, url)
            assert status == 201
        async with running(ServeOptions(speed=SLOW, max_sessions=2), [model]) as url, ClientSession() as http:
            got = await asyncio.wait_for(asyncio.gather(*[_post_session(http, url) for _ in range(5)]), 60)
            assert sorted(s for s, _ in got) == [201, 201, 503, 503, 503]          # at once: the limit still holds
    run(main())


def test_admission_degrades_then_refuses_by_the_measured_chunk_times(model):
    """speed is chosen from the measured loads so that exactly a full session and one at the cheapest
    profile fit: the second session is degraded, the third refused (503, capacity)."""
    for _ in range(3):              # a shared CPU's noise can invert one measurement: measure again (at most twice)
        loads = {p.name: p.load for p in model.profiles}
        cheapest = min(loads, key=loads.get)
        if cheapest != "full":
            break
        model.calibrate(4)
    assert cheapest != "full" and loads[cheapest] < loads["full"]       # a degraded profile is cheaper (measured)
    headroom = 0.9
    speed = headroom / (loads["full"] + loads[cheapest]) * (1 - 1e-6)
    expected = next(n for n in loads if speed * (loads["full"] + loads[n]) <= headroom)

    async def main():
        async with running(ServeOptions(speed=speed, headroom=headroom, max_sessions=10), [model]) as url, \
                ClientSession() as http:
            cap = await (await http.get(url + "/capacity")).json()
            assert [p["name"] for p in cap["workers"][0]["profiles"]] == list(loads)
            got = [await _post_session(http, url) for _ in range(3)]
            assert [s for s, _ in got] == [201, 201, 503]
            assert [b["profile"]["name"] for _, b in got[:2]] == ["full", expected]
            assert expected != "full"
            assert got[2][1]["reason"] == "capacity" and "real time" in _one_line(got[2][1])
            cap = await (await http.get(url + "/capacity")).json()
            assert cap["workers"][0]["load"] == pytest.approx(speed * (loads["full"] + loads[expected]), rel=1e-3)
            # negative control: twice the speed admits the full session alone, then nothing fits
            await http.delete(f"{url}/sessions/{got[1][1]['id']}")
            await http.delete(f"{url}/sessions/{got[0][1]['id']}")
        async with running(ServeOptions(speed=headroom / loads["full"] * (1 - 1e-6), headroom=headroom), [model]) as url, \
                ClientSession() as http:
            got = [await _post_session(http, url) for _ in range(2)]
            assert [s for s, _ in got] == [201, 503] and got[0][1]["profile"]["name"] == "full"
    run(main())


def test_metrics_are_prometheus_text_with_the_counts(model):
    async def main():
        async with running(ServeOptions(speed=SLOW, max_sessions=1), [model]) as url, ClientSession() as http:
            assert (await _post_session(http, url))[0] == 201
            assert (await _post_session(http, url))[0] == 503
            r = await http.get(url + "/metrics")
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            fams = parse_prometheus(await r.text())
            for name, kind in (("vidu_serve_sessions", "gauge"), ("vidu_serve_sessions_admitted_total", "counter"),
                               ("vidu_serve_sessions_refused_total", "counter"), ("vidu_serve_chunk_seconds", "histogram"),
                               ("vidu_serve_frames_dropped_total", "counter"), ("vidu_serve_frames_sent_total", "counter"),
                               ("vidu_serve_session_fps", "gauge"), ("vidu_serve_worker_load", "gauge")):
                assert fams[name]["type"] == kind and fams[name]["help"], name
            assert value(fams, "vidu_serve_sessions") == 1
            assert value(fams, "vidu_serve_sessions_admitted_total", profile="full") == 1
            assert value(fams, "vidu_serve_sessions_refused_total", reason="max_sessions") == 1
            assert value(fams, "vidu_serve_chunk_seconds_count") == 0                 # no viewer: nothing generated
            assert value(fams, "vidu_serve_worker_load", worker="0") == pytest.approx(SLOW * model.profiles[0].load, rel=1e-3)
    run(main())
    with pytest.raises(ValueError):                   # negative controls of the parser
        parse_prometheus("# TYPE x gauge\nx one\n")
    with pytest.raises(ValueError):
        parse_prometheus("y 1\n")
    with pytest.raises(ValueError):
        parse_prometheus('# TYPE h histogram\nh_bucket{le="1"} 3\nh_bucket{le="+Inf"} 2\nh_count 2\nh_sum 1\n')


def test_a_session_without_a_viewer_is_closed_after_the_grace(model):
    async def main():
        async with running(ServeOptions(speed=SLOW, connect_timeout_s=1.0), [model]) as url, ClientSession() as http:
            _, info = await _post_session(http, url)
            assert (await http.get(f"{url}/sessions/{info['id']}")).status == 200
            await asyncio.sleep(2.5)
            assert (await http.get(f"{url}/sessions/{info['id']}")).status == 404
            fams = parse_prometheus(await (await http.get(url + "/metrics")).text())
            assert value(fams, "vidu_serve_sessions") == 0 and value(fams, "vidu_serve_sessions_closed_total") == 1
    run(main())


@pytest.mark.timeout(180)
def test_vidu_serve_command_serves_and_stops_on_ctrl_c(tmp_path):
    """The real command in a process: it says where it serves, admits a session over HTTP, and Ctrl-C ends it
    cleanly (exit 130, no traceback, its shared memory removed)."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from tests.test_runner import _as_in_a_terminal
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen([sys.executable, "-m", "vidu_cli", "serve", "--preset", "tiny", "--device", "cpu", "--port", "0",
                             "--calib-chunks", "1", "--speed", "0.01", "--max-sessions", "1", "--size", "96x80", "--max-batch", "2"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_as_in_a_terminal)
    try:
        said = []
        while True:
            line = proc.stderr.readline()
            assert line, "vidu serve ended before serving: " + "".join(said)
            said.append(line)
            if line.startswith("serving on "):
                url = line.split()[-1].rstrip("/")
                break
        assert any(ln.strip().startswith("full: ") and " ms per 160 ms chunk" in ln for ln in said)
        assert any(ln.strip().split(":")[0].endswith("-48x32") for ln in said), said     # --size's half profile
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert json.loads(r.read()) == {"ok": True}

        async def create():
            async with ClientSession() as http:
                return [await _post_session(http, url) for _ in range(2)]
        (first, info), (second, _) = run(create())
        assert (first, second) == (201, 503) and (info["width"], info["height"]) == (96, 80)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        err = proc.stderr.read()            # (not communicate(): it would miss what readline() buffered)
    assert proc.returncode == 130 and "Traceback" not in err and "leaked" not in err, err[-2000:]
    assert set(os.listdir("/dev/shm")) <= shm_before     # the core's frame ring (stages/serve/ring.py) is gone
    events = [json.loads(ln)["event"] for ln in "".join(said).splitlines() + err.splitlines() if ln.startswith("{")]
    assert "serving" in events and "session_created" in events and "session_refused" in events and "session_closed" in events


def test_size_sets_every_profile_and_the_frames():
    """--size: the full profile at that size, the half profile at half of it, and frames of that size;
    a size off the 16-px grid is one line before anything is served."""
    from stages.serve.model import live_options
    from stages.stream.events import EventQueue, StreamError
    from stages.stream.session import Session
    m = ServeModel(None, "tiny", size=(96, 80))
    assert [(p.width, p.height) for p in m.profiles][0] == (96, 80) and (m.profiles[-1].width, m.profiles[-1].height) == (48, 32)
    ref = np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    rgb, _, _ = Session(m.parts(ref, m.profiles[0], 1), EventQueue(), live_options()).next_chunk()
    assert rgb.shape[1:] == (80, 96, 3)
    with pytest.raises(StreamError, match="multiples of 16 px"):
        ServeModel(None, "tiny", size=(100, 80))


def test_spoken_commands_in_push_to_talk_become_instructions(model):
    """Push-to-talk speech (espeak-ng, a voice held out of the spotter's training) saying "raise your hand"
    becomes the instruction "raise a hand" (source voice): in the history, on the engine's queue in the core,
    counted.
    Controls: a sentence without a command gives none, and the same command on a server started with
    commands off gives none (waited for twice as long as the command took to be found)."""
    import time

    from stages.serve.app import STATE
    from stages.stream.events import Instruction
    from stages.synth.speech import tts
    pause = np.zeros(8000, np.float32)
    command = np.concatenate([pause, tts("Okay, raise your hand now.", "en-us+m3").audio, pause])
    plain = np.concatenate([pause, tts("The weather was lovely by the sea today.", "en-us+m3").audio, pause])

    async def talk(commands: bool, audio: np.ndarray, wait_s: float | None):
        apps: list = []
        async with running(ServeOptions(speed=SLOW, commands=commands), [model], apps) as url, ClientSession() as http:
            status, info = await _post_session(http, url)
            assert status == 201
            s = apps[0][STATE].sessions[info["id"]]
            assert (s.commands is not None) == commands
            t0 = time.monotonic()
            for i in range(0, len(audio), 1600):                # the page sends ~0.1 s a message
                s.speech(audio[i:i + 1600])
                await asyncio.sleep(0)
            while True:
                history = (await (await http.get(f"{url}/sessions/{info['id']}")).json())["history"]
                took = time.monotonic() - t0
                if history or took > (wait_s or 30):
                    break
                await asyncio.sleep(0.1)
            fams = parse_prometheus(await (await http.get(url + "/metrics")).text())   # (after the core's answer:
            core = apps[0][STATE].cores[0].runner.core                           # it has read the events before)
            return history, core.sessions[info["id"]].session.events.drain(), fams, took

    history, queued, fams, took = asyncio.run(talk(True, command, None))
    assert [(h["text"], h["source"]) for h in history] == [("raise a hand", "voice")], history
    assert Instruction("raise a hand") in queued
    assert value(fams, "vidu_serve_voice_commands_total") == 1 and value(fams, "vidu_serve_instructions_total") == 1
    for commands, audio in ((True, plain), (False, command)):
        history, queued, fams, _ = asyncio.run(talk(commands, audio, 2 * took))
        assert history == [] and not any(isinstance(e, Instruction) for e in queued)
        assert value(fams, "vidu_serve_voice_commands_total") == 0


def test_sessions_spread_over_workers_and_stay_pinned(model):
    """Two workers (`vidu serve --gpus 2` makes one per GPU; here two CPU models): a new session goes to the
    least-loaded worker at its first fitting profile, stays on it, and its load leaves with it."""
    other = ServeModel(None, "tiny")
    other.calibrate(2)

    async def main():
        async with running(ServeOptions(speed=SLOW), [model, other]) as url, ClientSession() as http:
            ids, workers = [], []
            for _ in range(4):
                status, info = await _post_session(http, url)
                assert status == 201
                ids.append(info["id"])
                workers.append(info["worker"])
            assert sorted(workers[:2]) == [0, 1]                     # the second goes to the idle worker
            cap = await (await http.get(url + "/capacity")).json()
            assert [w["sessions"] for w in cap["workers"]] == [workers.count(0), workers.count(1)]
            for sid, w in zip(ids, workers):
                assert (await (await http.get(f"{url}/sessions/{sid}")).json())["worker"] == w
            await http.delete(f"{url}/sessions/{ids[0]}")
            after = await (await http.get(url + "/capacity")).json()
            lost = workers[0]
            assert after["workers"][lost]["sessions"] == workers.count(lost) - 1
            assert after["workers"][lost]["load"] < cap["workers"][lost]["load"]
            assert after["workers"][1 - lost]["load"] == cap["workers"][1 - lost]["load"]
    asyncio.run(main())


def test_model_processes_say_why_they_cannot_start_and_one_ending_fails_only_its_sessions(tmp_path):
    """`vidu serve`'s models run in a process per device (stages/serve/core.py; two CPU ones here). A
    checkpoint that cannot load is one line; when one process dies, its session fails with the reason, the
    other process's session goes on, a new session goes to the survivor, and the server still answers; with
    both gone a new one is refused (503, reason "ended")."""
    import time

    import torch

    from stages.serve.core import CoreHandle, ModelSpec
    opts = ServeOptions(speed=SLOW, calib_chunks=1, max_batch=1)
    with pytest.raises(ServeError) as e:
        CoreHandle.processes([ModelSpec(str(tmp_path / "none.safetensors"), "tiny", "cpu", torch.float32)], opts, 120)
    assert "none.safetensors" in str(e.value) and "\n" not in str(e.value)

    cores = CoreHandle.processes([ModelSpec(None, "tiny", "cpu", torch.float32)] * 2, opts, 120)
    assert [c.index for c in cores] == [0, 1] and all(c.profiles[0].name == "full" and c.profiles[0].chunk_s > 0 for c in cores)

    async def main():
        async with running(opts, cores) as url, ClientSession() as http:
            made = [await _post_session(http, url) for _ in range(2)]
            assert [m[0] for m in made] == [201, 201] and sorted(m[1]["worker"] for m in made) == [0, 1]
            by_worker = {m[1]["worker"]: m[1]["id"] for m in made}
            cores[0].runner.kill()
            t = time.monotonic()
            while time.monotonic() - t < 30:
                info = await (await http.get(f"{url}/sessions/{by_worker[0]}")).json()
                if info.get("error"):
                    break
                await asyncio.sleep(0.1)
            assert info["error"] in ("the model process has ended", "no such session"), info
            assert (await (await http.get(f"{url}/sessions/{by_worker[1]}")).json())["error"] is None
            status, info = await _post_session(http, url)
            assert status == 201 and info["worker"] == 1
            cores[1].runner.kill()
            await asyncio.sleep(1.0)
            status, body = await _post_session(http, url)
            assert status == 503 and body["reason"] == "ended" and _one_line(body)
            assert (await (await http.get(url + "/health")).json()) == {"ok": True}
    run(main())


def test_a_session_the_core_fails_to_make_is_refused_and_admission_goes_on(model, monkeypatch):
    """Making a session fails in the core (out of memory, say): that request is answered (503, reason
    "failed", one line), never left waiting with the admission lock held, and the next one is admitted."""
    real = model.parts
    calls = []

    def parts(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (as if)")
        return real(*a, **kw)
    monkeypatch.setattr(model, "parts", parts)

    async def main():
        async with running(ServeOptions(speed=SLOW), [model]) as url, ClientSession() as http:
            status, body = await asyncio.wait_for(_post_session(http, url), 30)
            assert status == 503 and body["reason"] == "failed" and "out of memory" in _one_line(body)
            status, info = await asyncio.wait_for(_post_session(http, url), 30)
            assert status == 201 and len(calls) == 2
    run(main())


def test_ice_servers_are_checked_before_anything_loads(monkeypatch):
    """--ice-server: STUN and TURN URLs as aiortc reads them, one of each, a TURN server with its username and
    credential (the credential from $VIDU_TURN_CREDENTIAL too); anything else one line, exit 2, nothing served."""
    ok = ServeOptions(ice_servers=("stun:stun.example.org", "turn:turn.example.org:3478?transport=tcp"),
                      turn_username="u", turn_credential="c")
    assert ok.ice() == [{"urls": "stun:stun.example.org"},
                        {"urls": "turn:turn.example.org:3478?transport=tcp", "username": "u", "credential": "c"}]
    monkeypatch.setenv("VIDU_TURN_CREDENTIAL", "from-env")
    assert ServeOptions.from_env(ice_servers=("turn:t.example.org",), turn_username="u").ice()[0]["credential"] == "from-env"
    for bad, why in [(("https://stun.example.org",), "not a STUN or TURN URL"), (("stun:a.example.org", "stun:b.example.org"), "more than one STUN"),
                     (("turn:t.example.org",), "needs --turn-username"), (("turns:t.example.org?transport=udp",), "turns: over tcp")]:
        with pytest.raises(ServeError, match=why):
            ServeOptions(ice_servers=bad)
    res = cli("serve", "--ice-server", "stun:", "--preset", "tiny", "--device", "cpu", check=False)
    assert res.returncode == 2 and "not a STUN or TURN URL" in res.stderr and "Traceback" not in res.stderr


def test_a_core_that_does_not_answer_in_time_fails_the_request_and_its_late_session_is_closed(model, monkeypatch):
    """A hung core (here: making a session takes 3 s, the create timeout is 1 s) fails that request (503
    "failed", one line) instead of holding the admission lock; the session it makes late is closed at once
    (the core reads messages in order), so it holds no capacity: the core ends with no session."""
    import time

    from stages.serve import core as core_mod
    from stages.serve.app import STATE
    monkeypatch.setitem(core_mod.REQUEST_TIMEOUT_S, "create", 1.0)
    real = model.parts
    monkeypatch.setattr(model, "parts", lambda *a, **kw: (time.sleep(3.0), real(*a, **kw))[1])

    async def main():
        apps = []
        async with running(ServeOptions(speed=SLOW), [model], apps) as url, ClientSession() as http:
            t = time.monotonic()
            status, body = await _post_session(http, url)
            assert status == 503 and body["reason"] == "failed" and "did not answer create within 1 s" in _one_line(body)
            assert time.monotonic() - t < 2.5
            core = apps[0][STATE].cores[0].runner.core
            await asyncio.sleep(3.5)                       # the late session made, then closed
            cap = await (await http.get(url + "/capacity")).json()
            assert core.sessions == {} and cap["workers"][0]["sessions"] == 0 and cap["sessions"] == 0
    run(main())
