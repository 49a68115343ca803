"""Why the lipsync phase's discriminator can sit at chance, and the fit settings that learn: the world's clips
through a codec, prepared once, then one fit per arm (batch, learning rate, steps, how many clips, crops with
each clip's mean taken out), each scored on its training clips and on held-out ones (eval-split voices).
Before that, the same clips rendered here and in the rendering workers, and coded on the CPU and on the device,
must agree (the GPU path is the CPU's).

    python benchmarks/lipsync_fit.py --codec models/starter/codec.safetensors [--clips 256 --held 64 --steps 600]

Session 58 (H100): at batch 128, 256 clips stayed at chance through 600 steps at every learning rate tried
(train AUC 0.49), 64 clips learned (0.79 train, 0.71 held out), and batch 512 learned (0.83 / 0.77): the
plateau, not the device. The last two arms, at batch 512, take a baseline out of the crops: the clip's mean, or
its first crop (which the sync loss could take out of a generated chunk too). The table is last; everything is in
$OUT/lipsync_fit.json."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from models.checkpoint import load_taehv
from models.config import preset
from models.taehv import frames_to_latents
from stages.train.lipsync import LipSyncConfig, crop_mouth, evaluate, fit, prepare_clips, render_pair


def _centered(d: dict) -> dict:
    """Each clip's crops less their mean over the clip: the mouth's motion without the face it is on."""
    return {"crops": d["crops"] - d["crops"].mean(1, keepdim=True), "speech": d["speech"]}


def _less_first(d: dict) -> dict:
    """Each clip's crops less its first crop: what a generated chunk can compute (its first frame stands for the
    reference frame the stream keeps), where the clip mean needs frames not yet made."""
    return {"crops": d["crops"] - d["crops"][:, :1], "speech": d["speech"]}


def _first(d: dict, n: int) -> dict:
    return {"crops": d["crops"][:n], "speech": d["speech"][:n]}


def parity(cfg, cpu_codec, dev_codec, workers: dict) -> dict:
    """Three training clips rendered here vs in the workers (speech exactly; crops coded here on the CPU vs
    there on `dev_codec`'s device), and the codec on the CPU vs on that device (None: the CPU is the device)."""
    lc = LipSyncConfig.for_model(cfg)
    pairs = [render_pair(11 * 1_000_003 + i, cfg, 4.0, "train") for i in range(3)]
    cpu = [frames_to_latents(cpu_codec, c["frames"]) for c in pairs]
    here = torch.stack([crop_mouth(x[None], c["boxes"][None], lc.crop) for x, c in zip(cpu, pairs)])
    out = {"speech_workers_vs_here": float((workers["speech"][:3] - torch.stack([c["speech"] for c in pairs])).abs().max()),
           "crops_workers_vs_here_cpu": float((workers["crops"][:3] - here).abs().max()), "crop_std": float(here.std())}
    if dev_codec is not None:
        out["codec_cpu_vs_device"] = max(float((a - frames_to_latents(dev_codec, c["frames"])).abs().max())
                                         for a, c in zip(cpu, pairs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codec", required=True)
    ap.add_argument("--clips", type=int, default=256)
    ap.add_argument("--held", type=int, default=64)
    ap.add_argument("--steps", type=int, default=600, help="steps of each arm (2000-step arms: this x 10 / 3)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "."))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = preset("small")
    lc = LipSyncConfig.for_model(cfg)
    cpu_codec = load_taehv(args.codec, "cpu")
    codec = cpu_codec if dev == "cpu" else load_taehv(args.codec, dev)
    t = time.perf_counter()
    tr = prepare_clips(cfg, codec, args.clips, seed=11, seconds=4.0, split="train", workers=args.workers)
    ho = prepare_clips(cfg, codec, args.held, seed=12, seconds=4.0, split="eval", workers=args.workers)
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "prepare_s": time.perf_counter() - t,
           "parity": parity(cfg, cpu_codec, None if dev == "cpu" else codec, tr), "arms": {}}
    print(json.dumps(res), flush=True)
    n, long = args.steps, args.steps * 10 // 3
    arms = [("batch 512 (the default)", tr, ho, {}), ("batch 128", tr, ho, dict(batch=128)),
            ("batch 128, lr 1e-3", tr, ho, dict(batch=128, lr=1e-3)), ("batch 128, lr 5e-4", tr, ho, dict(batch=128, lr=5e-4)),
            ("batch 128, lr 2e-4", tr, ho, dict(batch=128, lr=2e-4)), (f"batch 128, {long} steps", tr, ho, dict(batch=128, steps=long)),
            (f"batch 128, first {args.clips // 4} clips", _first(tr, args.clips // 4), ho, dict(batch=128)),
            (f"batch 128, first {args.clips // 2} clips", _first(tr, args.clips // 2), ho, dict(batch=128)),
            ("batch 128, crops centred per clip", _centered(tr), _centered(ho), dict(batch=128)),
            (f"batch 128, crops centred, {long} steps", _centered(tr), _centered(ho), dict(batch=128, steps=long)),
            ("crops centred per clip", _centered(tr), _centered(ho), {}),
            ("crops less the clip's first crop", _less_first(tr), _less_first(ho), {})]
    for name, a, b, kw in arms:
        t = time.perf_counter()
        m = fit(a, lc, **{"steps": n, **kw}, device=dev)
        res["arms"][name] = {"settings": kw, "fit_s": time.perf_counter() - t, "train": evaluate(m, a), "held": evaluate(m, b)}
        print(name, json.dumps(res["arms"][name]), flush=True)
    (out / "lipsync_fit.json").write_text(json.dumps(res, indent=1))
    print("\n| arm | train AUC shifted | held-out AUC shifted / other clip / window |\n|---|---|---|")
    for name, r in res["arms"].items():
        h = r["held"]
        print(f"| {name} | {r['train']['auc_shifted']:.3f} | {h['auc_shifted']:.3f} / {h['auc_other_clip']:.3f} / {h['auc_window']:.3f} |")


if __name__ == "__main__":
    main()
