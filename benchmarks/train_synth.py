"""Stage 1 then stage 2 of the `small` preset on the synthetic avatar world (256x256), on one GPU:
throughput (samples/s, tokens/s, MFU) and sample quality on held-out synthetic cases.

    python benchmarks/train_synth.py --phase bi --minutes 8 --codec ae.safetensors   # stage 1, steps fitted to the time
    python benchmarks/train_synth.py --phase causal --minutes 6    # stage 2 from stage 1's EMA, then eval

Checkpoints stay under --work (default /tmp/vidu-train, not committed). Videos (ground truth |
generated), loss curves and a JSON of all figures go to $OUT; a table is printed last.
Quality, measured from pixels by the world's own analyzer (stages.synth.analyze):
  identity: mean RGB error of skin / shirt / hair against the reference identity (lower is better;
            compared with the ground-truth clip's own error and with a wrong identity's);
  mouth:    correlation of the measured mouth opening with the ground-truth mouth track (which
            follows the speech envelope);
  action:   for clips whose instruction drives a measurable track, whether the generated clip moves
            that track the instructed way (same measurement as on the ground truth).
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

from models.checkpoint import load_dit, load_taehv  # noqa: E402
from models.config import preset  # noqa: E402
from models.taehv import TAEHV  # noqa: E402
from stages.train.loop import TrainSettings, tokens_per_sample, train  # noqa: E402
from stages.train.objectives import ObjectiveSettings  # noqa: E402

H100_BF16_PEAK = 989e12          # dense bf16 FLOP/s of an H100 SXM
TRACK_OF = {"turn left": ("yaw", -1), "turn right": ("yaw", 1), "raise a hand": ("hand", 1), "smile": ("smile", 1),
            "blink": ("eyes", -1), "nod": ("pitch", 1), "look up": ("pitch", -1)}


def flops_per_sample(cfg) -> float:
    """Training FLOPs of one sample: 6 x linear params x tokens + attention (fwd 4 L^2 dim per layer, x3)."""
    d = cfg.dit
    L = tokens_per_sample(cfg)
    per_block = 4 * d.dim * d.dim * 2 + 2 * d.dim * d.ffn_dim + (4 * d.dim * d.dim if d.audio_dim else 0)
    linear = 6 * L * per_block * d.num_layers
    attn = 3 * 4 * L * L * d.dim * d.num_layers
    return float(linear + attn)


RUN = {"preset": "small", "batch": 32, "samples": 2048, "codec": None}   # codec: benchmarks/train_autoencoder.py's


def settings(phase: str, steps: int, work: Path) -> TrainSettings:
    common = dict(preset=RUN["preset"], batch=RUN["batch"], samples=RUN["samples"], lr=3e-4, warmup=min(100, steps // 5),
                  ema=0.995, save_every=max(50, steps // 4))
    if phase == "bi":
        return TrainSettings(stage="bidirectional", steps=steps, codec=RUN["codec"], **common)
    return TrainSettings(stage="causal", steps=steps, init_from=str(latest(work / "bi") / "ema.safetensors"),
                         objective=ObjectiveSettings(p_teacher_forcing=0.5, chunk_frames=1, tau_max=0.5), **common)


def latest(run: Path) -> Path:
    return run / (run / "latest").read_text().strip()


def probe_step_time(phase: str, work: Path) -> float:
    st = settings(phase, 12, work)
    t = train(TrainSettings(**{**st.__dict__, "steps": 12, "samples": 64, "save_every": 10_000}),
              work / f"probe-{phase}", prefetch=min(16, os.cpu_count() or 1))
    return t["seconds"] / 12                           # data cached before the clock starts


def run_phase(phase: str, minutes: float, work: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    step_s = probe_step_time(phase, work)
    budget = minutes * 60 - (time.perf_counter() - t0) - 90       # leave time for prefetch, saving and eval
    steps = max(50, int(budget / step_s / 10) * 10)
    st = settings(phase, steps, work)
    summary = train(st, work / phase, prefetch=min(16, os.cpu_count() or 1))
    cfg = preset(RUN["preset"])
    summary["mfu"] = summary["samples_per_s"] * flops_per_sample(cfg) / H100_BF16_PEAK
    summary["flops_per_sample"] = flops_per_sample(cfg)
    summary["probe_step_s"] = step_s
    import shutil
    shutil.copy(work / phase / "loss.png", out / f"loss_{phase}.png")
    return summary


@torch.no_grad()
def decode(codec: TAEHV, z: torch.Tensor) -> np.ndarray:
    v = codec.decode_video(z.float().permute(0, 2, 1, 3, 4))[0]   # [T, 3, H, W] in [0, 1]
    return (v * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def action_score(m_gen: dict, m_gt: dict, sample, name: str) -> bool | None:
    if name not in TRACK_OF:
        return None
    track, sign = TRACK_OF[name]
    inside = np.array([ins == name for ins in sample.instructions])
    if inside.sum() < 3 or (~inside).sum() < 3:
        return None
    def delta(m):
        v = m[track]
        return sign * (np.nanmean(v[inside]) - np.nanmean(v[~inside]))
    gt = delta(m_gt)
    return bool(gt > 0 and delta(m_gen) > 0.5 * gt)


def evaluate(work: Path, out: Path, cases: int = 24) -> dict:
    from stages import synth
    from stages.sense.media import write_video
    from stages.train.data import clip_instruction, encode_clip, render_clip
    from stages.train.sample import sample_bidirectional, sample_causal
    from models.encoders import TextEncoder, TextTable
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset(RUN["preset"])
    codec = load_taehv(work / "bi" / "codec.safetensors", dev)
    table = os.environ.get("VIDU_TEXT_TABLE")
    enc = TextTable(table) if table else TextEncoder("minilm", max_len=cfg.dit.text_len)
    models = {"bidirectional": load_dit(latest(work / "bi") / "ema.safetensors", device=dev)[0],
              "causal": load_dit(latest(work / "causal") / "ema.safetensors", device=dev)[0]}
    rows, written = [], 0
    rng = np.random.default_rng(0)
    for k in range(cases):
        seed = 10_000_000 + k                                          # never a training clip's seed
        s = synth.make_sample(seed, cfg.width, cfg.height, cfg.audio.fps, cfg.video_frames / cfg.audio.fps)
        x = encode_clip(cfg, codec, render_clip(seed, cfg))
        text = enc([clip_instruction(s.instructions)]).to(dev)
        ref, audio = x["ref"][None].to(dev), x["audio"][None].to(dev)
        m_gt = synth.analyze(s.frames, s.identity)
        other = synth.make_sample(int(rng.integers(1 << 30)), 64, 64).identity
        row = {"seed": seed, "instruction": clip_instruction(s.instructions),
               "identity_err_truth": synth.identity_error(m_gt, s.identity),
               "identity_err_wrong_identity": synth.identity_error(m_gt, other)}
        for name, model in models.items():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                if name == "bidirectional":
                    z, _ = sample_bidirectional(model, cfg, ref, text, audio, steps=30, seed=k)
                else:
                    z, _ = sample_causal(model, cfg, ref, text, audio, steps=16, seed=k)
            frames = decode(codec, z)
            m = synth.analyze(frames, s.identity)
            ok = ~np.isnan(m["mouth"]) & ~np.isnan(m_gt["mouth"])
            corr = float(np.corrcoef(m["mouth"][ok], s.tracks["mouth"][ok])[0, 1]) if ok.sum() > 3 and \
                np.std(m["mouth"][ok]) > 0 and np.std(s.tracks["mouth"][ok]) > 0 else None
            row[f"{name}_identity_err"] = synth.identity_error(m, s.identity)
            row[f"{name}_face_found"] = float(np.mean(m["found"]))
            row[f"{name}_mouth_corr"] = corr
            row[f"{name}_action_ok"] = action_score(m, m_gt, s, row["instruction"])
            if written < 6 and name == "causal":
                both = np.concatenate([s.frames, frames], axis=2)           # truth | generated
                write_video(out / f"case{k:02d}_{row['instruction'].replace(' ', '_')[:20]}.mp4", both, cfg.audio.fps,
                            s.audio)
                written += 1
        rows.append(row)

    def mean(key):
        v = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(v)) if v else None
    summary = {"cases": cases, "identity_err_truth": mean("identity_err_truth"),
               "identity_err_wrong_identity": mean("identity_err_wrong_identity")}
    for name in models:
        acts = [r[f"{name}_action_ok"] for r in rows if r[f"{name}_action_ok"] is not None]
        summary[name] = {"identity_err": mean(f"{name}_identity_err"), "face_found": mean(f"{name}_face_found"),
                         "mouth_corr": mean(f"{name}_mouth_corr"),
                         "actions_ok": f"{sum(acts)}/{len(acts)}" if acts else "n/a"}
    return {"summary": summary, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["bi", "causal"], required=True)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vidu-train"))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--codec", type=Path, help="the autoencoder (default: vidu train's quick one)")
    args = ap.parse_args()
    RUN.update(preset=args.preset, batch=args.batch, samples=args.samples, codec=str(args.codec) if args.codec else None)
    out = Path(os.environ.get("OUT", "."))
    args.work.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "phase": args.phase, "train": run_phase(args.phase, args.minutes, args.work, out)}
    if args.phase == "causal":
        res["eval"] = evaluate(args.work, out, args.cases)
    (out / f"train_{args.phase}.json").write_text(json.dumps(res, indent=1, default=str))
    t = res["train"]
    print(f"\n{args.phase} on {res['device']}: {t['steps']} steps x batch {args.batch}, {t['seconds']:.0f} s, "
          f"{t['samples_per_s']:.1f} samples/s, {t['tokens_per_s']:.0f} tokens/s, MFU {100 * t['mfu']:.1f}%, "
          f"final loss {t['final_loss']:.4f}")
    if "eval" in res:
        print(json.dumps(res["eval"]["summary"], indent=1))


if __name__ == "__main__":
    main()
