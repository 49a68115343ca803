"""Experiment (issue 19): can a phone recogniser of our own, trained on espeak-ng speech with its
phoneme truth, replace pocketsphinx as the content front end? pocketsphinx's allphone phones told the 8
character voices apart at 0.79 (chance 0.125; benchmarks/voice_foundation.py): its errors depend on the
voice. Nothing here is shipped; the numbers are in benchmarks/RESULTS.md (2026-12-04, session 41).

    python benchmarks/phone_recogniser_probe.py [--utterances 3000] [--steps 3000] [--media ../shared/media]

Recogniser: per-utterance mean/variance-normalised log-mel [T, 80] -> 5 non-causal conv layers (192
wide, dilations 1 2 4 1, +-15 steps of context) -> stages.sense.content.PHONES per step, cross-entropy
on `augment`ed TTS of the English "train" voices. Scored: step agreement with the truth on held-out
en-us voices and texts; the speaker probe on its phones (character voices, and six "eval" voices it
never heard); on real speech, agreement with pocketsphinx's word-aligned phones on their speech steps
(the allphone front end's agreement alongside) and the share of steps called speech.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.sense import content as C
from stages.synth import speech as S
from stages.synth import voice as V

SEGMENT = 160
EVAL_VOICES = ["en-us+m3", "en-us+f4", "en-us+belinda", "en-us+john", "en-us+travis", "en-us+klatt3"]


def normalised_mel(audio: np.ndarray) -> np.ndarray:
    m = V.log_mel(audio)[:C.steps_for(len(audio))]
    return ((m - m.mean(0)) / (m.std(0) + 1e-3)).astype(np.float32)


def tts_set(n: int, pool: list[str], texts: list[str], rng: np.random.Generator, augment: bool) -> list:
    out = []
    for _ in range(n):
        u = S.tts(texts[rng.integers(len(texts))], pool[rng.integers(len(pool))], int(rng.integers(120, 231)),
                  int(rng.integers(20, 81)), int(rng.integers(20, 91)))
        audio = S.augment(rng, u.audio, [u.span]) if augment else u.audio
        T = C.steps_for(len(audio))
        out.append((normalised_mel(audio), C.phone_steps(C.from_espeak(u.phonemes), T)))
    return out


class Recogniser(nn.Module):
    def __init__(self, dim: int = 192):
        super().__init__()
        self.inp = nn.Conv1d(80, dim, 5, padding=2)
        self.blocks = nn.ModuleList(nn.Conv1d(dim, dim, 5, padding=2 * d, dilation=d) for d in (1, 2, 4, 1))
        self.norms = nn.ModuleList(nn.GroupNorm(1, dim) for _ in range(4))
        self.out = nn.Conv1d(dim, len(C.PHONES), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:        # x: [B, 80, T] -> [B, classes, T]
        h = F.gelu(self.inp(x))
        for b, n in zip(self.blocks, self.norms):
            h = h + F.gelu(b(n(h)))
        return self.out(h)

    @torch.no_grad()
    def phones(self, mel: np.ndarray) -> np.ndarray:
        return self(torch.as_tensor(mel).T[None])[0].argmax(0).numpy()


def train(data: list, steps: int, rng: np.random.Generator) -> Recogniser:
    torch.manual_seed(0)
    net = Recogniser()
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    long = [d for d in data if len(d[0]) >= SEGMENT]
    for step in range(steps):
        xs, ys = [], []
        for _ in range(16):
            m, p = long[rng.integers(len(long))]
            j = rng.integers(0, len(m) - SEGMENT + 1)
            xs.append(m[j:j + SEGMENT])
            ys.append(p[j:j + SEGMENT])
        loss = F.cross_entropy(net(torch.as_tensor(np.stack(xs)).transpose(1, 2)), torch.as_tensor(np.stack(ys)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def probe(net: Recogniser, voices: list[str], texts: list[str]) -> tuple[float, float]:
    """(speaker probe accuracy on the recogniser's phones, their agreement with the truth)."""
    rng = np.random.default_rng(3)
    rows = []
    for t in texts:
        for v in voices:
            espeak, pitch = V.VOICES.get(v, (v, int(rng.integers(20, 81))))
            u = S.tts(t, espeak, int(rng.integers(120, 231)), pitch, int(rng.integers(20, 91)))
            truth = C.phone_steps(C.from_espeak(u.phonemes), C.steps_for(len(u.audio)))
            rows.append((voices.index(v), texts.index(t), net.phones(normalised_mel(u.audio)), truth))
    y, g = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    X = np.stack([V.pooled(np.eye(len(C.PHONES))[r[2]]) for r in rows])
    return V.probe_folds(X, y, g), float(np.mean([np.mean(r[2] == r[3]) for r in rows]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--utterances", type=int, default=3000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--media", default="../shared/media")
    args = p.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    t0 = time.time()
    pool = [v for v in S.voices("train") if v.split("+")[0] in S.ACCENTS]
    net = train(tts_set(args.utterances, pool, S.texts("train"), rng, augment=True), args.steps, rng)
    print(f"### Own phone recogniser (experiment): {args.utterances} augmented TTS utterances, {args.steps} steps, "
          f"{sum(x.numel() for x in net.parameters())} parameters, {time.time() - t0:.0f} s\n")
    held = tts_set(48, [v for v in S.voices("eval") if v.startswith("en-us+")], S.texts("eval"), np.random.default_rng(7), False)
    print(f"- held-out en-us TTS, clean: phone agreement {np.mean([np.mean(net.phones(m) == t) for m, t in held]):.3f}")
    for name, voices in (("character voices", sorted(V.VOICES)), ("unheard eval voices", EVAL_VOICES)):
        acc, agree = probe(net, voices, S.texts("eval")[:40])
        print(f"- speaker probe on its phones, {name}: {acc:.3f} (chance {1 / len(voices):.3f}); agreement {agree:.3f}")
    media = Path(args.media)
    if media.is_dir():
        from stages.sense.media import load_audio
        print("\n| real recording | own = pocketsphinx words | allphone = words | own / words: share called speech |")
        print("|---|---|---|---|")
        for f in sorted((media / "speech").glob("*.wav")) + sorted((media / "talking").glob("*.mp4")):
            audio = load_audio(f, C.SR)
            T = C.steps_for(len(audio))
            own = net.phones(normalised_mel(audio))
            words = C.phone_steps(C.recognise(audio, "words"), T)
            ap = C.phone_steps(C.recognise(audio, "allphone"), T)
            s = words > 0
            print(f"| {f.name} | {np.mean(own[s] == words[s]):.3f} | {np.mean(ap[s] == words[s]):.3f} | "
                  f"{np.mean(own > 0):.2f} / {np.mean(s):.2f} |")


if __name__ == "__main__":
    main()
