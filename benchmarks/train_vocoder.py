"""The recipe of the shipped vocoder weights (models/vocoder.safetensors): train models/vocoder.py on
espeak-ng speech on CPU (stages/train/vocoder.py) and write bf16 safetensors.

    python benchmarks/train_vocoder.py [--steps 6000] [--out models/vocoder.safetensors]

Took 2026-12-04 on the dev VM (2 shared cores): see benchmarks/RESULTS.md (session 41).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from models.vocoder import VOCODER_FILE, save
from stages.train.vocoder import VocoderRecipe, recipe_meta, train_vocoder


def main() -> None:
    d = VocoderRecipe()
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--utterances", type=int, default=d.utterances)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(VOCODER_FILE))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    r = VocoderRecipe(steps=args.steps, utterances=args.utterances, seed=args.seed)
    t0 = time.time()
    v = train_vocoder(r, log=lambda s: print(s, file=sys.stderr, flush=True))
    save(v, args.out, recipe_meta(r))
    n = sum(p.numel() for p in v.parameters())
    print(f"{args.out}: {n} parameters, trained in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
