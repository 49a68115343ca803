"""`vidu serve` end to end over WebRTC in Python: an aiortc client on loopback creates a session of the
tiny preset (random weights), negotiates, receives video that changes and audio, talks (push-to-talk
PCM over the data channel, which comes back on the audio track: the stream plays its input speech),
sends instructions and gets them acknowledged, and reconnects to the same character."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from aiohttp import ClientSession
from aiortc import RTCPeerConnection, RTCSessionDescription

from stages.serve.model import ServeModel
from stages.serve.options import ServeOptions
from tests.serve_helpers import parse_prometheus, png, running, upload, value

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model():
    m = ServeModel(None, "tiny")
    m.calibrate(2)
    return m


class Viewer:
    """An aiortc peer that receives a session's tracks and talks on its data channel."""

    def __init__(self):
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        self.channel = self.pc.createDataChannel("control")
        self.opened = asyncio.Event()
        self.channel.on("open", self.opened.set)
        self.replies: list[dict] = []
        self.channel.on("message", lambda m: self.replies.append(json.loads(m)))
        self.frames: list[tuple[float, int, np.ndarray]] = []      # (arrival, pts, rgb)
        self.audio: list[tuple[float, np.ndarray]] = []            # (arrival, samples at 48 kHz mono)
        self.rates: set[int] = set()
        self.tasks = []
        self.pc.on("track", lambda t: self.tasks.append(asyncio.ensure_future(self._pull(t))))

    async def _pull(self, track):
        while True:
            try:
                f = await track.recv()
            except Exception:
                return
            if track.kind == "video":
                self.frames.append((time.monotonic(), f.pts, f.to_ndarray(format="rgb24")))
            else:
                self.rates.add(f.sample_rate)
                x = f.to_ndarray().astype(np.float32) / 32768.0           # [channels, n] interleaved s16
                self.audio.append((time.monotonic(), x.reshape(-1, len(f.layout.channels)).mean(1)
                                   if f.format.is_packed else x[0]))

    async def connect(self, http, url, sid):
        await self.pc.setLocalDescription(await self.pc.createOffer())
        r = await http.post(f"{url}/sessions/{sid}/offer", json={"sdp": self.pc.localDescription.sdp, "type": "offer"})
        assert r.status == 200, await r.text()
        await self.pc.setRemoteDescription(RTCSessionDescription(**await r.json()))
        await asyncio.wait_for(self.opened.wait(), 10)

    async def close(self):
        await self.pc.close()
        for t in self.tasks:
            t.cancel()


async def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _rms(chunks) -> float:
    x = np.concatenate([c for _, c in chunks]) if chunks else np.zeros(1)
    return float(np.sqrt(np.mean(x ** 2)))


