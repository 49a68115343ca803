"""Where a training step of the `small` teacher goes on the GPU: seconds per step of stage 1's objective
(bidirectional_loss + backward + AdamW + EMA, bf16 autocast, as stages/train/loop.py runs it) on
synthetic batches of the real shapes, for several batch sizes and attention paths, and a profiler table
of the baseline.

    python benchmarks/train_step.py [--steps 20] [--batches 32,64,128]

Variants: each batch size eager and with every block compiled (torch.compile; warm-up includes the
compilation), and at the first batch "nomask" (timing only: the same step without the reference frame's
bool mask, i.e. what the mask costs).
Results: $OUT/train_step.json and $OUT/train_step_profile.txt; a table is printed last.
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

from models.config import preset as get_preset  # noqa: E402
from models.dit import DiT  # noqa: E402
from stages.train.machinery import ema_update  # noqa: E402
from stages.train.objectives import Draw, ObjectiveSettings, bidirectional_loss  # noqa: E402

H200_BF16_PEAK = 989e12


def synthetic_batch(cfg, B: int, device) -> dict:
    d = cfg.dit
    F, h, w = cfg.latent_frames, cfg.height // 8, cfg.width // 8
    before, after = d.audio_context
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    mouth = torch.zeros(B, F, h, w)
    mouth[..., h // 2:h // 2 + 3, w // 2 - 2:w // 2 + 2] = 1
    return {"video": r(B, d.in_dim, F, h, w), "ref": r(B, d.in_dim, 1, h, w), "text": r(B, F, d.text_len, d.text_dim),
            "audio_latent": r(B, F, d.audio_latent_tokens, d.audio_latent_dim) if d.joint_audio else None,
            "audio": r(B, before + F + after, cfg.audio.video_frames_per_latent * cfg.audio.mel_per_video_frame, d.audio_dim), "mouth": mouth.to(device)}


def flops_per_step(model: DiT, B: int, L: int) -> float:
    d = model.cfg
    return B * (6 * model.num_params() * L + 3 * 4 * L * L * d.dim * d.num_layers)


def run(cfg, B: int, steps: int, nomask: bool, compiled: bool, profile: Path | None = None) -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = DiT(cfg.dit).to(dev).train()
    if compiled:
        for block in model.blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    ema = {k: p.detach().clone().float() for k, p in model.named_parameters()}
    batch = synthetic_batch(cfg, B, dev)
    st = ObjectiveSettings()
    saved = DiT.__dict__["token_mask"]
    if nomask:
        DiT.token_mask = staticmethod(lambda *a, **k: None)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(i):
        draw = Draw(torch.Generator().manual_seed(i), 0, B, B)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, _ = bidirectional_loss(model, batch, st, draw)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, 0.995)
        return float(loss)          # the loop logs a float each step: one sync, as in training

    try:
        t_warm = time.perf_counter()
        for i in range(5):
            step(i)
        sync()
        warm_s = time.perf_counter() - t_warm
        sync()
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
            profile.write_text(p.key_averages().table(sort_by="cuda_time_total" if dev.type == "cuda" else "cpu_time_total", row_limit=30))
    finally:
        DiT.token_mask = saved
    L = (cfg.latent_frames + 1) * (cfg.height // 16) * (cfg.width // 16)
    return {"batch": B, "nomask": nomask, "compiled": compiled, "warmup_s": warm_s, "step_s": dt, "samples_per_s": B / dt,
            "mfu": flops_per_step(model, B, L) / dt / H200_BF16_PEAK, "mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else 0.0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = get_preset(args.preset)
    gpu = torch.cuda.is_available()
    rows = []
    variants = [(int(b), False, c) for c in (False, True) for b in args.batches.split(",")]
    variants.insert(1, (variants[0][0], True, False))
    for i, (B, nomask, compiled) in enumerate(variants):
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        prof = out / f"train_step_profile{'_compiled' if compiled else ''}.txt"
        rows.append(run(cfg, B, args.steps, nomask, compiled, prof if i == 0 or (compiled and not prof.exists()) else None))
        print(rows[-1], flush=True)
    (out / "train_step.json").write_text(json.dumps({"device": torch.cuda.get_device_name() if gpu else "cpu", "rows": rows}, indent=1))
    print(f"{'batch':>5} {'mask':>6} {'compiled':>8} {'warm-up s':>9} {'step s':>8} {'samples/s':>10} {'MFU':>6} {'GiB':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {'no' if r['nomask'] else 'yes':>6} {'yes' if r['compiled'] else 'no':>8} "
              f"{r['warmup_s']:>9.1f} {r['step_s']:>8.4f} {r['samples_per_s']:>10.1f} "
              f"{100 * r['mfu']:>5.1f}% {r['mem_gib']:>6.1f}")


if __name__ == "__main__":
    main()
