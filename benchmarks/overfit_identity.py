"""Issue 15's "overfit one identity" check on the CPU: can a DiT learn to move one character's mouth with
speech it has never heard, when everything else about the character is fixed?

    python benchmarks/overfit_identity.py --steps 1500 --eval-every 500        # writes $OUT/overfit.json (default .)
    python benchmarks/overfit_identity.py --device cuda --workers 15 --clips 512 --steps 6000 \
        --variant dim=64,layers=2 --variant dim=128,layers=4 --variant size=256,dim=128,layers=4   # a GPU sweep

One world character (`--identity` seed, `--style`) in one scene; `--clips` training clips of it speaking the
world's training voices and texts (stages.synth split "train"), `--held` clips speaking held-out voices and texts
(split "eval"), all without instructions (blinks and head motion stay the world's). The model is the `tiny`
preset's DiT at `--size` pixels, joint audio off, with `--dim` / `--layers`, coding frames with the committed
world codec (models/starter/codec.safetensors, `small`'s autoencoder widths: it keeps the mouth at 128 px, the
tiny autoencoder has not been trained). Training is stage 1's objective (stages/train/objectives.py
`bidirectional_loss`: the recipe's shift, loss weighting, mouth-region weight and condition dropout) with AdamW,
warm-up and cosine decay. Every `--eval-every` steps each held-out clip is sampled whole
(stages/train/sample.py `sample_bidirectional`, at each `--guidance` scale: unguided and the teachers' by
default), decoded, and read by the world analyzer; lip sync is the synth bench's per-clip Pearson r at zero lag
between the mouth measured from the pixels and the clip's ground-truth mouth track
(stages/eval/bench/synthscore.py `pearson`), its control the same model driven by the next held-out clip's
speech and scored against this clip's track (reported as mean |r|, as the issue's control is, beside the chance
level: mean |r| between the ground-truth tracks of mismatched clips, high for clips this short), the ceiling the
ground truth through the codec; `--seen N` scores N training clips the same way (memorised speech: is the gap to
the ceiling generalisation or capacity?). The issue's bar: mean r >= 0.7 (met on the CPU with 1024 training
clips, benchmarks/RESULTS.md session 54).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoint import load_taehv  # noqa: E402
from models.config import NEUTRAL_TEXT, preset  # noqa: E402
from models.dit import DiT  # noqa: E402
from models.encoders import text_encoder  # noqa: E402
from models.taehv import latents_to_frames  # noqa: E402
from stages.eval.bench.synthscore import pearson  # noqa: E402
from stages.train.data import encode_clip, fit_text, latent_regions  # noqa: E402
from stages.train.machinery import step_generator  # noqa: E402
from stages.train.objectives import Draw, ObjectiveSettings, bidirectional_loss  # noqa: E402
from stages.train.sample import TEACHER_GUIDANCE, sample_bidirectional  # noqa: E402

from models.starter import CODEC  # noqa: E402  (the world codec, which the starter model was trained with)


def model_config(size: int, latent_frames: int, dim: int, layers: int):
    tiny, small = preset("tiny"), preset("small")
    dit = dataclasses.replace(tiny.dit, audio_latent_dim=0, audio_latent_tokens=0, dim=dim, ffn_dim=2 * dim,
                              num_layers=layers)
    return tiny.replace(name="overfit", height=size, width=size, taehv=small.taehv, latent_frames=latent_frames, dit=dit)


def character(cfg, seed: int, style: str):
    """(identity, scene, reference frame) of the character: one identity in one scene."""
    from stages.synth import State, render
    from stages.synth.world import random_identity, random_scene
    identity = random_identity(np.random.default_rng([seed, 0]), style)
    scene = random_scene(np.random.default_rng([seed, 1]), identity)
    return identity, scene, render(identity, State(), cfg.width, cfg.height, scene)


def render_clip(cfg, seed: int, style: str, i: int, split: str) -> dict:
    """Clip i of `split` (its voices and texts), drawn from (i, split): frames, audio, the reference, the
    mouth's latent-region mask and the ground-truth mouth track [T]. Numpy only (a worker process's job)."""
    from stages.synth.dataset import clip_speech, render_sample
    identity, scene, ref = character(cfg, seed, style)
    T = cfg.video_frames
    rng = np.random.default_rng([i, 0 if split == "train" else 1])
    speech = clip_speech(rng, T / cfg.audio.fps, split, None)
    s = render_sample(i, identity, scene, speech, [], T, rng, cfg.width, cfg.height, cfg.audio.fps, masks=True)
    return {"frames": s.frames, "audio": s.audio, "ref": ref, "text": NEUTRAL_TEXT,
            "mouth": latent_regions(s.masks["mouth"], cfg.audio.video_frames_per_latent, 8), "truth": s.tracks["mouth"]}


def encoded(cfg, codec, c: dict, text: torch.Tensor, dev) -> tuple[dict, np.ndarray]:
    """(the model's inputs on `dev`, the ground-truth mouth track)."""
    x = encode_clip(cfg, codec, c)
    del x["instruction"]                      # the character's one text, already encoded
    x["text"] = text[None].expand(cfg.latent_frames, -1, -1)
    return {k: v.to(dev) for k, v in x.items()}, c["truth"]


def clips(cfg, seed: int, style: str, n: int, split: str, workers: int) -> list[dict]:
    jobs = [(cfg, seed, style, i, split) for i in range(n)]
    if workers <= 1:
        return [render_clip(*j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:
        return list(pool.map(render_clip, *zip(*jobs)))


def mouth_of(frames: np.ndarray, identity) -> tuple[np.ndarray, float]:
    from stages.synth import analyze
    m = analyze(frames, identity)
    return np.where(np.isfinite(m["mouth"]), m["mouth"], 0.0), float(np.mean(m["found"]))


def lip_sync(model, cfg, codec, held, identity, guidance: float, steps: int, shift: float) -> dict:
    """Per held-out clip: r driven by its own speech, r driven by the next clip's (control), face found."""
    rows = []
    for k, (x, truth) in enumerate(held):
        out = {}
        for name, speech in (("r", x["audio"]), ("control", held[(k + 1) % len(held)][0]["audio"])):
            z, _ = sample_bidirectional(model, cfg, x["ref"][None], x["text"][None], speech[None], steps=steps,
                                        shift=shift, seed=k, guidance=guidance)
            mouth, found = mouth_of(latents_to_frames(codec, z)[0], identity)
            out[name] = pearson(mouth, truth)
            out[f"{name}_face_found"] = found
        rows.append(out)
    vals = lambda key: [r[key] for r in rows if r[key] is not None]  # noqa: E731
    return {"mean_r": float(np.mean(vals("r"))), "mean_control_r": float(np.mean(vals("control"))),
            "mean_abs_control_r": float(np.mean(np.abs(vals("control")))), "clips": rows}


def chance_abs_r(truths: list[np.ndarray]) -> float:
    """The control's chance level: mean |r| between each ground-truth mouth track and the next one's (the
    speech that drives the control), over the pairs that have an r (a track that never moves has none)."""
    rs = [pearson(truths[(k + 1) % len(truths)], t) for k, t in enumerate(truths)]
    return float(np.mean([abs(r) for r in rs if r is not None]))


VARIED = {"size": int, "dim": int, "layers": int, "steps": int, "batch": int, "lr": float, "clips": int,
          "mouth_weight": float}


def guidance_key(scale: float) -> str:
    """An eval row's key for a guidance scale: "unguided" (1), "guided" (the teachers'), else "guidance 3"."""
    return "unguided" if scale == 1.0 else "guided" if scale == TEACHER_GUIDANCE else f"guidance {scale:g}"


def scales(text: str) -> list[float]:
    """"1,2,4" -> [1.0, 2.0, 4.0]: the guidance scales every eval samples with."""
    try:
        out = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--guidance: comma-separated numbers, not {text!r}") from None
    if not out or any(not g >= 1.0 for g in out):
        raise argparse.ArgumentTypeError(f"--guidance: scales >= 1, not {text!r}")
    return out


def variant(text: str) -> dict:
    """"dim=128,layers=4,lr=5e-4" -> {"dim": 128, ...}: one run's settings over the flags'."""
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in VARIED:
            raise argparse.ArgumentTypeError(f"--variant: {key!r} is not one of {', '.join(VARIED)}")
        out[key] = VARIED[key](value)
    return out


def train_and_score(a, data, codec, dev) -> dict:
    """One model of settings `a` trained on data["train"], scored on data["held"] every a.eval_every steps."""
    cfg, who, train, held = data["cfg"], data["identity"], data["train"][:a.clips], data["held"]
    cfg = cfg.replace(dit=dataclasses.replace(cfg.dit, dim=a.dim, ffn_dim=2 * a.dim, num_layers=a.layers))
    torch.manual_seed(a.identity)
    model = DiT(cfg.dit).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    st = ObjectiveSettings(mouth_weight=a.mouth_weight)
    keys = ("video", "ref", "text", "audio", "mouth")
    stacked = {k: torch.stack([x[k] for x in train]) for k in keys}
    history, evals, eval_s = [], [], 0.0
    t1 = time.perf_counter()
    for step in range(1, a.steps + 1):
        g = step_generator(a.identity, step)
        idx = torch.randint(len(train), (a.batch,), generator=g).to(dev)
        warm = min(1.0, step / 50)
        for group in opt.param_groups:
            group["lr"] = a.lr * warm * 0.5 * (1 + math.cos(math.pi * (step - 1) / a.steps))
        loss, _ = bidirectional_loss(model, {k: v[idx] for k, v in stacked.items()}, st, Draw(g, 0, a.batch, a.batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(loss.detach())
        if step % a.eval_every == 0 or step == a.steps:
            model.eval()
            te = time.perf_counter()
            row = {"step": step, "train_s": te - t1 - eval_s, "loss": float(torch.stack(history[-a.eval_every:]).mean())}
            for gsc in a.guidance:
                row[guidance_key(gsc)] = lip_sync(model, cfg, codec, held, who, gsc, a.sample_steps, st.shift)
                if data["seen"]:
                    row.setdefault("seen", {})[guidance_key(gsc)] = lip_sync(model, cfg, codec, data["seen"], who, gsc,
                                                                             a.sample_steps, st.shift)
            model.train()
            eval_s += time.perf_counter() - te
            evals.append(row)
            print(f"step {step}: loss {row['loss']:.3f}, " + ", ".join(
                f"r {guidance_key(g)} {row[guidance_key(g)]['mean_r']:.3f} (control |r| "
                f"{row[guidance_key(g)]['mean_abs_control_r']:.3f})" for g in a.guidance)
                + ("; on training speech: " + ", ".join(f"r {k} {v['mean_r']:.3f}" for k, v in row["seen"].items())
                   if "seen" in row else ""), flush=True)
    return {"settings": {k: getattr(a, k) for k in VARIED}, "params": sum(p.numel() for p in model.parameters()),
            "step_s": (time.perf_counter() - t1 - eval_s) / a.steps, "eval_s": eval_s, "evals": evals}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--latent-frames", type=int, default=9, help="a clip's latent frames (1 + 4 (F - 1) video frames)")
    ap.add_argument("--clips", type=int, default=32, help="training clips of the character")
    ap.add_argument("--held", type=int, default=24,
                    help="held-out clips (held-out voices and texts; the mean of six moves by 0.03-0.04 between evaluations)")
    ap.add_argument("--seen", type=int, default=0,
                    help="also score the first N training clips (speech it trained on: memorised or not learnt?)")
    ap.add_argument("--identity", type=int, default=0, help="the character's seed")
    ap.add_argument("--style", default="human")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--guidance", type=scales, default=[1.0, TEACHER_GUIDANCE],
                    help="classifier-free guidance scales every eval samples with (1: unguided; on the speech, the text "
                         "being the character's one)")
    ap.add_argument("--mouth-weight", type=float, default=ObjectiveSettings.mouth_weight,
                    help="the loss weight of the mouth's latent region (stage 1's default)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workers", type=int, default=1, help="processes rendering the clips")
    ap.add_argument("--device", default="cpu", help="where the DiT trains and samples and the codec codes")
    ap.add_argument("--variant", type=variant, action="append", default=[],
                    help=f"one more run, the flags with these changed (of {', '.join(VARIED)}): dim=128,layers=4; "
                         "repeatable; runs of one size share their clips")
    args = ap.parse_args(argv)
    if not CODEC.is_file():
        raise SystemExit(f"the world codec is missing: {CODEC}")
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    out_dir = Path(os.environ.get("OUT", "."))
    dev = torch.device(args.device)
    codec = load_taehv(CODEC, dev)
    runs_args = [argparse.Namespace(**{**vars(args), **v}) for v in (args.variant or [{}])]
    data, runs = {}, []
    for a in runs_args:
        if a.size not in data:
            t0 = time.perf_counter()
            cfg = model_config(a.size, a.latent_frames, a.dim, a.layers)
            text = fit_text(text_encoder("minilm", max_len=cfg.dit.text_len)([NEUTRAL_TEXT])[0], cfg.dit.text_len)
            n = max(r.clips for r in runs_args if r.size == a.size)
            who = character(cfg, a.identity, a.style)[0]
            with torch.no_grad():
                seen = [encoded(cfg, codec, c, text, dev) for c in clips(cfg, a.identity, a.style, n, "train", a.workers)]
                train = [x for x, _ in seen]
                held = [encoded(cfg, codec, c, text, dev) for c in clips(cfg, a.identity, a.style, a.held, "eval", a.workers)]
                coded = [mouth_of(latents_to_frames(codec, x["video"][None])[0], who)[0] for x, _ in held]
            other = lambda k: held[(k + 1) % len(held)][1]  # noqa: E731  (the next clip's track: the controls')
            ceiling = [pearson(m, truth) for m, (_, truth) in zip(coded, held)]
            data[a.size] = {"cfg": cfg, "identity": who, "train": train, "held": held, "seen": seen[:args.seen],
                            "chance_abs_r": chance_abs_r([truth for _, truth in held]),
                            "codec_ceiling_control": [pearson(m, other(k)) for k, m in enumerate(coded)],
                            "data_s": time.perf_counter() - t0, "codec_ceiling": ceiling,
                            "codec_ceiling_mean": float(np.mean([c for c in ceiling if c is not None]))}
            print(f"{a.size} px: {n} + {a.held} clips in {data[a.size]['data_s']:.0f} s; codec ceiling r "
                  f"{data[a.size]['codec_ceiling_mean']:.3f}; |r| of mismatched ground-truth tracks "
                  f"{data[a.size]['chance_abs_r']:.3f} (the control's chance level)", flush=True)
        d = data[a.size]
        res = train_and_score(a, d, codec, dev)
        res.update({k: d[k] for k in ("data_s", "codec_ceiling", "codec_ceiling_mean", "codec_ceiling_control", "chance_abs_r")})
        runs.append(res)
        out = {"args": {k: v for k, v in vars(args).items() if k != "variant"}, "runs": runs}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "overfit.json").write_text(json.dumps(out, indent=1))     # after each run: a cut call keeps them
    keys = [guidance_key(g) for g in args.guidance]
    print("\n| size | dim x layers | mouth weight | params (M) | clips | step | s a step | loss | "
          + " | ".join(f"r {k} (control |r|)" for k in keys) + " | codec ceiling |\n|" + "---|" * (8 + len(keys) + 1))
    for r in runs:
        s = r["settings"]
        for e in r["evals"]:
            print(f"| {s['size']} | {s['dim']} x {s['layers']} | {s['mouth_weight']:g} | {r['params'] / 1e6:.2f} "
                  f"| {s['clips']} | {e['step']} | {r['step_s']:.3f} | {e['loss']:.3f} | "
                  + " | ".join(f"{e[k]['mean_r']:.3f} ({e[k]['mean_abs_control_r']:.3f})" for k in keys)
                  + f" | {r['codec_ceiling_mean']:.3f} |")
    return out


if __name__ == "__main__":
    main()