def test_video_audio_instructions_and_push_to_talk_over_webrtc(model, monkeypatch):
    from stages.serve.core import CoreHandle
    told, send = [], CoreHandle.send

    def counting(self, *msg):
        if msg[0] == "timeline":
            told.append(msg[2:])                                     # (offset, since, next_frame)
        send(self, *msg)
    monkeypatch.setattr(CoreHandle, "send", counting)

    async def main():
        async with running(ServeOptions(speed=0.01, connect_timeout_s=30), [model]) as url, ClientSession() as http:
            r = await http.post(url + "/sessions", data=upload(png()))
            sid = (await r.json())["id"]
            v = Viewer()
            await v.connect(http, url, sid)
            await _until(lambda: len(v.frames) >= 25, 30, "25 video frames")
            shapes = {f.shape for _, _, f in v.frames}
            assert shapes == {(64, 64, 3)}
            distinct = {f.tobytes() for _, _, f in v.frames}
            assert len(distinct) >= 10                                   # the picture changes over time
            pts = [p for _, p, _ in v.frames]
            assert pts == sorted(pts) and len(set(pts)) == len(pts)       # in order, none twice
            await _until(lambda: len(v.audio) >= 25, 10, "audio frames")
            assert v.rates == {48000}
            silent = _rms(v.audio)
            assert silent < 0.01                                         # nobody has spoken yet: silence
            # an instruction over the data channel: acknowledged, in the history, and taken by the session
            v.channel.send(json.dumps({"type": "instruction", "text": "raise both hands", "id": 7}))
            await _until(lambda: any(m.get("type") == "ack" for m in v.replies), 10, "the ack")
            ack = next(m for m in v.replies if m["type"] == "ack")
            assert ack["id"] == 7 and ack["text"] == "raise both hands" and ack["chunk"] >= 1
            info = await (await http.get(f"{url}/sessions/{sid}")).json()
            assert [h["text"] for h in info["history"]] == ["raise both hands"]
            async def took():
                return (await (await http.get(f"{url}/sessions/{sid}")).json())["instruction"] == "raise both hands"
            for _ in range(100):
                if await took():
                    break
                await asyncio.sleep(0.1)
            assert await took()                                          # the engine read it off its queue
            # malformed messages get an error reply; the stream goes on
            n = len(v.frames)
            for bad in ("{oops", json.dumps({"type": "launch"}), json.dumps({"type": "instruction", "text": ""}),
                        json.dumps([1, 2])):
                v.channel.send(bad)
            await _until(lambda: sum(m.get("type") == "error" for m in v.replies) >= 4, 10, "four error replies")
            assert all("\n" not in m["error"] for m in v.replies if m["type"] == "error")
            # push-to-talk: 1 s of a 440 Hz tone as s16le 16 kHz; the stream plays its input speech
            t = np.arange(16000) / 16000
            tone = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
            sent_at = time.monotonic()
            for i in range(0, 16000, 1600):
                v.channel.send(tone[i:i + 1600].tobytes())
            await _until(lambda: _rms([a for a in v.audio if a[0] > sent_at]) > 0.05, 20, "the tone on the audio track")
            await _until(lambda: len(v.frames) > n + 10, 10, "more frames")
            fams = parse_prometheus(await (await http.get(url + "/metrics")).text())
            assert value(fams, "vidu_serve_audio_samples_total") == 16000
            assert value(fams, "vidu_serve_instructions_total") == 1
            assert value(fams, "vidu_serve_messages_rejected_total") == 4
            assert value(fams, "vidu_serve_chunk_seconds_count") >= 5
            assert value(fams, "vidu_serve_frames_sent_total") >= len(v.frames) - 2
            # the core hears of the viewer's position at the two wakes of each chunk, and when its clock moves
            # (connect, stalls), not at every frame: 30 messages for 52 frames here at 4 frames a chunk
            chunks = value(fams, "vidu_serve_chunk_seconds_count")
            position_only = sum(a[:2] == b[:2] for a, b in zip(told, told[1:]))
            assert 0 < position_only <= 2 * chunks and len(told) < value(fams, "vidu_serve_frames_sent_total")
            # push-to-talk that says a command: the viewer is told the instruction the spotter heard
            from stages.synth.speech import tts
            said = (np.clip(tts("Okay, raise your hand now.", "en-us+m3").audio, -1, 1) * 32767).astype("<i2")
            for i in range(0, len(said), 1600):
                v.channel.send(said[i:i + 1600].tobytes())
                await asyncio.sleep(0.05)
            await _until(lambda: any(m.get("type") == "command" for m in v.replies), 30, "the spoken command")
            heard = [m for m in v.replies if m["type"] == "command"]
            assert [(m["text"], m["source"]) for m in heard] == [("raise a hand", "voice")] and heard[0]["chunk"] >= 1
            await v.close()
    asyncio.run(main())


