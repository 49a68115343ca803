"""Where one steady chunk of the stream spends its time: the engine as benchmarks/stream_fps.py builds and steps it
(its `build`, `accelerate`, `settings`, `stream_inputs`, `start_stream`, `decode`), profiled with torch.profiler
over a few chunks after the ring has filled, its time grouped into buckets.

GPU, one call (eager Wan2.1-1.3B + speech adapter, random weights, bf16, 960x544, chunk 3, twin cache, TAEHV
decode; a few minutes at most with the machine's start-up):

    mkdir -p $OUT && timeout 540 python3 -u benchmarks/stream_profile.py --size 960x544 --chunk-frames 3 > $OUT/log 2>&1; tail -40 $OUT/log

    ... --attention sparse | --kernels | --linear int8 | --no-twin | --compile on    # the same stream another way

CPU rehearsal:  python benchmarks/stream_profile.py --preset tiny --size 64x64

Order: warm-up chunks (the sink, the ring's fill, 2 more; compiled: a window's more), `--timed` chunks timed
without the profiler, then one profiler warm-up chunk and `--chunks` profiled chunks (steady chunks all do
the same work: 2 are plenty, and keep the trace small).

Attribution. Named ranges (torch.profiler.record_function) are opened around what the time should be charged to,
by this script alone while it profiles (nothing in the engine or model changes, and they are removed after):
forward hooks on the model's linears (`vidu::ffn` for blocks.*.ffn.0/2, `vidu::linear` for the rest) and norms
(`vidu::norm`), wrappers on each block's self_attend / cross_attend (`vidu::self_attn`, `vidu::cross_text`,
`vidu::cross_audio`, and the audio adapter's embedding), on the self-attention backends (`vidu::attn_core`:
SDPA or our INT8 / sparse kernels with their q/k quantization and block maps), on the adaLN and q/k-norm/RoPE
functions (vidu_kernels.adaln, .qk_rope, models.rope via models.dit) and on the engine's key rotations (`vidu::rope`:
a history chunk's keys as written, the ref and sink moved to the window's new place) and buffer writes
(`vidu::cache_write`). On CUDA every kernel's device time goes to the bucket of the innermost op
that launched it and the ranges around that op; on the CPU each op's self time does. What no range claims goes by
op name: SDPA to self-attention, cat / copy_ / clone to cache-and-copies, casts and the rest to element-wise.
The cross-attention buckets hold their whole sub-layer: for the text its q/o projections, q norm and attention (its
keys/values are prepared once per instruction, TextCache); for the speech adapter all of it, the speech windows'
embedding and every block's k/v projections of them, q/k norms, RoPE and attention. "Other linear" is
self-attention's q/k/v/o, the patch/time embeddings and the head.
Host gaps: the chunk's wall time minus device busy time (CUDA), or minus the time inside ops (CPU: Python
between ops). The profiler and the hooks add host time, not device time: the line under the table gives the
chunk's unprofiled wall time and the host gap it implies.
--compile on: the blocks are compiled, so no hooks go inside them; their Inductor kernels go by name (fused
element-wise into element-wise, GEMMs into other linear, attention into self-attention, cross-attention included).

Writes under $OUT (./out-profile when unset): stream_profile.json (the buckets, their top ops/kernels, the
settings), ops.txt (torch.profiler's per-op table and the top items of each bucket), trace.json (Chrome trace;
gzipped when that is what brings it under --trace-mib, else left out). Prints the bucket table last.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, record_function

if str(Path(__file__).resolve().parent) not in sys.path:   # imported (tests): after the rest, shadowing nothing
    sys.path.append(str(Path(__file__).resolve().parent))
import stream_fps  # noqa: E402  (puts the repository on sys.path)
import models.dit as dit  # noqa: E402
from vidu_kernels import adaln, qk_rope  # noqa: E402

BUCKETS = {
    "self_attn": "self-attention (SDPA / our kernels)",
    "cross_text": "cross-attention, text (sub-layer)",
    "cross_audio": "cross-attention, audio (adapter)",
    "ffn": "FFN GEMMs",
    "linear": "other linear (qkv/o, embed, head)",
    "norm": "norms + adaLN (modulate, gate)",
    "rope": "RoPE / key rotation",
    "cache": "cache writes / copies / cat",
    "elementwise": "element-wise / casts / other",
    "taehv": "TAEHV decode",
    "host": "host gaps",
}
# ranges that decide a bucket wherever they are in an op's ancestry (outermost sub-layers first), then the innermost
# of the role ranges
SUBLAYERS = (("vidu::taehv", "taehv"), ("vidu::cross_audio", "cross_audio"), ("vidu::cross_text", "cross_text"),
             ("vidu::attn_core", "self_attn"))
ROLES = {"vidu::ffn": "ffn", "vidu::linear": "linear", "vidu::norm": "norm", "vidu::rope": "rope",
         "vidu::cache_write": "cache"}
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::convolution",
            "aten::_scaled_mm", "aten::_int_mm", "aten::baddbmm")
CAST_OPS = ("aten::_to_copy", "aten::to", "aten::type_as")
COPY_OPS = ("aten::cat", "aten::stack", "aten::copy_", "aten::clone", "aten::contiguous", "aten::index_copy_",
            "aten::slice_scatter")
WAITS = ("Synchronize",)
RANGES = ("vidu::", "ProfilerStep", "## Call CompiledFxGraph", "Torch-Compiled Region", "TorchDynamo Cache Lookup")


def classify(kernel: str | None, names: list[str]) -> str:
    """The bucket of a kernel (or, kernel None, an op's own time) whose launching op and its ancestors, innermost
    first, are `names` (ops and vidu:: ranges)."""
    for rng, bucket in SUBLAYERS:
        if rng in names:
            return bucket
    for n in names:
        if n in ROLES:
            return ROLES[n]
    ops = [n for n in names if not n.startswith("vidu::")]
    k = (kernel or "").lower()
    if any(a in n for n in ops for a in ATTENTION_OPS) or any(a in k for a in ("flash", "fmha", "attention")):
        return "self_attn"
    if any(n in CAST_OPS for n in ops):
        return "elementwise"
    if any(n in COPY_OPS for n in ops[:2]):
        return "cache"
    if any(n in GEMM_OPS for n in ops) or any(a in k for a in ("gemm", "cutlass", "nvjet", "sm90_xmma")):
        return "linear"
    return "elementwise"


# -- the named ranges, installed only while the profiler runs --

def ranged(name: str, fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return inner


class Patches:
    """Attribute swaps and module hooks, each undone by `undo` (in reverse order)."""

    def __init__(self):
        self._undo: list = []

    def set(self, obj, attr: str, value) -> None:
        """obj[attr] (a dict) or obj.attr (a module's global, or an instance's attribute shadowing its method)."""
        if isinstance(obj, dict):
            old = obj[attr]
            obj[attr] = value
            self._undo.append(lambda: obj.__setitem__(attr, old))
            return
        had, old = attr in vars(obj), vars(obj).get(attr)
        setattr(obj, attr, value)
        self._undo.append((lambda: setattr(obj, attr, old)) if had else (lambda: delattr(obj, attr)))

    def wrap(self, obj, attr: str, name: str) -> None:
        self.set(obj, attr, ranged(name, obj[attr] if isinstance(obj, dict) else getattr(obj, attr)))

    def hook(self, module: nn.Module, name: str) -> None:
        stack: list = []

        def enter(m, args):
            stack.append(record_function(name).__enter__())

        def leave(m, args, out):
            if stack:
                stack.pop().__exit__(None, None, None)

        self._undo.append(module.register_forward_pre_hook(enter).remove)
        self._undo.append(module.register_forward_hook(leave, always_call=True).remove)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv3d)) or type(m).__name__.endswith("Linear")   # W8A8Linear too


@contextlib.contextmanager
def instrumented(model: dit.DiT, eng, compiled: bool):
    """The named ranges on `model` and `eng` (see the module docstring); none inside compiled blocks."""
    p = Patches()
    try:
        p.wrap(eng.buffers, "write", "vidu::cache_write")
        p.wrap(eng.buffers, "rotate", "vidu::rope")   # keys rotated as written (ring) or moved (ref, sink)
        for name, m in model.named_modules():
            if compiled and name.startswith("blocks."):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if name == "audio_embedding":
                p.hook(m, "vidu::cross_audio")
            elif _is_linear(m):
                p.hook(m, "vidu::ffn" if ".ffn." in name else "vidu::linear")
            elif isinstance(m, (dit.LayerNorm, dit.RMSNorm, nn.LayerNorm)):
                p.hook(m, "vidu::norm")
            elif isinstance(m, dit.Attention):
                if leaf == "self_attn":
                    p.wrap(m, "self_attend", "vidu::self_attn")
                else:
                    p.wrap(m, "cross_attend", "vidu::cross_audio" if leaf == "audio_attn" else "vidu::cross_text")
        if not compiled:
            for key in list(dit.SELF_ATTENTION):
                p.wrap(dit.SELF_ATTENTION, key, "vidu::attn_core")
            for mod, names, rng in ((adaln, ("norm_modulate", "norm_modulate_reference", "gated_residual",
                                             "gated_residual_reference"), "vidu::norm"),
                                    (qk_rope, ("rms_norm_heads",), "vidu::norm"),
                                    (qk_rope, ("qk_norm_rope", "rope"), "vidu::rope"),
                                    (dit, ("apply_rope", "rope_angles"), "vidu::rope")):
                for n in names:
                    p.wrap(mod, n, rng)
        yield
    finally:
        p.undo()


def chunk(eng, stream, inputs, dev) -> tuple[float, int]:
    """One chunk and its decode, synchronised: (wall seconds, video frames out)."""
    a = time.perf_counter()
    with record_function("vidu::chunk"):
        with record_function("vidu::dit"):
            res = eng.step(stream_fps.chunk_inputs(inputs))
        with record_function("vidu::taehv"):
            frames = stream_fps.decode(stream, res)
        stream_fps.sync(dev)
    return time.perf_counter() - a, int(frames.shape[1])


# -- the profile's events into buckets --

def _short(name: str, n: int = 90) -> str:
    return name if len(name) <= n else name[: n - 3] + "..."


def attribute(events, cuda: bool) -> dict:
    """Per bucket, summed over the profiled chunks (microseconds): device time (CUDA kernels, or on the CPU the ops'
    self time), host time in ops and launches (CUDA), launches / ops counted, and the top items."""
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    chains: dict[int, list[str] | None] = {}

    def chain(e) -> list[str] | None:
        """Names of e and its ancestors, innermost first; None outside a vidu::chunk range."""
        key = id(e)
        if key not in chains:
            names, x = [], e
            while x is not None:
                names.append(x.name)
                x = x.cpu_parent
            chains[key] = names if "vidu::chunk" in names else None
        return chains[key]

    def is_range(e) -> bool:   # record_function's ranges (ours, the profiler's steps, torch.compile's regions)
        return bool(getattr(e, "is_user_annotation", False)) or e.name.startswith(RANGES)

    annotations = {e.name for e in events if is_range(e)}
    device, host, count = defaultdict(float), defaultdict(float), defaultdict(int)
    items: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    waits, n_waits = 0.0, 0
    for e in cpu:
        names = chain(e)
        if names is None:
            continue
        if cuda:
            for k in e.kernels:
                if k.name in annotations:
                    continue
                b = classify(k.name, names)
                device[b] += k.duration
                count[b] += 1
                items[b][_short(k.name)] += k.duration
            if is_range(e):
                continue
            if any(w in e.name for w in WAITS):
                if names[1:2] != ["vidu::chunk"]:   # not the chunk's closing sync: the host waited mid-chunk
                    waits += e.self_cpu_time_total
                    n_waits += 1
                continue
            host[classify(None, names)] += e.self_cpu_time_total
        elif not is_range(e):      # a range's self time is Python between ops: host
            b = classify(None, names)
            device[b] += e.self_cpu_time_total
            count[b] += 1
            items[b][e.name] += e.self_cpu_time_total
    total_device = None
    if cuda:   # every device activity of the profiled window, for the share the op links attributed
        total_device = sum(e.time_range.elapsed_us() for e in events
                           if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                           and e.name not in annotations)
    return {"device_us": dict(device), "host_us": dict(host), "count": dict(count), "waits_us": waits, "waits": n_waits,
            "all_device_us": total_device,
            "items": {b: dict(sorted(v.items(), key=lambda kv: -kv[1])[:15]) for b, v in items.items()}}


def save_trace(prof, out: Path, limit_mib: float) -> str | None:
    path = out / "trace.json"
    prof.export_chrome_trace(str(path))
    if path.stat().st_size <= limit_mib * 2**20:
        return path.name
    gz = out / "trace.json.gz"
    with open(path, "rb") as f, gzip.open(gz, "wb", compresslevel=6) as g:
        while block := f.read(1 << 24):
            g.write(block)
    path.unlink()
    if gz.stat().st_size <= limit_mib * 2**20:
        return gz.name
    gz.unlink()
    return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stream_fps.add_engine_args(ap, compile_choices=("off", "on"))
    ap.add_argument("--size", default="960x544", help="WxH")
    ap.add_argument("--chunk-frames", type=int, default=3)
    ap.add_argument("--twin", action=argparse.BooleanOptionalAction, default=True, help="TwinCache (noisy + clean history)")
    ap.add_argument("--chunks", type=int, default=2, help="steady chunks profiled (each does the same work)")
    ap.add_argument("--timed", type=int, default=6, help="steady chunks timed without the profiler, before it")
    ap.add_argument("--warmup", type=int, default=None,
                    help="chunks before any timing (default: the sink and the ring's fill + 2; compiled: a window's more)")
    ap.add_argument("--trace-mib", type=float, default=16.0, help="largest Chrome trace written (MiB)")
    args = ap.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        ap.error("one process: the profile is of one GPU's stream")
    if args.chunks < 1 or args.timed < 1:
        ap.error("--chunks and --timed must be >= 1")
    dev, _, _ = stream_fps.ranks()
    cuda = dev.type == "cuda"
    dtype = stream_fps.engine_dtype(dev)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(os.environ.get("OUT") or "out-profile")
    out.mkdir(parents=True, exist_ok=True)
    w, h = (int(v) for v in args.size.split("x"))
    compiled = args.compile == "on"

    cfg, model, decoder = stream_fps.build(args.preset, h, w, dev, dtype, args.audio_adapter)
    stream_fps.accelerate(model, args, compiled)
    st = stream_fps.settings(args, args.chunk_frames, args.twin)
    inputs, ref = stream_fps.stream_inputs(cfg, st, dev, dtype)
    eng, stream = stream_fps.start_stream(cfg, model, decoder, st, ref, args.keep_speech, args.room)
    warmup = args.warmup if args.warmup is not None else (int(st.sink) + st.slots + 2 + (st.slots + 3) * compiled)
    t0 = time.perf_counter()
    for _ in range(warmup):
        chunk(eng, stream, inputs, dev)
    print(f"warm-up: {warmup} chunks in {time.perf_counter() - t0:.1f} s", flush=True)
    timed = [chunk(eng, stream, inputs, dev) for _ in range(args.timed)]
    print(f"unprofiled: {args.timed} chunks, {1000 * sum(s for s, _ in timed) / args.timed:.1f} ms each", flush=True)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    walls = []
    with instrumented(model, eng, compiled):
        with torch.profiler.profile(activities=activities,
                                    schedule=torch.profiler.schedule(wait=0, warmup=1, active=args.chunks, repeat=1),
                                    acc_events=True) as prof:
            for i in range(args.chunks + 1):        # the first: the profiler's own warm-up, discarded
                walls.append(chunk(eng, stream, inputs, dev))
                if i < args.chunks:                 # no step after the last: its cycle ends with the context, kept
                    prof.step()
    walls = walls[1:]
    events = prof.events()
    a = attribute(events, cuda)
    if cuda and not a["count"]:
        print("WARNING: the profiler recorded no CUDA kernels (CUPTI missing?): only host times below", flush=True)

    n = args.chunks
    ms = 1e-3 / n                                                      # summed us -> ms per chunk
    wall = 1000 * sum(s for s, _ in walls) / n
    wall_unprof = 1000 * sum(s for s, _ in timed) / len(timed)
    frames = sum(f for _, f in timed) / len(timed)
    busy = sum(a["device_us"].values()) * ms
    buckets = {b: a["device_us"].get(b, 0.0) * ms for b in BUCKETS if b != "host"}
    buckets["host"] = wall - busy
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "preset": args.preset, "width": w, "height": h, "chunk_frames": st.chunk_frames, "steps": st.steps,
        "window": st.window, "twin": st.twin, "audio_adapter": bool(cfg.dit.audio_dim), "attention": args.attention,
        "kernels": args.kernels, "linear": args.linear, "keep_context": args.keep_context, "keep_speech": args.keep_speech, "room": args.room, "compiled": compiled,
        "compile_mode": args.compile_mode if compiled else None, "warmup_chunks": warmup, "chunks": n,
        "timed_chunks": len(timed),
        "frames_per_chunk": frames, "chunk_ms": wall, "chunk_ms_unprofiled": wall_unprof,
        "fps_unprofiled": frames / (wall_unprof / 1000) if wall_unprof else None,
        "device_busy_ms": busy, "host_gap_ms_unprofiled": wall_unprof - busy if cuda else None,
        "attributed_share": (sum(a["device_us"].values()) / a["all_device_us"]) if a["all_device_us"] else None,
        "mid_chunk_sync_ms": a["waits_us"] * ms if cuda else None, "mid_chunk_syncs": a["waits"] / n if cuda else None,
        "buckets_ms": buckets,
        "host_ms": {b: v * ms for b, v in a["host_us"].items()} if cuda else None,
        "launches_per_chunk": {b: c / n for b, c in a["count"].items()},
        "top_items_ms": {b: {k: v * ms for k, v in d.items()} for b, d in a["items"].items()},
    }

    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines = [prof.key_averages().table(sort_by=sort, row_limit=80), "", "top items per bucket (ms per chunk):"]
    for b, d in result["top_items_ms"].items():
        lines.append(f"  {BUCKETS[b]}")
        lines += [f"    {v:9.3f}  {k}" for k, v in d.items()]
    (out / "ops.txt").write_text("\n".join(lines) + "\n")
    result["trace"] = save_trace(prof, out, args.trace_mib)
    (out / "stream_profile.json").write_text(json.dumps(result, indent=1))

    for b, d in result["top_items_ms"].items():        # the biggest items, before the table
        top = sorted(d.items(), key=lambda kv: -kv[1])[:3]
        print(f"{BUCKETS[b]:36} " + "; ".join(f"{_short(k, 60)} {v:.2f}" for k, v in top))
    busy_what = "device busy" if cuda else "in ops"
    print(f"\n{args.preset}{' + speech adapter' if result['audio_adapter'] else ''}, {w}x{h}, chunk {st.chunk_frames} "
          f"({frames:g} frames), {st.steps} steps, window {st.window}, twin {st.twin}, attention {args.attention}"
          f"{', kernels' if args.kernels else ''}{', linear ' + args.linear if args.linear != 'bf16' else ''}"
          f"{', compiled' if compiled else ', eager'}; {result['device']}, {'bf16' if cuda else 'fp32'}")
    print(f"{n} profiled chunks after {warmup} + {len(timed)}; {wall:.1f} ms a chunk profiled, {busy:.1f} ms {busy_what}"
          + (f", kernels attributed {100 * result['attributed_share']:.1f} % of device time" if cuda and result["attributed_share"] else ""))
    host_col = cuda
    print(f"{'bucket':36} {'ms/chunk':>9} {'%':>6} {'launches' if cuda else 'ops':>9}" + (f" {'host ms*':>8}" if host_col else ""))
    for b, label in BUCKETS.items():
        v = buckets[b]
        if b == "host":
            label = "host gaps (wall - device busy)" if cuda else "host: Python between ops"
        row = f"{label:36} {v:9.2f} {100 * v / wall:6.1f} {result['launches_per_chunk'].get(b, 0):9.0f}"
        if host_col:
            row += f" {result['host_ms'].get(b, 0.0):8.2f}" if b != "host" else ""
        print(row)
    print(f"{'total (profiled chunk wall)':36} {sum(buckets.values()):9.2f} {100.0:6.1f}")
    if host_col:
        print("* host ms: CPU time in the bucket's ops and launches, under the profiler and its hooks")
    print(f"unprofiled: {wall_unprof:.1f} ms a chunk ({result['fps_unprofiled']:.1f} fps)"
          + (f": host gaps without the profiler ~ {wall_unprof - busy:.1f} ms; host syncs inside the chunk: "
             f"{result['mid_chunk_syncs']:g}, {result['mid_chunk_sync_ms']:.1f} ms" if cuda else
             " (on the CPU the profiler slows the ops too: no unprofiled split)"))
    return result


if __name__ == "__main__":
    main()
