"""Train and measure the overlapped-speech detector of stages/sense/overlap.py (CPU, a few minutes).

Training scenes (4 s, made on the fly; labels per 10 ms frame = two dry sources active at once):
two voices at once (-7..7 dB), turn-taking (0.02-0.5 s gaps), one voice, one voice over a music bed
(0-15 dB under), non-speech (music, noise, silence); then reverb, noise, a random EQ and gain.
Voices: espeak-ng TTS utterances of the train split (voices and texts) and synthetic formant voices.
../shared speech is used for measurement only (never pyannote_sample.wav or silero_test.wav in training).

Measurement (old = diarize's block embedding-spread heuristic, the default, new = this detector
inside `diarize_audio(overlap_threshold=...)`): overlap-frame precision / recall on held-out mixtures of eval-split TTS
voices, false overlap on eval-split turn-taking and one voice over music, and flagged seconds on
pyannote_sample.wav against its RTTM.

Run: python benchmarks/overlap_detector.py [--steps 1200] [--ship] [--eval-only] [--media ../shared/media]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.sense.overlap import HOP, HOP_S, SAMPLE_RATE as SR, build_net, log_mel, overlap_probs, overlap_regions, save_weights  # noqa: E402
from stages.synth.speech import colored_noise, music_bed, reverb, texts, tts, voices  # noqa: E402

SCENE_S = 3.0
KINDS = {"overlap": 0.35, "turns": 0.2, "single": 0.15, "music": 0.2, "nonspeech": 0.1}
ACTIVE_DB = 30.0  # a source is active in a frame within this many dB of its loudest frame
CACHE = Path(os.environ.get("VIDU_OVERLAP_CACHE", Path(os.environ.get("TMPDIR", "/tmp")) / "vidu_overlap_pool"))


# ---------------------------------------------------------------------------------------------
# voices

def tts_pool(split: str, n: int, seed: int) -> list[np.ndarray]:
    """`n` espeak-ng utterances of `split` (voices and texts), trimmed to their speech span (cached)."""
    path = CACHE / f"{split}_{n}_{seed}.npz"
    if path.is_file():
        z = np.load(path)
        return [z[k].astype(np.float32) for k in sorted(z.files, key=int)]
    rng = np.random.default_rng(seed)
    vs, ts = voices(split), texts(split)
    out = []
    for _ in range(n):
        u = tts(ts[rng.integers(len(ts))], vs[rng.integers(len(vs))], int(rng.integers(120, 231)),
                int(rng.integers(15, 86)), int(rng.integers(20, 91)))
        a, b = int(u.span[0] * SR), int(u.span[1] * SR)
        if b - a > 0.3 * SR:
            out.append(u.audio[a:b].astype(np.float32))
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{str(k): x.astype(np.float16) for k, x in enumerate(out)})
    return out


def formant_voice(rng: np.random.Generator, duration: float) -> np.ndarray:
    """A synthetic voice: a harmonic source on a drifting f0 (80-280 Hz) through per-syllable vowel
    formants (3 resonators), syllable envelopes at 3-7 Hz, short fricative noise bursts."""
    from scipy.signal import lfilter

    n = int(duration * SR)
    t = np.arange(n) / SR
    f0 = rng.uniform(80, 280) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.2, 1.5) * t + rng.uniform(0, 6))) \
        * np.linspace(1.05, 0.92, n)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    H = int(4000 // f0.max())
    src = sum(np.sin(h * phase) / h for h in range(1, H + 1))
    out, pos = np.zeros(n), 0
    while pos < n:
        L = int(rng.uniform(0.08, 0.25) * SR)
        seg = src[pos:pos + L]
        for F, bw in ((rng.uniform(280, 850), 80), (rng.uniform(850, 2400), 120), (rng.uniform(2300, 3200), 160)):
            r = np.exp(-np.pi * bw / SR)
            seg = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * F / SR), r * r], seg)
        env = np.sin(np.pi * np.linspace(0, 1, len(seg))) ** rng.uniform(0.5, 2)
        if rng.random() < 0.3:  # a fricative
            k = min(len(seg), int(0.05 * SR))
            seg[:k] += 0.3 * np.std(seg) * np.diff(rng.standard_normal(k + 1))
        out[pos:pos + len(seg)] = seg * env
        pos += L + (int(rng.uniform(0.05, 0.3) * SR) if rng.random() < 0.2 else 0)
    return (out / (np.std(out) + 1e-9) * 0.1).astype(np.float32)


def utterance(rng: np.random.Generator, pool: list[np.ndarray], formant_share: float) -> np.ndarray:
    if rng.random() < formant_share:
        return formant_voice(rng, rng.uniform(0.6, 2.5))
    x = pool[rng.integers(len(pool))]
    return x * np.float32(10 ** (rng.uniform(-4, 4) / 20))


def activity(x: np.ndarray) -> np.ndarray:
    """Frames (10 ms) where the dry source `x` is within ACTIVE_DB of its loudest frame."""
    T = len(x) // HOP
    db = 10 * np.log10((x[:T * HOP].astype(np.float64).reshape(T, HOP) ** 2).mean(1) + 1e-12)
    return db > db.max() - ACTIVE_DB


def active_power(x: np.ndarray) -> float:
    act = activity(x)
    return float(np.mean(x[:len(act) * HOP].reshape(len(act), HOP)[act].astype(np.float64) ** 2)) + 1e-12


def track(rng, n: int, pool, gaps: tuple[float, float], formant_share: float, start: float = 0.0) -> np.ndarray:
    """Utterances one after another with gaps drawn from `gaps` (s), from `start` s, `n` samples."""
    out, pos = np.zeros(n, np.float32), int(start * SR)
    while pos < n - int(0.3 * SR):
        u = utterance(rng, pool, formant_share)
        m = min(len(u), n - pos)
        out[pos:pos + m] += u[:m]
        pos += m + int(rng.uniform(*gaps) * SR)
    return out


# ---------------------------------------------------------------------------------------------
# scenes

def scene(rng, pool, kind: str, seconds: float = SCENE_S, formant_share: float = 0.25,
          augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One mixture and its per-frame overlap label [T] (T = samples // HOP)."""
    n = int(seconds * SR)
    T = n // HOP
    label = np.zeros(T, bool)
    lead = rng.uniform(0, 0.5)
    if kind == "overlap":
        a = track(rng, n, pool, (0.1, 0.6), formant_share, lead)
        b = track(rng, n, pool, (0.2, 1.2), formant_share, rng.uniform(0, 0.4 * seconds))
        b = b * np.sqrt(active_power(a) / active_power(b) / 10 ** (rng.uniform(-7, 7) / 10))
        label = activity(a) & activity(b)
        x = a + b
    elif kind == "turns":
        x = track(rng, n, pool, (0.02, 0.5), formant_share, lead)
    elif kind in ("single", "music"):
        x = track(rng, n, pool, (0.1, 0.8), formant_share, lead)
    else:
        x = np.zeros(n, np.float32)
    power = max(float(np.mean(x ** 2)), 1e-6) if x.any() else 0.01
    if kind == "music" or (kind == "nonspeech" and rng.random() < 0.5):
        x = x + music_bed(rng, n) * np.sqrt(power / 10 ** (rng.uniform(0, 15) / 10))
    if augment:
        x = _augment(rng, x, power, strong=kind == "nonspeech")
    return x.astype(np.float32), label