def test_a_viewer_reconnects_to_the_same_character(model):
    async def main():
        opts = ServeOptions(speed=0.01, connect_timeout_s=20, messages_per_s=0.01, message_burst=5, history=3)
        async with running(opts, [model]) as url, ClientSession() as http:
            r = await http.post(url + "/sessions", data=upload(png(), instruction="look left"))
            sid = (await r.json())["id"]
            v = Viewer()
            await v.connect(http, url, sid)
            await _until(lambda: len(v.frames) >= 10, 30, "frames")
            await v.close()
            await asyncio.sleep(1.0)
            info = await (await http.get(f"{url}/sessions/{sid}")).json()
            assert info["viewer"] is False
            before = info["chunks"]
            await asyncio.sleep(1.0)
            paused = await (await http.get(f"{url}/sessions/{sid}")).json()
            assert paused["chunks"] == before                            # no viewer: nothing generated
            w = Viewer()
            await w.connect(http, url, sid)
            await _until(lambda: len(w.frames) >= 10, 30, "frames after reconnecting")
            after = await (await http.get(f"{url}/sessions/{sid}")).json()
            assert after["viewer"] is True and after["chunks"] > before and after["instruction"] == "look left"
            assert after["frames_sent"] >= info["frames_sent"] + 10      # the same timeline goes on, not a new one
            # the session's message rate (burst 5) and its history (3 entries) are bounded
            for i in range(12):
                w.channel.send(json.dumps({"type": "instruction", "text": f"step {i}", "id": i}))
            await _until(lambda: len(w.replies) >= 12, 10, "12 replies")
            assert [m["type"] for m in w.replies] == ["ack"] * 5 + ["error"] * 7
            assert all("too many messages" in m["error"] for m in w.replies[5:])
            info = await (await http.get(f"{url}/sessions/{sid}")).json()
            assert [h["text"] for h in info["history"]] == ["step 2", "step 3", "step 4"]
            await w.close()
    asyncio.run(main())


def test_a_watched_session_without_input_is_closed_after_the_idle_timeout(model, monkeypatch):
    """The reaper takes the session out of the table before closing its peer connection; a slow close
    (here 2 s) must not hide it from /metrics meanwhile (CI once saw 404 with sessions_closed_total 0)."""
    from stages.serve.sessions import ServeSession
    drop = ServeSession._drop_viewer

    async def slow_drop(self):
        await asyncio.sleep(2.0)
        await drop(self)
    monkeypatch.setattr(ServeSession, "_drop_viewer", slow_drop)

    async def main():
        opts = ServeOptions(speed=0.01, idle_timeout_s=1.5)
        async with running(opts, [model]) as url, ClientSession() as http:
            sid = (await (await http.post(url + "/sessions", data=upload(png()))).json())["id"]
            v = Viewer()
            await v.connect(http, url, sid)
            await _until(lambda: len(v.frames) >= 5, 30, "frames")
            v.channel.send(json.dumps({"type": "instruction", "text": "keep me", "id": 1}))      # input: the clock restarts
            await asyncio.sleep(1.0)
            assert (await http.get(f"{url}/sessions/{sid}")).status == 200
            deadline = time.monotonic() + 10
            while (await http.get(f"{url}/sessions/{sid}")).status == 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert (await http.get(f"{url}/sessions/{sid}")).status == 404
            fams = parse_prometheus(await (await http.get(url + "/metrics")).text())
            assert value(fams, "vidu_serve_sessions_closed_total") == 1
            await v.close()
    asyncio.run(main())


