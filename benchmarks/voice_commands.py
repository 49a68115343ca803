"""Voice commands (stages/stream/commands.py) on espeak-ng speech and real recordings, CPU.

    python benchmarks/voice_commands.py                 # eval split: detection, timing, false alarms, RTF
    python benchmarks/voice_commands.py --tune          # train split: detections per kws threshold

Speech: sentences of stages.synth.speech.texts(split) spoken by voices(split) at 130-200 wpm with
0.2-0.6 s pauses, one continuous stream. Commands: each ACTIONS phrase said inside a sentence
("Okay, raise your hand now.") with its first word's time from espeak-ng's word events. A detection
is a hit when its text is the command's and its start is within TOLERANCE_S of the first word;
every other detection is a false alarm. Non-command speech: sentences with no instruction at all
(not even the ones outside ACTIONS: "wave", "look down").
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.stream.commands import SPOKEN, phrases, spot  # noqa: E402
from stages.synth.speech import INSTRUCTIONS, texts, tts, voices  # noqa: E402

SR = 16000
TOLERANCE_S = 0.3
FRAMES = ["Please {c}.", "Okay, {c} now.", "Can you {c} for me?", "When I say so, {c}.", "{n}, please {c} today.",
          "Now {c}, then we talk about the weather.", "I would like you to {c} slowly."]
NAMES = ["Anna", "Ben", "Carla", "Hugo", "Iris", "Sam"]


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z']+", s.lower())


def plain_texts(split: str) -> list[str]:
    """Sentences of `split` with no instruction phrase in them."""
    bad = [_words(i) for i in INSTRUCTIONS]
    out = []
    for t in texts(split):
        w = _words(t)
        if not any(w[k:k + len(b)] == b for b in bad for k in range(len(w))):
            out.append(t)
    return out


def command_sentences(rng: np.random.Generator, split: str, per_phrase: int) -> list[tuple[str, str]]:
    """(sentence, ACTIONS name) with every spoken form of every action `per_phrase` times."""
    out = []
    for phrase, name in phrases().items():
        for _ in range(per_phrase):
            f = FRAMES[rng.integers(len(FRAMES))]
            out.append((f.format(c=phrase, n=NAMES[rng.integers(len(NAMES))]), name))
    return out


def _start_of(words: list[tuple[float, str]], phrase: str) -> float:
    want = phrase.split()
    said = [(t, _words(w)[0] if _words(w) else "") for t, w in words]
    for k in range(len(said) - len(want) + 1):
        if [w for _, w in said[k:k + len(want)]] == want:
            return said[k][0]
    raise ValueError(f"{phrase!r} not found in the word events {words}")


def stream(rng: np.random.Generator, split: str, items: list[tuple[str, str | None]]):
    """One continuous 16 kHz stream of `items` (sentence, command name or None), each in a random
    voice of `split`: -> (audio, [(name, start s)])."""
    vs = voices(split)
    parts, truth, t = [], [], 0.0
    for sentence, name in items:
        u = tts(sentence, vs[rng.integers(len(vs))], rate=int(rng.integers(130, 201)))
        if name is not None:
            spoken = next(p for p in [*SPOKEN.get(name, ()), name] if p in sentence.lower())
            truth.append((name, t + _start_of(u.words, spoken)))
        pause = np.zeros(int(rng.uniform(0.2, 0.6) * SR), np.float32)
        parts += [u.audio, pause]
        t += (len(u.audio) + len(pause)) / SR
    return np.concatenate(parts), truth


def score(found, truth) -> dict:
    """Greedy matching of detections to commands by text and start time."""
    hits, errors, used = {}, [], set()
    for name, t in truth:
        best = min(((abs(c.start - t), i) for i, c in enumerate(found) if i not in used and c.text == name),
                   default=(1e9, None))
        ok = best[0] <= TOLERANCE_S
        hits.setdefault(name, []).append(ok)
        if ok:
            used.add(best[1])
            errors.append(found[best[1]].start - t)
    false = [c for i, c in enumerate(found) if i not in used]
    return {"hits": hits, "errors": errors, "false": false}


def mixed_stream(rng, split: str, per_phrase: int, plain_every: int = 2):
    """Command sentences with `plain_every` non-command sentences between them."""
    plain = plain_texts(split)
    items = []
    for s, name in command_sentences(rng, split, per_phrase):
        items += [(plain[rng.integers(len(plain))], None) for _ in range(plain_every)] + [(s, name)]
    rng.shuffle(items)
    return stream(rng, split, items)


def tune(exponents=(0, -5, -40, -50, -60, -80)):
    """Per phrase and threshold: hits and false alarms on train speech (all phrases share one
    threshold per pass; the kws search tracks each phrase on its own)."""
    rng = np.random.default_rng(1)
    audio, truth = mixed_stream(rng, "train", per_phrase=4)
    print(f"train stream: {len(audio) / SR:.0f} s, {len(truth)} commands", flush=True)
    table = {}
    for e in exponents:
        found = spot(audio, thresholds={p: e for p in phrases()})
        r = score(found, truth)
        for name, h in r["hits"].items():
            fa = sum(c.text == name for c in r["false"])
            table.setdefault(name, {})[e] = (sum(h), len(h), fa)
        print(f"1e{e}: " + "  ".join(f"{n}: {v[e][0]}/{v[e][1]} fa {v[e][2]}" for n, v in table.items()), flush=True)
    return table


def measure(minutes_plain: float = 10.0, per_phrase: int = 6) -> dict:
    rng = np.random.default_rng(2)
    out = {}
    audio, truth = mixed_stream(rng, "eval", per_phrase=per_phrase, plain_every=1)
    t0 = time.perf_counter()
    found = spot(audio)
    out["mixed_rtf"] = (time.perf_counter() - t0) / (len(audio) / SR)
    r = score(found, truth)
    out["mixed_seconds"] = len(audio) / SR
    out["detection"] = {n: (sum(h), len(h)) for n, h in r["hits"].items()}
    out["timing_abs_mean"] = float(np.mean(np.abs(r["errors"]))) if r["errors"] else None
    out["timing_abs_max"] = float(np.max(np.abs(r["errors"]))) if r["errors"] else None
    out["timing_mean"] = float(np.mean(r["errors"])) if r["errors"] else None
    out["mixed_false"] = [(c.text, c.start) for c in r["false"]]
    plain = plain_texts("eval")
    items = []
    need = minutes_plain * 60
    while len(items) * 2.2 < need:                       # ~2.2 s per sentence with its pause
        items.append((plain[rng.integers(len(plain))], None))
    audio, _ = stream(rng, "eval", items)
    t0 = time.perf_counter()
    found = spot(audio)
    out["plain_rtf"] = (time.perf_counter() - t0) / (len(audio) / SR)
    out["plain_seconds"] = len(audio) / SR
    out["plain_false"] = [(c.text, c.start) for c in found]
    from stages.sense.media import load_audio
    out["real"] = {}
    for name in ("silero_test.wav", "pyannote_sample.wav"):
        p = Path(__file__).resolve().parents[2] / "shared" / "media" / "speech" / name
        if p.exists():
            a = load_audio(p, SR)
            out["real"][name] = (len(a) / SR, [(c.text, c.start) for c in spot(a)])
    return out


def report(r: dict) -> str:
    lines = [(f"- mixed eval stream: {r['mixed_seconds'] / 60:.1f} min, {sum(v[1] for v in r['detection'].values())} "
              f"commands inside sentences, between non-command sentences")]
    tot = [sum(v[0] for v in r["detection"].values()), sum(v[1] for v in r["detection"].values())]
    lines.append(f"- detection (text right, start within ±{TOLERANCE_S} s): {tot[0]}/{tot[1]} = {tot[0] / tot[1]:.0%}; per action: "
                 + ", ".join(f"{n} {a}/{b}" for n, (a, b) in r["detection"].items()))
    if r["timing_abs_mean"] is not None:
        lines.append(f"- start time error of hits: mean |err| {r['timing_abs_mean'] * 1000:.0f} ms, max "
                     f"{r['timing_abs_max'] * 1000:.0f} ms, mean (bias) {r['timing_mean'] * 1000:+.0f} ms")
    lines.append(f"- false alarms in the mixed stream: {len(r['mixed_false'])} {r['mixed_false'][:8]}")
    per10 = len(r["plain_false"]) / (r["plain_seconds"] / 600)
    lines.append(f"- non-command eval speech: {r['plain_seconds'] / 60:.1f} min, {len(r['plain_false'])} false alarms "
                 f"= {per10:.2f} per 10 min {r['plain_false'][:8]}")
    for name, (sec, f) in r["real"].items():
        lines.append(f"- real speech {name}: {sec / 60:.1f} min, {len(f)} false alarms = {len(f) / (sec / 600):.2f} per 10 min {f[:8]}")
    lines.append(f"- CPU real-time factor (decode s / audio s, nice'd on the shared 2-core machine): "
                 f"{r['mixed_rtf']:.3f} (mixed), {r['plain_rtf']:.3f} (non-command)")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--minutes", type=float, default=10.0, help="non-command speech to measure false alarms on")
    args = ap.parse_args()
    if args.tune:
        tune()
    else:
        print(report(measure(args.minutes)))
