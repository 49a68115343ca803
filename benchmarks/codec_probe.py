"""Where a video autoencoder loses the mouth's motion inside a 4-frame latent group: in its encoder or
its decoder. CPU-sized (a few held-out world clips at the preset's size).

    python benchmarks/codec_probe.py --codec models/starter/codec.safetensors --clips 12 --frames 49

Per held-out world clip (benchmarks/train_autoencoder.py's seeds and selection), with the world's
ground-truth mouth track g (the renderer's State.mouth per frame) and the analyzer's readings a(x) of
the uncompressed frames and a(y) of the round trip:
  - r(a(x), g): is the eval's reference itself sane (the analyzer on the truth against the world)?
  - r(a(x), a(y)): the eval's mouth figure;  r(a(y), g): the round trip against the world;
  - the same three on the in-group motion alone: each 4-frame group's deviation from its own mean.
Encoder probe: ridge regression from the latents around the mouth (the 3 x 3 latent cells centred on
the mouth's ground-truth centroid in that group, all channels, and the same cells of the previous
latent; or fewer cells) to the group's 4 ground-truth mouth openings' deviations from their mean,
over those clips and --probe-clips more (encoded only), 4-fold by clip: r of the held-out predictions. If the encoder's latents carry the
in-group motion, a decoder-only fine-tune can bring it back; if not, the encoder must learn it.
Writes probe.json (and the raw arrays to probe.npz) in $OUT (default .).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _name in ("av", "duckdb"):
    if importlib.util.find_spec(_name) is None:
        sys.modules[_name] = types.ModuleType(_name)

from benchmarks.train_autoencoder import corr, held_out_clips  # noqa: E402
from models.checkpoint import load_taehv  # noqa: E402
from models.config import preset  # noqa: E402
from stages.train.autoencoder import to_unit  # noqa: E402


def in_group(v: np.ndarray) -> np.ndarray:
    """[1 + 4k] -> [k, 4]: each latent group's deviation from its own mean (frame 0 is a group alone)."""
    g = np.asarray(v, np.float64)[1:].reshape(-1, 4)
    return g - g.mean(1, keepdims=True)