def test_a_running_session_drops_to_fewer_steps_when_the_load_outgrows_the_budget(model):
    """The worker's budget is shrunk under the running session's measured load (as if its chunks had got
    slower): between two chunks the session moves to the fewer-steps profile at its resolution, the
    model runs one forward less per chunk, and the stream goes on. Before that (control) it stays full."""
    import dataclasses
    from collections import Counter

    from stages.serve.app import STATE
    dit = model.base.engine.model
    chunk_of_call: list[int] = []             # per forward of the model: the chunk its session was generating
    box = {}

    def count(*_):
        if box:
            chunk_of_call.append(box["session"].chunks)

    hook = dit.register_forward_hook(count)

    async def main():
        apps = []
        async with running(ServeOptions(speed=0.01), [model], apps) as url, ClientSession() as http:
            sid = (await (await http.post(url + "/sessions", data=upload(png()))).json())["id"]
            core = apps[0][STATE].cores[0].runner.core                  # (a core on a thread of this process)
            box["session"] = core.sessions[sid].session
            v = Viewer()
            await v.connect(http, url, sid)
            await _until(lambda: len(v.frames) >= 20, 30, "frames")
            info = await (await http.get(f"{url}/sessions/{sid}")).json()
            assert info["profile"]["name"] == "full" and info["degraded"] == [], info
            before = info["chunks"]
            worker = core.worker
            first = worker.model.profiles[0]
            with worker.cond:                    # fewer steps measured cheaper (the tiny preset's two are close)
                worker.batch_s[(worker.model.fewer_steps(first).name, 1)] = 0.5 * worker.batch_time(first, 1)
            worker.opts = dataclasses.replace(worker.opts, headroom=1e-9)
            for _ in range(200):
                info = await (await http.get(f"{url}/sessions/{sid}")).json()
                if info["degraded"]:
                    break
                await asyncio.sleep(0.05)
            assert info["degraded"] == ["steps2"] and info["profile"]["name"] == "steps2"
            after = info["chunks"] + 1                                  # generated wholly after the switch
            await _until(lambda: box["session"].chunks >= after + 4, 20, "4 chunks after the switch")
            n = Counter(chunk_of_call)
            full = {n[c] for c in range(2, before)}
            fewer = {n[c] for c in range(after, after + 3)}
            assert len(full) == 1 and len(fewer) == 1
            assert fewer.pop() == full.pop() - 1                        # one denoising step less per chunk
            m = len(v.frames)
            await _until(lambda: len(v.frames) >= m + 12, 20, "frames after the switch")
            fams = parse_prometheus(await (await http.get(url + "/metrics")).text())
            assert value(fams, "vidu_serve_sessions_degraded_total") == 1     # 64x64 has nothing cheaper: stays
            info = await (await http.get(f"{url}/sessions/{sid}")).json()
            assert info["degraded"] == ["steps2"]
            box.clear()
            await v.close()
    try:
        asyncio.run(main())
    finally:
        hook.remove()


class _Stun(asyncio.DatagramProtocol):
    """A STUN server on loopback that says every client is at `mapped` (a documentation address): what a
    server behind NAT would hear from a public STUN server."""

    def __init__(self, mapped: tuple[str, int]):
        self.mapped, self.asked = mapped, 0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        from aioice import stun
        req = stun.parse_message(data)
        if req.message_method != stun.Method.BINDING or req.message_class != stun.Class.REQUEST:
            return
        self.asked += 1
        resp = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                            transaction_id=req.transaction_id)
        resp.attributes["XOR-MAPPED-ADDRESS"] = self.mapped
        self.transport.sendto(bytes(resp), addr)


def test_a_stun_server_gives_the_server_and_the_page_a_public_candidate(model):
    """--ice-server: the server's peer connection asks the STUN server and offers the address it hears as a
    server-reflexive candidate (the way to a viewer across NAT); the page gets the same servers from
    /ice-servers; the viewer still connects and receives frames. Control: without one, host candidates only."""
    mapped = ("203.0.113.7", 4242)

    async def main(with_stun: bool):
        loop = asyncio.get_running_loop()
        transport, stun_server = await loop.create_datagram_endpoint(lambda: _Stun(mapped), local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        opts = ServeOptions(speed=0.01, ice_servers=(f"stun:127.0.0.1:{port}",) if with_stun else ())
        try:
            async with running(opts, [model]) as url, ClientSession() as http:
                ice = await (await http.get(url + "/ice-servers")).json()
                sid = (await (await http.post(url + "/sessions", data=upload(png()))).json())["id"]
                v = Viewer()
                await v.pc.setLocalDescription(await v.pc.createOffer())
                r = await http.post(f"{url}/sessions/{sid}/offer", json={"sdp": v.pc.localDescription.sdp, "type": "offer"})
                answer = await r.json()
                await v.pc.setRemoteDescription(RTCSessionDescription(**answer))
                await asyncio.wait_for(v.opened.wait(), 10)
                await _until(lambda: len(v.frames) >= 3, 30, "frames")
                await v.close()
        finally:
            transport.close()
        srflx = [ln for ln in answer["sdp"].splitlines() if "typ srflx" in ln]
        return ice, srflx, stun_server.asked, port

    ice, srflx, asked, port = asyncio.run(main(True))
    assert ice == {"iceServers": [{"urls": f"stun:127.0.0.1:{port}"}]}
    assert asked >= 1 and srflx and all(f"{mapped[0]} {mapped[1]} typ srflx" in ln for ln in srflx), srflx
    ice, srflx, asked, _ = asyncio.run(main(False))
    assert ice == {"iceServers": []} and srflx == [] and asked == 0
