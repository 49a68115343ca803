"""How a core's chunk of frames reaches the server (issue 21): pickled through the core's pipe (what
stages/serve/core.py did before), raw bytes through the pipe (Connection.send_bytes / recv_bytes_into), or
the shared-memory ring of stages/serve/ring.py. A spawned writer process sends N chunks of T frames of WxH;
the reader takes each as a fresh array. Prints CPU ms per chunk on each side and wall ms per chunk.

    python benchmarks/frame_transport.py --size 960x544 --frames 4 --chunks 60
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np

from stages.serve.ring import FrameRing

MODES = ("pickle", "bytes", "ring")


def _writer(conn, mode: str, shape: tuple, n: int, ring_name: str | None) -> None:
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    ring = FrameRing.attach(ring_name) if ring_name else None
    t = time.process_time()
    for _ in range(n):
        if mode == "pickle":
            conn.send(("chunk", "sid", x, None, {}))
        elif mode == "bytes":
            conn.send(("chunk", "sid", x.shape, None, {}))
            conn.send_bytes(memoryview(x).cast("B"))
        else:
            conn.send(("chunk", "sid", ring.put(x), None, {}))
    conn.send(time.process_time() - t)
    if ring:
        ring.close()


def measure(mode: str, shape: tuple, n: int) -> dict:
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    ring = FrameRing.create(int(np.prod(shape)), 4) if mode == "ring" else None
    p = ctx.Process(target=_writer, args=(theirs, mode, shape, n, ring.name if ring else None))
    p.start()
    got = None
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        msg = ours.recv()
        if mode == "pickle":
            got = msg[2]
        elif mode == "bytes":
            got = np.empty(msg[2], np.uint8)
            ours.recv_bytes_into(memoryview(got).cast("B"))
        else:
            got = ring.take(msg[2])
    c1, t1 = time.process_time(), time.perf_counter()
    sender = ours.recv()
    p.join()
    if ring:
        ring.close()
    assert got is not None and got.shape == shape
    return {"mode": mode, "reader_cpu_ms": 1000 * (c1 - c0) / n, "writer_cpu_ms": 1000 * sender / n,
            "wall_ms": 1000 * (t1 - t0) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="960x544", help="WxH")
    ap.add_argument("--frames", type=int, default=4, help="frames per chunk")
    ap.add_argument("--chunks", type=int, default=60)
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    shape = (a.frames, h, w, 3)
    rows = [measure(m, shape, a.chunks) for m in MODES]
    print(f"{a.chunks} chunks of {a.frames} x {a.size} ({np.prod(shape) / 1e6:.1f} MB each)")
    print("| transport | reader CPU ms/chunk | writer CPU ms/chunk | wall ms/chunk |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['reader_cpu_ms']:.2f} | {r['writer_cpu_ms']:.2f} | {r['wall_ms']:.2f} |")


if __name__ == "__main__":
    main()
