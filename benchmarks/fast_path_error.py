"""The fast path's error against the plain one, layer by layer and chunk by chunk (issue 18's quality guard).

    python benchmarks/fast_path_error.py                              # the starter model (trained), its shapes
    python benchmarks/fast_path_error.py --preset wan2.1-1.3b --size 960x544 --outliers 8   # random weights,
                                                                      # 8 injected outlier channels (labelled)
    python benchmarks/fast_path_error.py --preset tiny --size 64x64 --chunks 3   # CPU rehearsal (interpreter)

The same stream (same weights, noise, text, speech, reference) runs through the plain model and through each
fast configuration (a copy of it): `kernels` (DiT.use_kernels: the fused element-wise Triton kernels),
`int8-attention` and `sparse-attention` (self-attention backends), `fp8` and `int8` (DiT.quantize: W8A8
linears), and `all` (kernels + int8 attention + fp8). Reported per configuration: the relative L2 of each block's
output against the plain model's at the same call (worst over the calls, per layer), and of each chunk's final
latent. Random weights (--preset): Wan's initialisation, its zero-initialised tensors drawn N(0, 0.02) so that
every branch contributes. Quantization error means little on random weights (no outlier channels, which are why per-block scales
exist): the default is the trained starter; `--outliers N` multiplies N channels of every block's output
projections by `--outlier-scale` in the random-weight case, and the output says so. Writes $OUT/fast_path_error.json
(or ./) and prints a table last.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.config import preset  # noqa: E402
from models.dit import DiT  # noqa: E402
from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings  # noqa: E402

CONFIGS = {"kernels": dict(kernels=True), "int8-attention": dict(attention="int8"),
           "sparse-attention": dict(attention="sparse"), "fp8": dict(linear="fp8"), "int8": dict(linear="int8"),
           "all": dict(kernels=True, attention="int8", linear="fp8")}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def stream(model: DiT, cfg, st: StreamSettings, chunks: int, dev, dtype) -> tuple[list, list]:
    """(each chunk's final latent, every block call's output in call order) of one stream from fixed inputs."""
    d = cfg.dit
    g = torch.Generator(device=dev).manual_seed(0)
    text = torch.randn(1, 8, d.text_dim, generator=g, device=dev, dtype=dtype)
    ctx = sum(d.audio_context)
    audio = (torch.randn(1, chunks * st.chunk_frames + ctx, cfg.audio.mel_per_latent, d.audio_dim, generator=g,
                         device=dev, dtype=dtype) if d.audio_dim else None)
    ref = torch.randn(1, d.in_dim, 1, cfg.height // 8, cfg.width // 8, generator=g, device=dev, dtype=dtype)
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o[0].float().cpu())) for b in model.blocks]
    eng = StreamEngine(model, cfg, st, seed=0, keep_text=True)
    eng.start(ref)
    latents = []
    try:
        for j in range(chunks):
            a = None if audio is None else audio[:, j * st.chunk_frames:(j + 1) * st.chunk_frames + ctx]
            latents.append(eng.step(ChunkInputs(text, a)).video.float().cpu())
    finally:
        for h in hooks:
            h.remove()
    return latents, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, help="default: the starter model (with --preset: random weights)")
    ap.add_argument("--preset", help="random weights of this preset instead of a checkpoint")
    ap.add_argument("--size", help="WxH (default: the model's own)")
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--chunk-frames", type=int, default=1)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of: {', '.join(CONFIGS)}")
    ap.add_argument("--outliers", type=int, default=0, help="random weights: outlier channels to inject")
    ap.add_argument("--outlier-scale", type=float, default=20.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    names = [c for c in a.configs.split(",") if c]
    if bad := [c for c in names if c not in CONFIGS]:
        ap.error(f"unknown configuration(s) {', '.join(bad)}; choose from {', '.join(CONFIGS)}")
    if a.preset:
        cfg = preset(a.preset)
        torch.manual_seed(0)
        with torch.device(dev):
            model = DiT(cfg.dit).to(dtype).eval()
        with torch.no_grad():                     # the zero-initialised branches (head, adapters) would give zeros
            for p in model.parameters():
                if not p.any():
                    p.normal_(0.0, 0.02)
        what = f"{a.preset}, random weights (zero-initialised ones drawn N(0, 0.02))"
    else:
        from models.checkpoint import load_dit
        from models.starter import starter_checkpoint
        path = a.ckpt or starter_checkpoint()
        model, cfg = load_dit(path, device=dev, dtype=dtype)
        what = f"{path.name} (trained)"
    if a.size:
        w, h = (int(v) for v in a.size.split("x"))
        cfg = cfg.replace(height=h, width=w)
    if a.outliers:
        if not a.preset:
            ap.error("--outliers is for random weights (--preset)")
        g = torch.Generator().manual_seed(1)
        chans = torch.randperm(cfg.dit.dim, generator=g)[:a.outliers].to(dev)
        with torch.no_grad():
            for b in model.blocks:
                for lin in (b.self_attn.o, b.ffn[2]):
                    lin.weight[chans] *= a.outlier_scale
        what += f", {a.outliers} outlier channels x{a.outlier_scale:g} injected"
    st = StreamSettings(chunk_frames=a.chunk_frames, steps=3, window=a.window)
    t0 = time.perf_counter()
    base_lat, base_out = stream(model, cfg, st, a.chunks, dev, dtype)
    rows = []
    for name in names:
        fast = copy.deepcopy(model)
        c = CONFIGS[name]
        fast.use_kernels(c.get("kernels", False), c.get("attention", "sdpa"))
        if "linear" in c:
            fast.quantize(c["linear"])
        try:
            lat, out = stream(fast, cfg, st, a.chunks, dev, dtype)
        except Exception as e:  # noqa: BLE001  -- one configuration's failure is a row
            rows.append({"config": name, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
            continue
        L = len(model.blocks)
        per_layer = [max(rel(o, b) for o, b in zip(out[i::L], base_out[i::L])) for i in range(L)]
        rows.append({"config": name, "latent_rel_l2": [rel(x, y) for x, y in zip(lat, base_lat)],
                     "layer_rel_l2_max": per_layer})
        del fast
    info = {"model": what, "size": f"{cfg.width}x{cfg.height}", "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "dtype": str(dtype), "chunks": a.chunks, "window": a.window, "date": time.strftime("%Y-%m-%d"),
            "seconds": time.perf_counter() - t0, "rows": rows}
    out = Path(os.environ.get("OUT", ".")) / "fast_path_error.json"
    out.write_text(json.dumps(info, indent=1))
    print(f"\n{what}, {info['size']}, {info['device']} {dtype}, {a.chunks} chunks; relative L2 against the plain path")
    print("| config | chunk 1 latent | last chunk latent | worst layer (which) | median layer |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | failed: {r['error'][:100]} | | | |")
            continue
        lay = r["layer_rel_l2_max"]
        worst = max(range(len(lay)), key=lay.__getitem__)
        print(f"| {r['config']} | {r['latent_rel_l2'][0]:.2e} | {r['latent_rel_l2'][-1]:.2e} | {lay[worst]:.2e} ({worst}) | "
              f"{sorted(lay)[len(lay) // 2]:.2e} |")


if __name__ == "__main__":
    main()
