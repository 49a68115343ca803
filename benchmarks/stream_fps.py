"""Streaming throughput of the engine: steady-state FPS, first-chunk latency, per-chunk latency over a
long stream, peak memory; with and without TwinCache; decoded with TAEHV.

    python benchmarks/stream_fps.py                       # GPU: wan2.1-1.3b, random weights, bf16
    python benchmarks/stream_fps.py --preset tiny --chunks 20 --long-seconds 4   # CPU smoke run
    python benchmarks/stream_fps.py --preset small --sizes 256x256 --chunk-frames 1 --window 7 --long-seconds 0 \
        --compile both                                    # the starter's shapes, eager and compiled blocks
    python benchmarks/stream_fps.py --kernels ...         # the blocks' fused Triton kernels (DiT.use_kernels)
    python benchmarks/stream_fps.py --attention int8 [--no-keep-context] [--linear fp8] [--compile on] ...
    torchrun --nproc_per_node 2 benchmarks/stream_fps.py --sizes 960x544,1280x720,1920x1088 --long-seconds 0
                                                          # one stream over 2 GPUs (Ulysses, models/ulysses.py)

Under torchrun every rank builds the same random model, shards its sequence over all ranks
(`DiT.shard_sequence`) and steps its own engine with the same inputs, as `vidu stream --gpus N` does;
rank 0 times and reports (NCCL on GPUs, gloo on the CPU for a rehearsal).

Writes the full results as JSON to $OUT/stream_fps.json (or ./stream_fps.json) and prints a table last.
Random weights are fine for throughput: the work per chunk does not depend on the values.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.config import preset  # noqa: E402
from models.dit import DiT  # noqa: E402
from models.taehv import TAEHV  # noqa: E402
from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


AVATAR_AUDIO = dict(audio_dim=80, audio_context=(2, 1))   # the product's speech adapter (models/config.py presets)


def ranks() -> tuple[torch.device, int, int]:
    """(device, rank, world size): under torchrun (WORLD_SIZE > 1) the process group is started, NCCL on
    cuda:LOCAL_RANK or gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return torch.device("cuda" if cuda else "cpu"), 0, 1
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device(f"cuda:{local}" if cuda else "cpu"), dist.get_rank(), world


def build(preset_name: str, height: int, width: int, dev, dtype, audio: bool = False, world: int = 1):
    cfg = preset(preset_name).replace(height=height, width=width)
    if audio and not cfg.dit.audio_dim:
        cfg = cfg.replace(dit=dataclasses.replace(cfg.dit, **AVATAR_AUDIO))
    torch.manual_seed(0)                                  # every rank the same weights
    with torch.device(dev):
        model = DiT(cfg.dit).to(dtype).eval()
        decoder = TAEHV().to(dtype).eval()
    if world > 1:
        model.shard_sequence(dist.group.WORLD)
    return cfg, model, decoder


def engine_dtype(dev) -> torch.dtype:
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def add_engine_args(ap: argparse.ArgumentParser, compile_choices=("off", "on", "both")) -> None:
    """The options that build and speed up the engine (`build`, `accelerate`, `settings`); shared with
    benchmarks/stream_profile.py."""
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--compile", choices=compile_choices, default="off",
                    help="the blocks compiled (DiT.compile_blocks): " + ", ".join(compile_choices[:-1]) + ", or "
                         + ("each configuration both ways" if compile_choices[-1] == "both" else compile_choices[-1]))
    ap.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                    help="torch.compile's mode for --compile on/both (reduce-overhead: each block a CUDA graph)")
    ap.add_argument("--kernels", action="store_true", help="the blocks' fused Triton element-wise kernels (DiT.use_kernels)")
    ap.add_argument("--attention", default="sdpa", choices=("sdpa", "int8", "sparse"),
                    help="self-attention's backend (DiT.use_kernels)")
    ap.add_argument("--keep-context", action=argparse.BooleanOptionalAction, default=True,
                    help="--attention int8: keep the context's int8 key blocks for a chunk's forwards "
                         "(DiT.use_kernels keep_context; --no-keep-context derives them every forward; sparse "
                         "builds its block map from each forward's q and k)")
    ap.add_argument("--linear", default="bf16", choices=("bf16", "fp8", "int8"),
                    help="the blocks' linears: as they are, or W8A8 GEMMs (DiT.quantize)")
    ap.add_argument("--keep-speech", action=argparse.BooleanOptionalAction, default=True,
                    help="a chunk's speech keys/values computed once for its forwards (DiT.keep_speech, as a "
                         "stream does); --no-keep-speech: in every forward")
    ap.add_argument("--room", action=argparse.BooleanOptionalAction, default=True,
                    help="a chunk's keys/values written after the context in the engine's buffers (KV.room); "
                         "--no-room: concatenated with the whole context in every forward, as before")
    ap.add_argument("--audio-adapter", action=argparse.BooleanOptionalAction, default=True,
                    help="give a preset without one the speech adapter the product streams with")


