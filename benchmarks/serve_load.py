"""Loopback load test of `vidu serve`: N WebRTC viewers (aiortc, headless) arrive one every `--stagger`
seconds, each creating a session, receiving its video and audio for `--seconds` and leaving. Bounded:
it stops by itself after N x stagger + seconds (+ the server's start), and kills the server it started.

    python benchmarks/serve_load.py --preset tiny --device cpu --clients 6 --speed 1     # CPU, CI figures
    python benchmarks/serve_load.py --clients 16 --max-sessions 16                        # GPU, the starter
    python benchmarks/serve_load.py --ckpt student.safetensors --clients 12 --seconds 60

Reports: sessions admitted vs refused (503 and why), the profiles admitted (full / fewer steps / half
resolution), the server's chunk latency p50 / p99 (its last 4096 chunks, /capacity), late chunks,
frames dropped (server side), and per viewer the frames received and their rate once the first arrived.
Writes JSON to $OUT/serve_load.json (or ./serve_load.json) and prints a table last.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _png(seed: int) -> bytes:
    from PIL import Image
    rgb = (np.random.default_rng(seed).random((128, 128, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def start_server(args) -> tuple[subprocess.Popen, str, list[str]]:
    cmd = [sys.executable, "-m", "vidu_cli", "serve", "--port", "0", "--device", args.device, "--speed", str(args.speed),
           "--max-sessions", str(args.max_sessions), "--calib-chunks", str(args.calib_chunks)]
    cmd += ["--ckpt", args.ckpt] if args.ckpt else ["--preset", args.preset] if args.preset else []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    said = []
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit("vidu serve ended before serving:\n" + "".join(said[-20:]))
        said.append(line)
        if not line.startswith("{"):
            print(line.rstrip(), file=sys.stderr)
        m = re.match(r"serving on (\S+)", line)
        if m:
            return proc, m.group(1).rstrip("/"), said
    proc.kill()
    raise SystemExit("vidu serve did not start in time")


async def viewer(i: int, url: str, args, http, start: float) -> dict:
    from aiohttp import FormData
    from aiortc import RTCPeerConnection, RTCSessionDescription
    form = FormData(default_to_multipart=True)
    form.add_field("image", _png(i), filename="ref.png", content_type="image/png")
    t0 = time.monotonic()
    r = await http.post(url + "/sessions", data=form)
    body = await r.json()
    out = {"client": i, "status": r.status, "arrived_s": round(t0 - start, 2)}
    if r.status != 201:
        out.update(refused=body.get("reason"), error=body.get("error"))
        return out
    out.update(id=body["id"], profile=body["profile"]["name"], size=f'{body["width"]}x{body["height"]}')
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    frames, audio, first = [], [0], []

    async def pull(track):
        while True:
            try:
                await track.recv()
            except Exception:
                return
            if track.kind == "video":
                frames.append(time.monotonic())
            else:
                audio[0] += 1

    tasks = []
    pc.on("track", lambda t: tasks.append(asyncio.ensure_future(pull(t))))
    await pc.setLocalDescription(await pc.createOffer())
    r = await http.post(f"{url}/sessions/{body['id']}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
    await pc.setRemoteDescription(RTCSessionDescription(**await r.json()))
    await asyncio.sleep(args.seconds)
    info = await (await http.get(f"{url}/sessions/{body['id']}")).json()
    await pc.close()
    for t in tasks:
        t.cancel()
    await http.delete(f"{url}/sessions/{body['id']}")
    first = frames[0] - t0 if frames else None
    steady = [t for t in frames if t >= frames[0] + 1.0] if frames else []        # after the first second
    fps = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 2 else 0.0
    out.update(frames=len(frames), audio_packets=audio[0], first_frame_s=None if first is None else round(first, 3),
               fps=round(fps, 2), server_dropped=info["frames_dropped"], stalled_s=info["stalled_s"],
               chunks=info["chunks"])
    return out


async def load(url: str, args) -> dict:
    from aiohttp import ClientSession
    async with ClientSession() as http:
        tasks, start = [], time.monotonic()
        for i in range(args.clients):
            tasks.append(asyncio.ensure_future(viewer(i, url, args, http, start)))
            await asyncio.sleep(args.stagger)
        await asyncio.sleep(max(0.0, args.seconds - args.stagger - 1.0))   # all arrived, the last ones still watching
        cap = await (await http.get(url + "/capacity")).json()
        clients = await asyncio.gather(*tasks)
        final = await (await http.get(url + "/capacity")).json()
    return {"clients": clients, "capacity_under_load": cap, "capacity_final": final}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt")
    ap.add_argument("--preset")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=20.0, help="each viewer's stay")
    ap.add_argument("--stagger", type=float, default=1.0, help="s between arrivals")
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--max-sessions", type=int, default=8)
    ap.add_argument("--calib-chunks", type=int, default=4)
    ap.add_argument("--start-timeout", type=float, default=600.0)
    args = ap.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.seconds <= 600:
        raise SystemExit("--clients 1..64 and --seconds 1..600 (the test is bounded)")
    proc, url, said = start_server(args)
    try:
        t = time.monotonic()
        res = asyncio.run(asyncio.wait_for(load(url, args), args.clients * args.stagger + args.seconds + 120))
        res["wall_s"] = round(time.monotonic() - t, 1)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    res["args"] = vars(args)
    res["calibration"] = [ln.strip() for ln in said if re.match(r"\s+\S+: \d+ ms per", ln)]
    import torch
    res["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    out = Path(os.environ.get("OUT", ".")) / "serve_load.json"
    out.write_text(json.dumps(res, indent=1))
    cl, cap = res["clients"], res["capacity_under_load"]
    admitted = [c for c in cl if c["status"] == 201]
    print(f"\n{len(admitted)} admitted, {len(cl) - len(admitted)} refused "
          f"({', '.join(sorted({str(c.get('refused')) for c in cl if c['status'] != 201})) or '-'}); "
          f"chunk p50 {cap['chunks']['p50_ms']} ms, p99 {cap['chunks']['p99_ms']} ms over {cap['chunks']['n']} chunks; "
          f"late chunks {res['capacity_final']['counts']['chunks_late']} of {res['capacity_final']['counts']['chunks']}, "
          f"frames dropped {res['capacity_final']['counts']['frames_dropped']} (+ "
          f"{res['capacity_final']['counts']['frames_unsent']} generated ahead, unsent at close); {res['wall_s']} s")
    print("| client | status | profile | size | frames | fps after 1 s | first frame s | stalled s |")
    print("|---|---|---|---|---|---|---|---|")
    for c in cl:
        print(f"| {c['client']} | {c['status']}{' ' + c['refused'] if c.get('refused') else ''} | {c.get('profile', '-')} | "
              f"{c.get('size', '-')} | {c.get('frames', '-')} | {c.get('fps', '-')} | {c.get('first_frame_s', '-')} | "
              f"{c.get('stalled_s', '-')} |")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
