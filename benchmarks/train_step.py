"""Where a training step of the `small` teacher goes on the GPU: seconds per step of stage 1's objective
(bidirectional_loss + backward + AdamW + EMA, bf16 autocast, as stages/train/loop.py runs it) on
synthetic clips of the real shapes, for several batch sizes, eager or with compiled blocks, and three
ways of feeding the batch; and a profiler table of the first variant (and of the first compiled one).

    python benchmarks/train_step.py [--steps 20] [--variants 32:eager:device,32:compiled:stacked,...]

Feeding: "device" (one batch already on the GPU: the model's cost alone), "host" (stages/train/data.py's
Dataset stacking the step's clips on the host and copying them, the loop before session 28), "stacked"
(Dataset.stack_on: every clip on the GPU, a batch is one gather; what the loop does now).
Results: $OUT/train_step.json and $OUT/train_step_profile*.txt; a table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from models.config import preset as get_preset  # noqa: E402
from models.dit import DiT  # noqa: E402
from stages.train.machinery import ema_update  # noqa: E402
from stages.train.objectives import Draw, ObjectiveSettings, bidirectional_loss  # noqa: E402
from teacher_recipe import H200_BF16_PEAK, flops_per_sample  # noqa: E402



def synthetic_clip(cfg, g: torch.Generator) -> dict:
    """One coded clip as the Dataset caches it (no batch dimension)."""
    d = cfg.dit
    F, h, w = cfg.latent_frames, cfg.height // 8, cfg.width // 8
    before, after = d.audio_context
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mouth = torch.zeros(F, h, w)
    mouth[..., h // 2:h // 2 + 3, w // 2 - 2:w // 2 + 2] = 1
    clip = {"video": r(d.in_dim, F, h, w), "ref": r(d.in_dim, 1, h, w), "text": r(F, d.text_len, d.text_dim),
            "audio": r(before + F + after, cfg.audio.video_frames_per_latent * cfg.audio.mel_per_video_frame, d.audio_dim),
            "mouth": mouth}
    if d.joint_audio:
        clip["audio_latent"] = r(F, d.audio_latent_tokens, d.audio_latent_dim)
    return clip


def feeder(cfg, B: int, data: str, dev):
    """step -> batch on `dev`, fed the `data` way (module doc)."""
    from stages.train.data import ClipSource, Dataset
    g = torch.Generator().manual_seed(0)
    if data == "device":
        batch = {k: torch.stack([c[k] for c in [synthetic_clip(cfg, g) for _ in range(B)]]).to(dev)
                 for k in synthetic_clip(cfg, torch.Generator())}
        return lambda i: batch
    n = 4 * B
    ds = Dataset(ClipSource(cfg, 0, n), 0, None, None)
    ds.cache = {i: synthetic_clip(cfg, g) for i in range(n)}
    if data == "stacked":
        assert ds.stack_on(dev)
    return lambda i: ds.batch(i * B, B, dev)


def run(cfg, B: int, steps: int, compiled: bool, data: str, profile: Path | None = None) -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = DiT(cfg.dit).to(dev).train()
    if compiled:
        for block in model.blocks:
            block.compile(dynamic=False)   # as the Trainer does
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    ema = {k: p.detach().clone().float() for k, p in model.named_parameters()}
    feed = feeder(cfg, B, data, dev)
    st = ObjectiveSettings()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(i):
        draw = Draw(torch.Generator().manual_seed(i), 0, B, B)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, _ = bidirectional_loss(model, feed(i), st, draw)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, 0.995)
        return float(loss)          # the loop logs a float each step: one sync, as in training

    t_warm = time.perf_counter()
    for i in range(5):
        step(i)
    sync()
    warm_s = time.perf_counter() - t_warm
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    dt = (time.perf_counter() - t0) / steps
    if profile is not None:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])) as p:
            for i in range(3):
                step(i)
            sync()
        profile.write_text(p.key_averages().table(sort_by="cuda_time_total" if dev.type == "cuda" else "cpu_time_total",
                                                  row_limit=30))
    return {"batch": B, "compiled": compiled, "data": data, "warmup_s": warm_s, "step_s": dt, "samples_per_s": B / dt,
            "mfu": B * flops_per_sample(cfg) / dt / H200_BF16_PEAK,     # the recipe's count: MFUs compare
            "mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else 0.0}


DEFAULT_VARIANTS = "32:eager:device,32:compiled:device,32:compiled:host,32:compiled:stacked,64:compiled:stacked"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="batch:eager|compiled:device|host|stacked, ...")
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = get_preset(args.preset)
    gpu = torch.cuda.is_available()
    rows, profiled = [], set()
    for v in args.variants.split(","):
        b, mode, data = v.split(":")
        compiled = mode == "compiled"
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        prof = out / f"train_step_profile{'_compiled' if compiled else ''}.txt"
        rows.append(run(cfg, int(b), args.steps, compiled, data, None if prof in profiled else prof))
        profiled.add(prof)
        print(rows[-1], flush=True)
    (out / "train_step.json").write_text(json.dumps({"device": torch.cuda.get_device_name() if gpu else "cpu",
                                                     "rows": rows}, indent=1))
    print(f"{'batch':>5} {'compiled':>8} {'data':>8} {'warm-up s':>9} {'step s':>8} {'samples/s':>10} {'MFU':>6} {'GiB':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {'yes' if r['compiled'] else 'no':>8} {r['data']:>8} {r['warmup_s']:>9.1f} "
              f"{r['step_s']:>8.4f} {r['samples_per_s']:>10.1f} {100 * r['mfu']:>5.1f}% {r['mem_gib']:>6.1f}")


if __name__ == "__main__":
    main()