def _augment(rng, x: np.ndarray, power: float, strong: bool) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    if rng.random() < 0.3:
        x = reverb(rng, x, rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.6))
    if rng.random() < 0.6 or strong:
        color = ["white", "pink", "brown"][rng.integers(3)]
        x = x + colored_noise(rng, len(x), color) * np.sqrt(power / 10 ** (rng.uniform(5, 35) / 10))
    if rng.random() < 0.3:
        sos = butter(2, rng.uniform(2500, 7000), "low", fs=SR, output="sos") if rng.random() < 0.5 \
            else butter(2, rng.uniform(80, 400), "high", fs=SR, output="sos")
        x = sosfilt(sos, x)
    x = x * 10 ** (rng.uniform(-35, -12) / 20) / np.sqrt(power)
    return x + 1e-4 * rng.standard_normal(len(x))


def batch(rng, pool, B: int):
    kinds = rng.choice(list(KINDS), size=B, p=list(KINDS.values()))
    xs, ys = zip(*(scene(rng, pool, k) for k in kinds))
    return np.stack(xs), np.stack(ys).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# training

class Batches(torch.utils.data.IterableDataset):
    """An endless stream of training batches (made in a DataLoader worker, beside the training)."""

    def __init__(self, pool, B: int, seed: int):
        self.pool, self.B, self.seed = pool, B, seed

    def __iter__(self):
        import torch

        torch.set_num_threads(1)
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            x, y = batch(rng, self.pool, self.B)
            yield torch.from_numpy(x), torch.from_numpy(y)


