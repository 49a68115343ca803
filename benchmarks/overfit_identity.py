"""Issue 15's "overfit one identity" check on the CPU: can a DiT learn to move one character's mouth with
speech it has never heard, when everything else about the character is fixed?

    python benchmarks/overfit_identity.py --steps 1500 --eval-every 500        # writes $OUT/overfit.json (default .)

One world character (`--identity` seed, `--style`) in one scene; `--clips` training clips of it speaking the
world's training voices and texts (stages.synth split "train"), `--held` clips speaking held-out voices and texts
(split "eval"), all without instructions (blinks and head motion stay the world's). The model is the `tiny`
preset's DiT at `--size` pixels, joint audio off, with `--dim` / `--layers`, coding frames with the committed
world codec (models/world_codec.safetensors, `small`'s autoencoder widths: it keeps the mouth at 128 px, the
tiny autoencoder has not been trained). Training is stage 1's objective (stages/train/objectives.py
`bidirectional_loss`: the recipe's shift, loss weighting, mouth-region weight and condition dropout) with AdamW,
warm-up and cosine decay. Every `--eval-every` steps each held-out clip is sampled whole
(stages/train/sample.py `sample_bidirectional`, unguided and at the teachers' guidance), decoded, and read by
the world analyzer; lip sync is the synth bench's per-clip Pearson r at zero lag between the mouth measured
from the pixels and the clip's ground-truth mouth track (stages/eval/bench/synthscore.py `pearson`), its
control the same model driven by the next held-out clip's speech and scored against this clip's track, the
ceiling the ground truth through the codec. The issue's bar: mean r >= 0.7.
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

CODEC = ROOT / "models" / "world_codec.safetensors"


def model_config(size: int, latent_frames: int, dim: int, layers: int):
    tiny, small = preset("tiny"), preset("small")
    dit = dataclasses.replace(tiny.dit, audio_latent_dim=0, audio_latent_tokens=0, dim=dim, ffn_dim=2 * dim,
                              num_layers=layers)
    return tiny.replace(name="overfit", height=size, width=size, taehv=small.taehv, latent_frames=latent_frames, dit=dit)


class Character:
    """One identity in one scene; clip i speaks split's voices and texts, drawn from (i, split)."""

    def __init__(self, cfg, seed: int, style: str, codec, text: torch.Tensor):
        from stages.synth import State, render
        from stages.synth.world import random_identity, random_scene
        self.cfg, self.codec, self.text = cfg, codec, text
        self.identity = random_identity(np.random.default_rng([seed, 0]), style)
        self.scene = random_scene(np.random.default_rng([seed, 1]), self.identity)
        self.ref = render(self.identity, State(), cfg.width, cfg.height, self.scene)

    def clip(self, i: int, split: str) -> tuple[dict, np.ndarray]:
        """(the model's inputs, the ground-truth mouth track [T])."""
        from stages.synth.dataset import clip_speech, render_sample
        cfg = self.cfg
        T = cfg.video_frames
        rng = np.random.default_rng([i, 0 if split == "train" else 1])
        speech = clip_speech(rng, T / cfg.audio.fps, split, None)
        s = render_sample(i, self.identity, self.scene, speech, [], T, rng, cfg.width, cfg.height, cfg.audio.fps,
                          masks=True)
        c = {"frames": s.frames, "audio": s.audio, "ref": self.ref, "text": NEUTRAL_TEXT,
             "mouth": latent_regions(s.masks["mouth"], cfg.audio.video_frames_per_latent, 8)}
        x = encode_clip(cfg, self.codec, c)
        del x["instruction"]                  # the character's one text, already encoded
        x["text"] = self.text[None].expand(cfg.latent_frames, -1, -1)
        return x, s.tracks["mouth"]


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
    mean = lambda key: float(np.mean([r[key] for r in rows if r[key] is not None]))  # noqa: E731
    return {"mean_r": mean("r"), "mean_control_r": mean("control"), "clips": rows}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--latent-frames", type=int, default=9, help="a clip's latent frames (1 + 4 (F - 1) video frames)")
    ap.add_argument("--clips", type=int, default=32, help="training clips of the character")
    ap.add_argument("--held", type=int, default=6, help="held-out clips (held-out voices and texts)")
    ap.add_argument("--identity", type=int, default=0, help="the character's seed")
    ap.add_argument("--style", default="human")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu", help="where the DiT trains and samples and the codec decodes")
    args = ap.parse_args(argv)
    if not CODEC.is_file():
        raise SystemExit(f"the world codec is missing: {CODEC}")
    torch.set_num_threads(args.threads)
    out_dir = Path(os.environ.get("OUT", "."))
    cfg = model_config(args.size, args.latent_frames, args.dim, args.layers)
    dev = torch.device(args.device)
    codec = load_taehv(CODEC, "cpu")
    text = fit_text(text_encoder("minilm", max_len=cfg.dit.text_len)([NEUTRAL_TEXT])[0], cfg.dit.text_len)

    t0 = time.perf_counter()
    who = Character(cfg, args.identity, args.style, codec, text)
    train = [who.clip(i, "train")[0] for i in range(args.clips)]
    held = [who.clip(i, "eval") for i in range(args.held)]
    codec = codec.to(dev)
    held = [({k: v.to(dev) for k, v in x.items()}, truth) for x, truth in held]
    data_s = time.perf_counter() - t0
    ceiling = [pearson(mouth_of(latents_to_frames(codec, x["video"][None])[0], who.identity)[0], truth)
               for x, truth in held]

    torch.manual_seed(args.identity)
    model = DiT(cfg.dit).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    st = ObjectiveSettings()
    keys = ("video", "ref", "text", "audio", "mouth")
    stacked = {k: torch.stack([x[k] for x in train]).to(dev) for k in keys}
    history, evals, eval_s = [], [], 0.0
    t1 = time.perf_counter()
    for step in range(1, args.steps + 1):
        g = step_generator(args.identity, step)
        idx = torch.randint(len(train), (args.batch,), generator=g).to(dev)
        warm = min(1.0, step / 50)
        for group in opt.param_groups:
            group["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps))
        loss, _ = bidirectional_loss(model, {k: v[idx] for k, v in stacked.items()}, st, Draw(g, 0, args.batch, args.batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(loss.detach())
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            te = time.perf_counter()
            row = {"step": step, "train_s": te - t1 - eval_s,
                   "loss": float(torch.stack(history[-args.eval_every:]).mean())}
            for name, gsc in (("unguided", 1.0), ("guided", TEACHER_GUIDANCE)):
                row[name] = lip_sync(model, cfg, codec, held, who.identity, gsc, args.sample_steps, st.shift)
            model.train()
            eval_s += time.perf_counter() - te
            evals.append(row)
            print(f"step {step}: loss {row['loss']:.3f}, r unguided {row['unguided']['mean_r']:.3f} "
                  f"(control {row['unguided']['mean_control_r']:.3f}), guided {row['guided']['mean_r']:.3f} "
                  f"(control {row['guided']['mean_control_r']:.3f})", flush=True)
    res = {"args": vars(args), "params": sum(p.numel() for p in model.parameters()), "data_s": data_s,
           "step_s": (time.perf_counter() - t1 - eval_s) / args.steps, "eval_s": eval_s, "codec_ceiling": ceiling,
           "codec_ceiling_mean": float(np.mean([c for c in ceiling if c is not None])), "evals": evals}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "overfit.json").write_text(json.dumps(res, indent=1))
    print(f"\n{res['params'] / 1e6:.2f} M parameters, {args.clips} clips in {data_s:.0f} s, "
          f"{res['step_s']:.3f} s a step; codec ceiling r {res['codec_ceiling_mean']:.3f}")
    print("| step | loss | r unguided (control) | r guided (control) |\n|---|---|---|---|")
    for e in evals:
        print(f"| {e['step']} | {e['loss']:.3f} | {e['unguided']['mean_r']:.3f} ({e['unguided']['mean_control_r']:.3f}) "
              f"| {e['guided']['mean_r']:.3f} ({e['guided']['mean_control_r']:.3f}) |")
    return res


if __name__ == "__main__":
    main()
