"""Issue 19's voice bench on a checkpoint of a content model (preset tiny-voice, or one like it): held-out
clips driven by one character voice and told another (stages/eval/bench/voice.py), the model's joint audio
through the shipped vocoder, scored against the driving speech; the driving speech itself as the oracle.

    python benchmarks/voice_bench.py --ckpt run/step-N/ema.safetensors --codec run/codec.safetensors \
        [--cases 16] [--seconds 8] [--steps 30] [--guidance 3] [--out DIR]

Prints a short table last; every row goes to DIR/voice_bench.json ($OUT when --out is not given).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def summary(rows: list[dict]) -> dict:
    scored = [r for r in rows if "skipped" not in r]
    return {"cases": len(rows), "scored": len(scored),
            "envelope_r": mean(r["envelope_r"] for r in scored),
            "envelope_r_control": mean(r["envelope_r_control"] for r in scored),
            "wer_generated": mean(r["wer_generated"] for r in scored),
            "wer_driving": mean(r["wer_driving"] for r in scored),
            "voice_similarity_told": mean(r["voice_similarity"] for r in scored),
            "voice_similarity_best_other": mean(r["voice_similarity_other"] for r in scored),
            "nearest_is_told": mean(float(r["voice_nearest"] == r["told"]) for r in scored if r.get("voice_nearest")),
            "nearest_is_driving": mean(float(r["voice_nearest"] == r["driving"]) for r in scored if r.get("voice_nearest"))}


def main(argv: list[str] | None = None) -> dict:
    from models.checkpoint import load_dit, load_taehv
    from models.encoders import text_encoder
    from models.vocoder import load as load_vocoder
    from stages.eval.bench.voice import oracle_row, voice_case, voice_rows
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--codec", required=True, help="the autoencoder the checkpoint was trained with")
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_dit(a.ckpt, device=dev)
    model.eval()
    codec, vocoder = load_taehv(a.codec, dev), load_vocoder()
    encode = text_encoder("minilm", max_len=cfg.dit.text_len)
    t0 = time.perf_counter()
    rows = voice_rows(model, cfg, codec, vocoder, encode, a.cases, a.seconds, a.steps, a.guidance)
    oracle = [oracle_row(voice_case(i, cfg, a.seconds)) for i in range(a.cases)]
    res = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
           "ckpt": a.ckpt, "preset": cfg.name, "cases": a.cases, "seconds": a.seconds, "steps": a.steps,
           "guidance": a.guidance, "seconds_taken": time.perf_counter() - t0,
           "model": summary(rows), "oracle": summary(oracle), "rows": rows, "oracle_rows": oracle}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "voice_bench.json").write_text(json.dumps(res, indent=1, default=float))
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print("| track | envelope r (control) | WER generated / driving | similarity told / best other | nearest = told / driving |")
    print("|---|---|---|---|---|")
    for name in ("model", "oracle"):
        s = res[name]
        print(f"| {name} | {f(s['envelope_r'])} ({f(s['envelope_r_control'])}) | {f(s['wer_generated'])} / "
              f"{f(s['wer_driving'])} | {f(s['voice_similarity_told'])} / {f(s['voice_similarity_best_other'])} | "
              f"{f(s['nearest_is_told'])} / {f(s['nearest_is_driving'])} |")
    return res


if __name__ == "__main__":
    main()