def mouth_cells(mask: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Latent cell (row, col) of the mouth's centroid per group: mask [1 + 4k, H, W] -> k cells (8 px)."""
    out = []
    for i in range(k):
        m = mask[1 + 4 * i:5 + 4 * i].sum(0)
        if m.sum() == 0:
            out.append((-1, -1))
            continue
        ys, xs = np.nonzero(m)
        w = m[ys, xs]
        out.append((int((ys * w).sum() / w.sum()) // 8, int((xs * w).sum() / w.sum()) // 8))
    return out


def features(z: np.ndarray, cells: list[tuple[int, int]], r: int = 1) -> np.ndarray:
    """z [1 + k, C, h, w] latents, cells per group -> [k, 2 C (2r+1)^2] (group i's latent i + 1 and latent i)."""
    n, C, h, w = z.shape
    pad = np.pad(z, ((0, 0), (0, 0), (r, r), (r, r)))
    rows = []
    for i, (cy, cx) in enumerate(cells):
        if cy < 0:
            rows.append(np.full(2 * C * (2 * r + 1) ** 2, np.nan))
            continue
        win = pad[:, :, cy:cy + 2 * r + 1, cx:cx + 2 * r + 1]
        rows.append(np.concatenate([win[i + 1].ravel(), win[i].ravel()]))
    return np.stack(rows)


def ridge(Xa, Ya, Xb, lam: float) -> np.ndarray:
    mu, sd = Xa.mean(0), Xa.std(0) + 1e-6
    A, B = (Xa - mu) / sd, (Xb - mu) / sd
    W = np.linalg.solve(A.T @ A + lam * len(A) * np.eye(A.shape[1]), A.T @ (Ya - Ya.mean(0)))
    return B @ W + Ya.mean(0)


def finetune(args, cfg, path: Path, clips: list, latents: list, motion_weight: float, encoder: bool) -> dict:
    """A fine-tune of the codec at `path` on crops around the mouth of --ft-clips training clips (9
    frames), with the stage's loss and `motion_weight`: of the decoder alone (the encoder frozen, the
    latents stay: `latents`, those of `clips`) or with `encoder` of both; then the eval's mouth figures
    on `clips`."""
    from stages.synth import analyze
    from stages.train.autoencoder import AutoencoderSettings, reconstruction_loss, region, world_clip
    from stages.train.data import clip_seed
    codec = load_taehv(path).eval()
    ae = AutoencoderSettings(motion_weight=motion_weight)
    c, data = args.crop, []
    for i in range(args.ft_clips):
        frames, s, w = world_clip(cfg, clip_seed(4242, i), 9, ae)
        ys, xs = np.nonzero(s.masks["mouth"].sum(0))
        y0 = int(np.clip(int(ys.mean() - c / 2) // 8 * 8, 0, frames.shape[1] - c))
        x0 = int(np.clip(int(xs.mean() - c / 2) // 8 * 8, 0, frames.shape[2] - c))
        x = to_unit(torch.from_numpy(frames[:, y0:y0 + c, x0:x0 + c].copy())[None])
        with torch.no_grad():
            z = codec.encode_video(x)
        data.append((x if encoder else z, x, torch.from_numpy(w[:, y0:y0 + c, x0:x0 + c].astype(np.float32))[None],
                     torch.from_numpy(region(s.masks)[:, y0:y0 + c, x0:x0 + c].copy())[None]))
    opt = torch.optim.AdamW((codec if encoder else codec.decoder).parameters(), lr=args.ft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 20))   # 20 warm-up steps
    rng = np.random.default_rng(0)
    t0, log = time.perf_counter(), []
    for step in range(args.finetune):
        pick = rng.choice(len(data), 2, replace=False)
        z, x, w, r = (torch.cat(t) for t in zip(*[data[i] for i in pick]))
        if encoder:
            z = codec.encode_video(x)
        loss, parts = reconstruction_loss(codec.decode_video(z, clamp=False), x, w, ae, r)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log.append({k: float(v) for k, v in parts.items()})
    train_s = time.perf_counter() - t0
    rows = []
    for (frames, s), z in zip(clips, latents):
        with torch.no_grad():
            if encoder:
                z = codec.encode_video(to_unit(torch.from_numpy(frames)[None]))
            y = codec.decode_video(z)
        rt = (y[0] * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        g = s.tracks["mouth"].astype(np.float64)
        ax, ay = analyze(frames, s.identity)["mouth"], analyze(rt, s.identity)["mouth"]
        rows.append({"seed": s.seed, "r_eval": corr(ax, ay) if g.std() > 0.02 else None,
                     "in_group_r_rt_gt": corr(in_group(ay).ravel(), in_group(g).ravel()),
                     "in_group_std_rt": float(np.nanstd(in_group(ay))), "in_group_std_gt": float(in_group(g).std())})
    first, last = log[:10], log[-10:]
    return {"steps": args.finetune, "train_s": train_s, "per_clip": rows,
            "loss_first10": {k: float(np.mean([p[k] for p in first])) for k in first[0]},
            "loss_last10": {k: float(np.mean([p[k] for p in last])) for k in last[0]},
            **{k: float(np.mean([r[k] for r in rows if r[k] is not None] or [np.nan]))
               for k in ("r_eval", "in_group_r_rt_gt", "in_group_std_rt", "in_group_std_gt")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", type=Path, required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--frames", type=int, default=49, help="frames per clip, 1 + 4k")
    ap.add_argument("--probe-clips", type=int, default=24, help="more clips for the encoder probe (encoded only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune", type=int, default=0, help="then this many decoder-only steps on mouth crops, per "
                    "--motion-weight, each scored on the first --ft-eval clips")
    ap.add_argument("--motion-weight", type=float, nargs="+", default=[0.0, 8.0])
    ap.add_argument("--ft-eval", type=int, default=6)
    ap.add_argument("--ft-modes", nargs="+", default=["decoder", "full"], help="decoder: encoder frozen; full: both")
    ap.add_argument("--ft-clips", type=int, default=32, help="training clips of the fine-tune (train split)")
    ap.add_argument("--crop", type=int, default=96, help="px around the mouth the fine-tune trains on")
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(os.environ.get("OUT", "."))
    from stages.synth import analyze
    cfg = preset(args.preset)
    codec = load_taehv(args.codec).eval()
    t0 = time.perf_counter()
    clips = held_out_clips(cfg, args.clips, args.frames, masks=True)
    rows, Z, G, A, Yr, cells, latents = [], [], [], [], [], [], []
    for frames, s in clips:
        x = to_unit(torch.from_numpy(frames)[None])
        with torch.no_grad():
            z = codec.encode_video(x)
            y = codec.decode_video(z)
        rt = (y[0] * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        g = s.tracks["mouth"].astype(np.float64)
        ax, ay = analyze(frames, s.identity)["mouth"], analyze(rt, s.identity)["mouth"]
        gx, gy, gg = in_group(ax), in_group(ay), in_group(g)
        rows.append({"seed": s.seed, "style": s.identity.style, "gt_std": float(g.std()),
                     "analyzer_std": float(np.nanstd(ax)),
                     "r_truth_gt": corr(ax, g), "r_eval": corr(ax, ay), "r_rt_gt": corr(ay, g),
                     "r_eval_world_moves": corr(ax, ay) if g.std() > 0.02 else None,
                     "in_group_std_gt": float(gg.std()), "in_group_std_truth": float(np.nanstd(gx)),
                     "in_group_std_rt": float(np.nanstd(gy)),
                     "in_group_r_truth_gt": corr(gx.ravel(), gg.ravel()),
                     "in_group_r_rt_gt": corr(gy.ravel(), gg.ravel()),
                     "in_group_r_rt_truth": corr(gy.ravel(), gx.ravel())})
        latents.append(z)
        zc = z[0].float().numpy()
        k = (args.frames - 1) // 4
        c = mouth_cells(s.masks["mouth"], k)
        Z.append(features(zc, c)), G.append(gg), A.append(gx), Yr.append(gy), cells.append(c)
        print(json.dumps(rows[-1]), flush=True)
    # the encoder probe: latents around the mouth -> the group's in-group ground truth, across clips
    # (the clips above and --probe-clips more, encoded only), k-fold by clip
    from benchmarks.train_autoencoder import EVAL_SEED
    from stages.train.autoencoder import world_clip
    seen = {s.seed for _, s in clips}
    extra = [seed for seed in range(EVAL_SEED + 10_000, EVAL_SEED + 10_000 + 4 * args.probe_clips)][:args.probe_clips]
    for seed in extra:
        frames, s, _ = world_clip(cfg, seed, args.frames, split="eval")
        if seed in seen or s.tracks["mouth"].std() == 0:
            continue
        with torch.no_grad():
            zc = codec.encode_video(to_unit(torch.from_numpy(frames)[None]))[0].float().numpy()
        k = (args.frames - 1) // 4
        Z.append(features(zc, mouth_cells(s.masks["mouth"], k))), G.append(in_group(s.tracks["mouth"]))
    C = Z[0].shape[1] // 18
    views = {"3x3 cells, this and the previous latent": slice(None), "3x3 cells, this latent": slice(0, 9 * C),
             "centre cell, this latent": slice(4 * C, 5 * C)}
    probe = {}
    folds = 4
    for name, cols in (views.items() if len(Z) >= 2 * folds else ()):
        for lam in (0.01, 0.1, 1.0, 10.0):
            pred, truth = [], []
            for f in range(folds):
                test = [i for i in range(len(Z)) if i % folds == f]
                fit = [i for i in range(len(Z)) if i % folds != f]
                Xa, Ya = np.concatenate([Z[i] for i in fit])[:, cols], np.concatenate([G[i] for i in fit])
                Xb, Yb = np.concatenate([Z[i] for i in test])[:, cols], np.concatenate([G[i] for i in test])
                ok, okb = ~np.isnan(Xa).any(1), ~np.isnan(Xb).any(1)
                pred.append(ridge(Xa[ok], Ya[ok], Xb[okb], lam)), truth.append(Yb[okb])
            p, t = np.concatenate(pred), np.concatenate(truth)
            p = p - p.mean(1, keepdims=True)
            probe[f"{name}, lambda {lam}"] = corr(p.ravel(), t.ravel())
    probe["groups"] = int(sum(len(z) for z in Z))
    def stat(key):
        v = [r[key] for r in rows if r[key] is not None]
        if not v:
            return None
        return {"mean": float(np.mean(v)), "median": float(np.median(v)), "min": float(np.min(v)), "n": len(v)}
    res = {"codec": str(args.codec), "clips": len(clips), "frames": args.frames, "seconds": time.perf_counter() - t0,
           "per_clip": rows, "probe_in_group_r_by_ridge_lambda": probe,
           "summary": {k: stat(k) for k in ("r_truth_gt", "r_eval", "r_eval_world_moves", "r_rt_gt", "in_group_r_truth_gt",
                                             "in_group_r_rt_gt", "in_group_r_rt_truth")}}
    if args.finetune:
        clips, latents = [c for c in clips if c[1].tracks["mouth"].std() > 0.02], [
            z for c, z in zip(clips, latents) if c[1].tracks["mouth"].std() > 0.02]
        res["finetune"] = {f"{mode}, motion {m}": finetune(args, cfg, args.codec, clips[:args.ft_eval], latents, m,
                                                           mode == "full")
                           for mode in args.ft_modes for m in args.motion_weight}
    (out / "probe.json").write_text(json.dumps(res, indent=1))
    np.savez(out / "probe.npz", Z=np.stack(Z), G=np.stack(G), A=np.stack(A), Y=np.stack(Yr))
    print(json.dumps({"summary": res["summary"], "probe": probe, "finetune": res.get("finetune")}, indent=1))


if __name__ == "__main__":
    main()
