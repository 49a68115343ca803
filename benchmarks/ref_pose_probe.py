"""Does the teacher copy its reference frame's geometry, and does a reference in another pose stop it?

Measures a bidirectional teacher's x0 error per latent frame on held-out world clips at one noise level,
split by what the frame shows: "posed" (the head turned or pitched: |yaw| or |pitch| >= POSED) against
"still" (both under STILL), with the neutral reference a user's photo has. A model that copies the
reference's geometry predicts posed frames far worse than still ones; given a reference that is itself
turned (`--turned-ref`), the same model predicts the posed frames better and the still ones worse.

With `--steps N`, the teacher is first trained N further steps in two arms from the same start, the same
clips and seeds, differing only in `ref_pose` (ObjectiveSettings: the share of clips whose reference shows
a random pose): 0, as every teacher so far, and the given share. On the CPU (a few dozen steps of the
`small` preset) it reads a direction, not a final number; the real test is a recipe stage on the GPU
(`teacher_recipe.py --phase bidirectional --ref-pose P`).

    python benchmarks/ref_pose_probe.py --from W/bidirectional/ema.safetensors --codec W/codec.safetensors \\
        --out /tmp/rp [--steps 40 --batch 4 --samples 64 --ref-pose 1.0] [--clips 12]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

POSED, STILL = 0.3, 0.1     # |yaw| or |pitch| of a latent frame (its video frames' mean)
POSES = ("turn left", "turn right", "shake head", "nod", "look up")   # clip i is told POSES[i % 5]
NOISE = 0.4                 # the noise level the error is read at (a pose is decided at mid noise)


def latent_pose(track: np.ndarray, per: int, F: int) -> np.ndarray:
    """A per-video-frame track -> per latent frame (frame 0 alone, then `per` at a time, as the codec groups)."""
    return np.array([track[0]] + [track[1 + per * (t - 1):1 + per * t].mean() for t in range(1, F)])


@torch.no_grad()
def pose_errors(ckpt: str, codec_path: str, clips: int, refs: tuple[str, ...] = ("neutral ref",), seed: int = 0) -> dict:
    """{reference: mean x0 error of posed and still latent frames} over `clips` held-out clips, clip i told
    POSES[i % 5] at 15 % of its length, the action lasting 70 % of it (still frames before it, posed ones in
    it); `refs`: "neutral ref" (the clip's, as in eval) and / or "turned ref" (its most posed frame), each
    clip rendered, coded and noised once for all of them."""
    from models.checkpoint import load_dit, load_taehv
    from models.encoders import text_encoder
    from models.audio import audio_features, audio_latent
    from models.flow import add_noise, timestep, x0_from_velocity
    from stages.eval.bench.cases import HELD_OUT_BASE
    from stages.synth.world import event
    from stages.train.data import fit_text, frames_to_latents, render_clip
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_dit(ckpt, device=dev)
    codec = load_taehv(codec_path, dev)
    enc = text_encoder("minilm", max_len=cfg.dit.text_len)
    d, per = cfg.dit, cfg.audio.video_frames_per_latent
    errs = {r: {"posed": [], "still": []} for r in refs}
    secs = cfg.video_frames / cfg.audio.fps
    for i in range(clips):
        c = render_clip(HELD_OUT_BASE + i, cfg, split="eval", truth=True,
                        events=[event(0.15 * secs, POSES[i % len(POSES)], 0.7 * secs)])
        tr = c["truth"]["tracks"]
        pose = np.maximum(np.abs(latent_pose(np.asarray(tr["yaw"]), per, cfg.latent_frames)),
                          np.abs(latent_pose(np.asarray(tr["pitch"]), per, cfg.latent_frames)))
        texts, idx = c["text"]
        text = torch.stack([fit_text(torch.as_tensor(enc([t])[0]).float(), d.text_len) for t in texts])[torch.tensor(idx)].to(dev)
        z = frames_to_latents(codec, c["frames"])[None]
        aud = audio_features(torch.from_numpy(c["audio"]), cfg.latent_frames, cfg.audio, context=d.audio_context)[None].to(dev)
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + i)).to(dev)
        xt = add_noise(z, eps, NOISE)
        xa = None                          # a joint audio latent (the tiny preset's), noised alike
        if d.joint_audio:
            a = audio_latent(torch.from_numpy(c["audio"]), cfg.latent_frames, d.audio_latent_tokens, cfg.audio)[None].to(dev)
            xa = add_noise(a, torch.randn(a.shape, generator=torch.Generator().manual_seed(seed + i)).to(dev), NOISE)
        for name in refs:
            image = c["frames"][per * int(np.argmax(pose))] if name == "turned ref" else c["ref"]
            ref = frames_to_latents(codec, image[None])[None]
            with torch.autocast("cuda", torch.bfloat16, enabled=dev == "cuda"):
                v = model(xt, torch.full((1,), timestep(NOISE), device=dev), text[None], audio=aud, audio_latent=xa,
                          ref=ref).video
            e = ((x0_from_velocity(xt, v.float(), NOISE) - z) ** 2).mean(dim=(0, 1, 3, 4)).cpu().numpy()
            errs[name]["posed"] += e[pose >= POSED].tolist()
            errs[name]["still"] += e[pose < STILL].tolist()
    out = {}
    for name, got in errs.items():
        out[name] = {k: float(np.mean(v)) for k, v in got.items()}
        out[name].update(frames={k: len(v) for k, v in got.items()}, ratio=out[name]["posed"] / out[name]["still"],
                         clips=clips)
    return out


def train_arm(start: str, codec: str, out: Path, steps: int, batch: int, samples: int, ref_pose: float,
              lr: float, workers: int = 0) -> tuple[str, dict]:
    """`steps` more stage-1 steps from `start` (its preset) with `ref_pose`; the run's EMA checkpoint and summary."""
    from models.checkpoint import checkpoint_config
    from stages.train.loop import TrainSettings, train
    from stages.train.objectives import ObjectiveSettings
    st = TrainSettings(stage="bidirectional", preset=checkpoint_config(start).name, steps=steps, batch=batch, samples=samples, lr=lr,
                       warmup=2, ema=0.9, save_every=steps, seed=7, init_from=start, codec=codec,
                       objective=ObjectiveSettings(ref_pose=ref_pose))
    t0 = time.perf_counter()
    summary = train(st, out, prefetch=workers)
    summary["wall_s"] = time.perf_counter() - t0
    return str(Path(summary["checkpoint"]) / "ema.safetensors"), summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="start", required=True, help="a bidirectional teacher (its EMA file or index)")
    ap.add_argument("--codec", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--clips", type=int, default=12, help="held-out clips, each told a pose action")
    ap.add_argument("--steps", type=int, default=0, help="train two arms this many steps first (0: measure only)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--ref-pose", type=float, default=1.0, help="the second arm's share of posed references")
    ap.add_argument("--workers", type=int, default=0, help="processes rendering the arms' clips")
    args = ap.parse_args(argv)
    for path in (args.start, args.codec):
        if not Path(path).exists() and not Path(str(path) + ".index.json").exists():
            ap.error(f"{path} does not exist")
    if not Path(args.start).exists():                       # shipped in shards: their index
        args.start = str(args.start) + ".index.json"
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"start": pose_errors(args.start, args.codec, args.clips, ("neutral ref", "turned ref"))}
    if args.steps:
        for arm in (0.0, args.ref_pose):
            ckpt, summary = train_arm(args.start, args.codec, args.out / f"arm{arm}", args.steps, args.batch,
                                      args.samples, arm, args.lr, args.workers)
            res[f"ref_pose {arm}"] = {**pose_errors(ckpt, args.codec, args.clips), "train": summary}
    (args.out / "ref_pose_probe.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"{'model':<16} {'reference':<12} {'posed':>8} {'still':>8} {'ratio':>6}  frames posed / still")
    for name, r in res.items():
        for ref in ("neutral ref", "turned ref"):
            if ref in r:
                e = r[ref]
                print(f"{name:<16} {ref:<12} {e['posed']:8.4f} {e['still']:8.4f} {e['ratio']:6.2f}  "
                      f"{e['frames']['posed']} / {e['frames']['still']}")
    return res


if __name__ == "__main__":
    main()
