"""Streams per GPU with batched chunks: B streams stepped in one batch (stages/stream/batch.py, what a
`vidu serve` worker runs) against the same B streams stepped one by one; steady state (window full),
random weights (the work per chunk does not depend on the values), each stream decoded by its own TAEHV.

    python benchmarks/stream_batch.py --preset small --sizes 256x256 --window 7    # GPU: the starter's shapes
    python benchmarks/stream_batch.py --sizes 512x512,960x544 --batches 1,2,4       # GPU: wan2.1-1.3b, bf16
    python benchmarks/stream_batch.py --preset tiny --sizes 64x64 --batches 1,2,4 --chunks 4   # CPU rehearsal

Per size and B: the steady chunk time (median) of one batch and of the same B chunks one by one, both
with the B decodes, the speedup, and the streams each keeps at real time (B when a round of B chunks
takes at most the video one chunk plays); the largest |batched - alone| over one round's latents
(replayed from the same saved engine states; bf16 on a GPU rounds differently at another batch size,
float32 on the CPU differs in the last bits); peak memory. A B that runs out of memory ends its size.
Writes $OUT/stream_batch.json (or ./stream_batch.json) and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.config import preset  # noqa: E402
from models.dit import DiT  # noqa: E402
from models.taehv import TAEHV  # noqa: E402
from stages.stream.batch import step_batch  # noqa: E402
from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_fps import chunk_inputs  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def streams(cfg, model, st: StreamSettings, n: int, dev, dtype) -> tuple[list[StreamEngine], list[ChunkInputs]]:
    """n engines with their own reference, text, speech and seed."""
    d, g = cfg.dit, torch.Generator(device=dev).manual_seed(0)
    engines, inputs = [], []
    for i in range(n):
        text = torch.randn(1, d.text_len, d.text_dim, generator=g, device=dev, dtype=dtype)
        audio = (torch.randn(1, st.chunk_frames + sum(d.audio_context), cfg.audio.mel_per_latent, d.audio_dim,
                             generator=g, device=dev, dtype=dtype) if d.audio_dim else None)
        e = StreamEngine(model, cfg, st, seed=i, keep_text=True)
        e.start(torch.randn(1, d.in_dim, 1, cfg.height // 8, cfg.width // 8, generator=g, device=dev, dtype=dtype))
        engines.append(e)
        inputs.append(ChunkInputs(text, audio))
    return engines, inputs


def saved(engines: list[StreamEngine]) -> list[dict]:
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in e.state().items()} for e in engines]


def timed(fn, rounds: int, dev) -> float:
    """Median seconds of fn() over `rounds` calls, after one warm-up."""
    fn()
    sync(dev)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure(cfg, model, decoder, st: StreamSettings, B: int, chunks: int, dev, dtype) -> dict:
    engines, inputs = streams(cfg, model, st, B, dev, dtype)
    decoders = [decoder.stream_decoder() for _ in range(B)]
    with torch.no_grad():
        for _ in range(1 + st.slots):                                  # the window filled, all at one place
            step_batch(engines, inputs)
        before = saved(engines)
        alone = [e.step(chunk_inputs(i)).video for e, i in zip(engines, inputs)]
        for e, s in zip(engines, before):
            e.load_state(s)
        batched = [r.video for r in step_batch(engines, inputs)]
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(alone, batched))
        del before, alone, batched                                     # the saved states: not in the peak below

        def decode(videos):
            for dec, v in zip(decoders, videos):
                dec.push(v.permute(0, 2, 1, 3, 4))

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_batch = timed(lambda: decode([r.video for r in step_batch(engines, [chunk_inputs(i) for i in inputs])]), chunks, dev)
        t_alone = timed(lambda: decode([e.step(chunk_inputs(i)).video for e, i in zip(engines, inputs)]), chunks, dev)
    video_s = cfg.audio.video_frames_per_latent * st.chunk_frames / cfg.audio.fps
    return {"height": cfg.height, "width": cfg.width, "batch": B, "chunk_frames": st.chunk_frames, "steps": st.steps,
            "window": st.window, "twin": st.twin, "video_ms": round(1000 * video_s, 1),
            "batch_ms": round(1000 * t_batch, 2), "one_by_one_ms": round(1000 * t_alone, 2),
            "speedup": round(t_alone / t_batch, 3), "realtime_batched": B if t_batch <= video_s else 0,
            "realtime_one_by_one": B if t_alone <= video_s else 0, "max_abs_diff": diff,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--sizes", default="512x512,960x544", help="WxH list")
    ap.add_argument("--batches", default="1,2,4,8,16", help="streams per batch")
    ap.add_argument("--chunk-frames", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=10, help="timed chunks per configuration")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    st = StreamSettings(chunk_frames=args.chunk_frames, steps=args.steps, window=args.window)
    rows = []
    for size in args.sizes.split(","):
        w, h = (int(x) for x in size.split("x"))
        cfg = preset(args.preset).replace(height=h, width=w)
        torch.manual_seed(0)
        with torch.device(dev):
            model = DiT(cfg.dit).to(dtype).eval()
            decoder = TAEHV().to(dtype).eval()
        for B in (int(b) for b in args.batches.split(",")):
            try:
                row = measure(cfg, model, decoder, st, B, args.chunks, dev, dtype)
            except torch.OutOfMemoryError:
                rows.append({"height": h, "width": w, "batch": B, "oom": True})
                print(f"{size} B={B}: out of memory", file=sys.stderr)
                break
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        del model, decoder
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    out = Path(os.environ.get("OUT", ".")) / "stream_batch.json"
    out.write_text(json.dumps({"device": name, "args": vars(args), "rows": rows}, indent=1))
    print(f"| {name} | B | batch ms | one by one ms | speedup | video ms | real-time streams batched / one by one "
          f"| max abs diff | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['width']}x{r['height']} | {r['batch']} | out of memory | | | | | | |")
            continue
        print(f"| {r['width']}x{r['height']} | {r['batch']} | {r['batch_ms']} | {r['one_by_one_ms']} | {r['speedup']} | "
              f"{r['video_ms']} | {r['realtime_batched']} / {r['realtime_one_by_one']} | {r['max_abs_diff']:.2e} | "
              f"{r['peak_mem_gib']} |")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
