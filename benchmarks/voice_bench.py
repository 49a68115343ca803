"""Issue 19's voice bench on a checkpoint of a content model (preset tiny-voice / small-voice): held-out
clips driven by one character voice and told another (stages/eval/bench/voice.py), the model's joint audio
through the shipped vocoder, scored against the driving speech; the driving speech itself as the oracle.
(On a recipe's work folder: `teacher_recipe.py --phase voice`.)

    python benchmarks/voice_bench.py --ckpt run/step-N/ema.safetensors --codec run/codec.safetensors \
        [--cases 16] [--seconds 8] [--steps N] [--guidance G] [--out DIR]
    python benchmarks/voice_bench.py --ckpt ... --codec ... --real ../shared/media/talking/*.mp4 [--seconds S]
    python benchmarks/voice_bench.py --score DIR/voice_waves.npz [--out DIR]

The first samples (on the GPU when there is one), writes DIR/voice_waves.npz and scores it when this machine
has the scorers (resemblyzer, pocketsphinx: the GPU image does not); the second scores waves sampled
elsewhere (the cases' driving speech is rendered again: the world is a function of its seeds). Prints the
table last; everything goes to DIR/voice_bench.json ($OUT when --out is not given). `--real`: real recordings
re-voiced instead (the streaming front end hears them; each said in a told voice; `--seconds`: their first
seconds, default all).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    from stages.eval.bench.voice import generate, load_waves, save_waves, scored, scorers_missing, table
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt")
    ap.add_argument("--codec", help="the autoencoder the checkpoint was trained with")
    ap.add_argument("--score", type=Path, help="score the waves of this voice_waves.npz instead of sampling")
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--seconds", type=float, help="seconds per case (default 8; --real: the whole recording)")
    ap.add_argument("--real", type=Path, nargs="+", help="real recordings to re-voice instead of the world's cases")
    ap.add_argument("--steps", type=int, help="Euler steps (default: the checkpoint's record, else 30)")
    ap.add_argument("--guidance", type=float, help="guidance scale (default: the checkpoint's record)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    a = ap.parse_args(argv)
    if bool(a.score) == bool(a.ckpt and a.codec):
        ap.error("give --ckpt and --codec (sample, then score), or --score FILE (score only)")
    t0 = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.score:
        res = load_waves(a.score)
    else:
        res = {"date": time.strftime("%Y-%m-%d"), "ckpt": a.ckpt,
               **generate(a.ckpt, a.codec, a.cases, a.seconds or (None if a.real else 8.0), a.steps, a.guidance,
                           real=a.real)}
        save_waves(a.out / "voice_waves.npz", res)
    missing = scorers_missing()
    if missing:
        print(f"sampled {res['cases']} cases into {a.out / 'voice_waves.npz'}; this machine lacks {missing}: score "
              f"them where they are installed (python benchmarks/voice_bench.py --score voice_waves.npz)")
        return {k: v for k, v in res.items() if k not in ("waves", "mouths")}
    res = scored(res)
    res["seconds_taken"] = time.perf_counter() - t0
    (a.out / "voice_bench.json").write_text(json.dumps(res, indent=1, default=float))
    print(table(res["summary"], res["oracle"]))
    return res


if __name__ == "__main__":
    main()