def accelerate(model: DiT, args, compiled: bool) -> None:
    """`args`' speed options on a built model: fused kernels and self-attention backend, W8A8 linears, compiled blocks."""
    model.use_kernels(args.kernels, args.attention, args.keep_context)
    if args.linear != "bf16":
        model.quantize(args.linear)
    if compiled:
        torch._dynamo.reset()
        model.compile_blocks(mode=None if args.compile_mode in (None, "default") else args.compile_mode)


def settings(args, chunk_frames: int, twin: bool) -> StreamSettings:
    """The stream's settings: `args.steps`, the window rounded down to whole chunks (at least one)."""
    cf = chunk_frames
    return StreamSettings(chunk_frames=cf, steps=args.steps, window=max(args.window, cf) // cf * cf, twin=twin)


def stream_inputs(cfg, st: StreamSettings, dev, dtype) -> tuple[ChunkInputs, torch.Tensor]:
    """Random conditions every chunk reuses (text, speech when the model has the adapter) and the reference latent."""
    d = cfg.dit
    g = torch.Generator(device=dev).manual_seed(0)
    text = torch.randn(1, d.text_len, d.text_dim, generator=g, device=dev, dtype=dtype)
    audio = (torch.randn(1, st.chunk_frames + sum(d.audio_context), cfg.audio.mel_per_latent, d.audio_dim, generator=g, device=dev, dtype=dtype)
             if d.audio_dim else None)
    ref = torch.randn(1, d.in_dim, 1, cfg.height // 8, cfg.width // 8, generator=g, device=dev, dtype=dtype)
    return ChunkInputs(text, audio), ref


def start_stream(cfg, model, decoder, st: StreamSettings, ref: torch.Tensor, keep_speech: bool = True,
                 room: bool = True):
    """A started engine (the instruction's text prepared once, a chunk's speech once for its forwards, as a
    stream does; `keep_speech` False: the speech in every forward; `room` False: the chunk's keys/values
    concatenated with the context, not written after it) and TAEHV's stream decoder."""
    eng = StreamEngine(model, cfg, st, keep_text=True)
    eng.buffers.room = room
    model.keep_speech = keep_speech
    eng.start(ref)
    return eng, decoder.stream_decoder()


def chunk_inputs(inputs: ChunkInputs) -> ChunkInputs:
    """The next chunk's conditions: the instruction's text (one tensor while the instruction holds, as in a
    stream) and the speech as a new tensor, as a stream hears new speech every chunk (a reused tensor would
    let DiT.keep_speech skip its keys/values in every chunk, which no stream can)."""
    return ChunkInputs(inputs.text, None if inputs.audio is None else inputs.audio.clone())


def decode(stream, res):
    """A chunk's latent through TAEHV's stream decoder: its frames [B, T, 3, H, W]."""
    with torch.no_grad():
        return stream.push(res.video.permute(0, 2, 1, 3, 4))


def run_config(cfg, model, decoder, st: StreamSettings, chunks: int, dev, dtype, warmup: int = 3,
               keep_speech: bool = True, room: bool = True) -> dict:
    inputs, ref = stream_inputs(cfg, st, dev, dtype)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    world = dist.get_world_size() if dist.is_initialized() else 1
    eng, stream = start_stream(cfg, model, decoder, st, ref, keep_speech, room)
    dit_s, total_s, frames = [], [], []
    t_first = None
    t0 = time.perf_counter()
    for j in range(chunks):
        a = time.perf_counter()
        res = eng.step(chunk_inputs(inputs))
        sync(dev)
        b = time.perf_counter()
        out = decode(stream, res)
        sync(dev)
        c = time.perf_counter()
        if t_first is None:
            t_first = c - t0
        dit_s.append(b - a)
        total_s.append(c - a)
        frames.append(out.shape[1])
    steady = slice(min(warmup, chunks // 2), None)
    tot, dit = np.array(total_s[steady]), np.array(dit_s[steady])
    fr = np.array(frames[steady])
    n = len(tot)
    q = max(1, n // 10)
    return {
        "gpus": world, "height": cfg.height, "width": cfg.width, "chunk_frames": st.chunk_frames, "steps": st.steps,
        "window": st.window, "twin": st.twin, "chunks": chunks,
        "fps": float(fr.sum() / tot.sum()), "fps_dit_only": float(fr.sum() / dit.sum()),
        "first_chunk_s": t_first, "chunk_ms_p50": 1000 * float(np.median(tot)),
        "chunk_ms_p95": 1000 * float(np.percentile(tot, 95)), "chunk_ms_max": 1000 * float(tot.max()),
        "chunk_ms_first10pct": 1000 * float(np.median(tot[:q])), "chunk_ms_last10pct": 1000 * float(np.median(tot[-q:])),
        "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30) if dev.type == "cuda" else None,
        "seconds_of_video": float(sum(frames) / cfg.audio.fps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(ap)
    ap.add_argument("--sizes", default="960x544,832x480", help="WxH list")
    ap.add_argument("--chunk-frames", default="1,3")
    ap.add_argument("--chunks", type=int, default=40, help="chunks per short configuration")
    ap.add_argument("--long-seconds", type=float, default=300.0, help="video length of the long run (first size)")
    ap.add_argument("--long-chunk-frames", type=int, default=3)
    ap.add_argument("--short", action=argparse.BooleanOptionalAction, default=True, help="run the short configurations")
    args = ap.parse_args()
    dev, rank, world = ranks()
    dtype = engine_dtype(dev)
    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    if args.compile != "off" and world > 1:
        ap.error("--compile is for one process (the sequence-parallel exchanges are not compiled)")
    for w, h in sizes:
        for compiled in {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]:
            cfg, model, decoder = build(args.preset, h, w, dev, dtype, args.audio_adapter, world)
            accelerate(model, args, compiled)
            for cf in (int(c) for c in args.chunk_frames.split(",")) if args.short else ():
                for twin in (True, False):
                    st = settings(args, cf, twin)
                    # compiled: the first window's chunks (growing context) and a shape change pay compilation
                    r = run_config(cfg, model, decoder, st, args.chunks, dev, dtype,
                                   warmup=3 + (st.window // cf + 3) * compiled, keep_speech=args.keep_speech,
                                   room=args.room)
                    r.update(run="short", compiled=compiled, compile_mode=args.compile_mode if compiled else None,
                             kernels=args.kernels, attention=args.attention, keep_context=args.keep_context,
                             linear=args.linear, keep_speech=args.keep_speech, room=args.room)
                    results.append(r)
                    if rank == 0:
                        print(json.dumps(r), flush=True)
            if (w, h) == sizes[0] and args.long_seconds > 0:
                cf = args.long_chunk_frames
                st = settings(args, cf, True)
                n = int(args.long_seconds * cfg.audio.fps / (4 * cf)) + 1
                r = run_config(cfg, model, decoder, st, n, dev, dtype, warmup=10 + (st.window // cf + 3) * compiled,
                               keep_speech=args.keep_speech, room=args.room)
                r.update(run="long", compiled=compiled)
                results.append(r)
                if rank == 0:
                    print(json.dumps(r), flush=True)
            del model, decoder
    if world > 1:
        dist.destroy_process_group()
    if rank:
        return
    out = Path(os.environ.get("OUT", ".")) / "stream_fps.json"
    device = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "preset": args.preset,
                               "results": results}, indent=1))
    print(f"\n{args.preset}{' + speech adapter' if args.audio_adapter else ''} on {world} x {device}, {args.steps} steps, window {args.window}, TAEHV decode, bf16" if dev.type == "cuda"
          else f"\n{args.preset} on {world} cpu process(es)")
    print(f"{'run':6} {'gpus':>4} {'compiled':>8} {'size':9} {'chunk':>5} {'twin':>5} {'fps':>7} {'dit fps':>8} {'first s':>8} {'p50 ms':>8} "
          f"{'p95 ms':>8} {'first10%':>9} {'last10%':>8} {'mem GiB':>8}")
    for r in results:
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['run']:6} {r['gpus']:>4} {str(r['compiled']):>8} {r['width']}x{r['height']:<5} {r['chunk_frames']:>5} {str(r['twin']):>5} {r['fps']:7.1f} "
              f"{r['fps_dit_only']:8.1f} {r['first_chunk_s']:8.2f} {r['chunk_ms_p50']:8.1f} {r['chunk_ms_p95']:8.1f} "
              f"{r['chunk_ms_first10pct']:9.1f} {r['chunk_ms_last10pct']:8.1f} {mem:>8}")


if __name__ == "__main__":
    main()
