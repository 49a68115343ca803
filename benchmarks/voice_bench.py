"""Issue 19's voice bench on a checkpoint of a content model (preset tiny-voice / small-voice): held-out
clips driven by one character voice and told another (stages/eval/bench/voice.py), the model's joint audio
through the shipped vocoder, scored against the driving speech; the driving speech itself as the oracle.
(On a recipe's work folder: `teacher_recipe.py --phase voice`.)

    python benchmarks/voice_bench.py --ckpt run/step-N/ema.safetensors --codec run/codec.safetensors \
        [--cases 16] [--seconds 8] [--steps N] [--guidance G] [--out DIR]

Prints the table last; everything goes to DIR/voice_bench.json ($OUT when --out is not given).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    from stages.eval.bench.voice import run, table
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--codec", required=True, help="the autoencoder the checkpoint was trained with")
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--steps", type=int, help="Euler steps (default: the checkpoint's record, else 30)")
    ap.add_argument("--guidance", type=float, help="guidance scale (default: the checkpoint's record)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = {"date": time.strftime("%Y-%m-%d"), "ckpt": a.ckpt, **run(a.ckpt, a.codec, a.cases, a.seconds, a.steps, a.guidance)}
    res["seconds_taken"] = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "voice_bench.json").write_text(json.dumps(res, indent=1, default=float))
    print(table(res["summary"], res["oracle"]))
    return res


if __name__ == "__main__":
    main()