def train(steps: int, B: int, seed: int, pool_size: int, device: str = "cpu", workers: int = 1,
          out: Path | None = None, init: Path | None = None, lr: float = 3e-3):
    from safetensors.torch import load_file

    torch.manual_seed(seed)
    pool = tts_pool("train", pool_size, seed)
    print(f"train pool: {len(pool)} TTS utterances ({sum(map(len, pool)) / SR:.0f} s)", file=sys.stderr)
    net = build_net()
    if init is not None:  # continue from earlier weights
        net.load_state_dict({k: v.float() for k, v in load_file(str(init)).items()}, strict=False)
    net = net.to(device)
    print(f"weights: {sum(p.numel() for p in net.parameters())}", file=sys.stderr)
    opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    t0, run = time.perf_counter(), 0.0
    batches = torch.utils.data.DataLoader(Batches(pool, B, seed), batch_size=None, num_workers=workers, prefetch_factor=4)
    for step, (x, y) in zip(range(steps), batches):
        logits = net(log_mel(x.to(device)))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[:, :logits.shape[1]].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run = 0.98 * run + 0.02 * loss.item() if step else loss.item()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {run:.4f}  {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if out is not None and step % 250 == 249:  # a checkpoint survives a killed run
            save_weights(net, out)
    return net.cpu().eval()


# ---------------------------------------------------------------------------------------------
# measurement: old heuristic vs new detector, both inside diarize_audio

def frames(regions, T: int) -> np.ndarray:
    out = np.zeros(T, bool)
    for a, b in regions:
        out[int(round(a / HOP_S)):int(round(b / HOP_S))] = True
    return out


def methods(vad, encoder, threshold: float):
    from stages.diarize import diarize_audio

    return {"old": lambda x: diarize_audio(x, vad, encoder).overlap,  # the embedding-spread heuristic
            "new": lambda x: diarize_audio(x, vad, encoder, overlap_threshold=threshold).overlap}


def measure(threshold: float, n_scenes: int, media: Path, seed: int = 12345) -> None:
    from stages.diarize import load_encoder
    from stages.sense.media import load_audio
    from stages.sense.speech import load_vad

    vad, encoder = load_vad(), load_encoder()
    fns = methods(vad, encoder, threshold)
    pool = tts_pool("eval", 120, seed)
    rows = []
    for kind in ("overlap", "turns", "music"):
        rng = np.random.default_rng(seed + len(kind))
        data = [scene(rng, pool, kind, seconds=8.0, formant_share=0.0) for _ in range(n_scenes)]
        for name, fn in fns.items():
            tp = fp = fn_ = 0
            for x, y in data:
                hyp = frames(fn(x), len(y))
                tp, fp, fn_ = tp + int((hyp & y).sum()), fp + int((hyp & ~y).sum()), fn_ + int((~hyp & y).sum())
            rows.append((f"eval TTS {kind} ({n_scenes} x 8 s)", name, tp, fp, fn_, (tp + fp) * HOP_S, (tp + fn_) * HOP_S))
    real = real_cases(media)
    for label, cases in real.items():
        for name, fn in fns.items():
            tp = fp = fn_ = 0
            for x, y in cases:
                hyp = frames(fn(x), len(y))
                tp, fp, fn_ = tp + int((hyp & y).sum()), fp + int((hyp & ~y).sum()), fn_ + int((~hyp & y).sum())
            rows.append((label, name, tp, fp, fn_, (tp + fp) * HOP_S, (tp + fn_) * HOP_S))
    print(f"\nthreshold {threshold}; frames of 10 ms; P/R of overlap frames (n/a where no true overlap)")
    print(f"| {'audio':46s} | method | flagged s | true s | precision | recall |")
    print(f"|{'-' * 48}|--------|-----------|--------|-----------|--------|")
    for label, name, tp, fp, fn_, flagged, true in rows:
        p = f"{tp / (tp + fp):.2f}" if tp + fp else "-"
        r = f"{tp / (tp + fn_):.2f}" if tp + fn_ else "n/a"
        print(f"| {label:46s} | {name:6s} | {flagged:9.2f} | {true:6.2f} | {p:>9s} | {r:>6s} |")


def real_cases(media: Path) -> dict:
    """../shared speech, {label: [(audio, overlap frames)]}: pyannote_sample (RTTM overlap), a
    retalking clip + silero_test at equal loudness (as tests/test_diarize.py), the same two taking
    turns, retalking_1 over a music bed at 6 dB, retalking_1-5 and silero_test each alone."""
    from stages.sense.media import load_audio

    ref = [(float(f[3]), float(f[3]) + float(f[4]), f[7]) for f in
           (ln.split() for ln in (media / "speech" / "pyannote_sample.rttm").read_text().splitlines())]
    py = load_audio(media / "speech" / "pyannote_sample.wav", SR)
    T = len(py) // HOP
    spk = {s: frames([(a, b) for a, b, k in ref if k == s], T) for s in {k for _, _, k in ref}}
    out = {"pyannote_sample.wav (RTTM overlap)": (py, np.logical_and.reduce(list(spk.values())))}
    own = load_audio(media / "talking" / "retalking_1.mp4", SR)
    sil = load_audio(media / "speech" / "silero_test.wav", SR)
    other = sil[10 * SR:10 * SR + len(own)]
    other = other * np.sqrt(np.mean(own ** 2) / np.mean(other ** 2))
    mix = own + other
    out["retalking_1 + silero_test (mixed)"] = (mix, activity_real(own) & activity_real(other))
    gap = np.zeros(int(0.3 * SR), np.float32)
    turns = np.concatenate([own, gap, other, gap, own])
    out["retalking_1 / silero_test taking turns"] = (turns, np.zeros(len(turns) // HOP, bool))
    rng = np.random.default_rng(3)
    out["retalking_1 over music (6 dB)"] = (own + music_bed(rng, len(own)) * np.sqrt(np.mean(own ** 2) / 4), np.zeros(len(own) // HOP, bool))
    singles = [load_audio(media / "talking" / f"retalking_{i}.mp4", SR) for i in range(1, 6)] + [sil]
    out = {k: [v] for k, v in out.items()}
    out["retalking_1-5, silero_test: each one voice"] = [(x, np.zeros(len(x) // HOP, bool)) for x in singles]
    return out


def activity_real(x: np.ndarray) -> np.ndarray:
    """Speech frames of a real recording (silero-vad) as the overlap reference of a mixture."""
    from stages.sense.speech import load_vad, speech_segments

    return frames(speech_segments(load_vad(), x), len(x) // HOP)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--pool", type=int, default=400, help="train-split TTS utterances")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--init", type=Path, help="weights to continue training from")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--workers", type=int, default=1, help="processes making training scenes")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--scenes", type=int, default=20, help="eval scenes per kind")
    ap.add_argument("--ship", action="store_true", help="write the weights into stages/sense/overlap.safetensors")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "overlap.safetensors")
    ap.add_argument("--eval-only", action="store_true", help="measure the shipped weights")
    ap.add_argument("--media", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "media")
    args = ap.parse_args()

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if not args.eval_only:
        t0 = time.perf_counter()
        net = train(args.steps, args.batch, args.seed, args.pool, args.device, args.workers, args.out,
                    args.init, args.lr)
        print(f"trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        save_weights(net, args.out)
        if args.ship:
            from stages.sense.overlap import WEIGHTS
            save_weights(net, WEIGHTS)
            print(f"shipped: {WEIGHTS}", file=sys.stderr)
    if args.eval_only or args.ship:
        measure(args.threshold, args.scenes, args.media)


if __name__ == "__main__":
    main()
