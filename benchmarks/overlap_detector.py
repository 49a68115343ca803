"""Train and measure the overlapped-speech detector of stages/sense/overlap.py (CPU, a few minutes).

Training scenes (4 s, made on the fly; labels per 10 ms frame = two dry sources active at once):
two voices at once (-7..7 dB), turn-taking (0.02-0.5 s gaps), one voice, one voice over a music bed
(0-15 dB under), non-speech (music, noise, silence); then reverb, noise, a random EQ and gain.
Voices: espeak-ng TTS utterances of the train split (voices and texts), synthetic formant voices, and
(since session 35) REAL speech from ../shared/media under a fixed split (REAL_* below):
  TRAIN real    = the audio of talking/retalking_1, _2 (one speaker each, trimmed to silero-vad's speech
                  span) and the single-speaker stretches of speech/pyannote_sample.wav per its RTTM
                  (frames where exactly one of its two speakers is annotated, runs >= 0.6 s, both speakers);
  VAL real      = talking/retalking_3: train side but never trained on, read only by the threshold choice
                  (a net fits its training voices, so trained-on negatives flag nothing at any threshold:
                  the threshold needs one real voice the net has not heard);
  HELD OUT real = talking/retalking_4, talking/retalking_5, speech/silero_test.wav: never read by training
                  or by the threshold choice, only by `measure`.
Real crops (0.8-3 s) enter every scene kind like a TTS utterance (share --real-share): alone, taking turns,
over music, and mixed with each other and with TTS voices; their activity label is silero-vad's speech (the
RTTM's for pyannote) where the frame is also 12 dB over the recording's noise floor (energy_mask).
Every utterance may be speed/pitch perturbed (resampled by 0.85-1.18); then reverb, noise, EQ, gain as before;
and half the training examples get a vocal-tract-length warp of the mel axis (x0.87-1.13, mel_warp).
The threshold is chosen on train-side audio only (`choose_threshold`: new random scenes of train TTS voices and
the VAL real voice; VAL alone, over music, taking turns with and mixed with the train real clips): the highest
overlap F1 with VAL alone flagging < 0.1 s and none of the other non-overlap audio flagged.

Measurement (old = diarize's block embedding-spread heuristic, alone; s29 = session 29's detector
(--baseline weights, threshold 0.5); new = the trained/--weights detector at --threshold; the detectors as in
`diarize_audio(overlap_threshold=...)`: detect_overlap on the same turns; `<name>&old` = the AND rule of
stages.diarize.both_overlap: frames both the heuristic and that detector flag): overlap-frame precision / recall on
held-out mixtures of eval-split TTS voices, false overlap on eval-split turn-taking and one voice over music,
flagged seconds on each HELD-OUT real single voice, a held-out real mixture (retalking_4 + silero_test at
equal loudness; also retalking_5 + silero_test), held-out real turn-taking and voice over music, and
pyannote_sample.wav against its RTTM (partly train data since session 35: its single-speaker stretches).

The AND rule's hysteresis peak (stages.diarize.OVERLAP_PEAK) is chosen on TRAIN-side audio only by
`choose_peak` (`--peak auto`): the lowest peak at which no train-side non-overlap clip flags.

Run: python benchmarks/overlap_detector.py [--steps 1200] [--init W] [--ship] [--eval-only [--weights W]]
     [--baseline S29_WEIGHTS] [--threshold auto|P] [--peak none|auto|P] [--kinds overlap=.35,turns=.2,...]
     [--media ../shared/media]
2026-12-04 (RESULTS.md, "hysteresis"): the shipped detector, its peak chosen, before/after on held-out audio:
     python benchmarks/overlap_detector.py --eval-only --threshold 0.5 --name s29 --peak auto
and a detector trained with more turn-taking (not shipped: fewer train-side overlap clips at its chosen peak):
     python benchmarks/overlap_detector.py --steps 1300 --batch 16 --seed 2 --init s29.safetensors --lr 2e-3 \
         --real-share 0 --kinds overlap=0.3,turns=0.35,single=0.15,music=0.1,nonspeech=0.1 --threshold 0.5 \
         --peak auto --name s40 --baseline s29.safetensors
Session 35's run (not shipped: the held-out real single voices still flag at the chosen threshold):
     git show af87476:stages/sense/overlap.safetensors > s29.safetensors
     python benchmarks/overlap_detector.py --steps 5000 --batch 16 --seed 1 --init s29.safetensors --lr 2e-3 \
         --real-share 0.6 --baseline s29.safetensors        # 1006 s of training on 2 shared cores
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
# the real-speech split (paths under ../shared/media); the held-out files are read by `measure` only
REAL_TRAIN = ("talking/retalking_1.mp4", "talking/retalking_2.mp4")
REAL_TRAIN_RTTM = ("speech/pyannote_sample.wav", "speech/pyannote_sample.rttm")  # its single-speaker stretches
REAL_VAL = ("talking/retalking_3.mp4",)  # train side, never trained on: the threshold choice only
REAL_HELD_OUT = ("talking/retalking_4.mp4", "talking/retalking_5.mp4", "speech/silero_test.wav")
assert not set(REAL_HELD_OUT) & (set(REAL_TRAIN) | set(REAL_TRAIN_RTTM) | set(REAL_VAL))
assert not set(REAL_VAL) & set(REAL_TRAIN)


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


def vad_mask(x: np.ndarray) -> np.ndarray:
    """silero-vad speech frames (10 ms) of a real recording."""
    from stages.sense.speech import load_vad, speech_segments

    return frames(speech_segments(load_vad(), x), len(x) // HOP)


def energy_mask(x: np.ndarray, margin_db: float = 12.0) -> np.ndarray:
    """Frames of a real recording loud enough to be the voice rather than its room: within ACTIVE_DB of the
    loudest frame and `margin_db` over the recording's noise floor (its 10th-percentile frame level)."""
    T = len(x) // HOP
    db = 10 * np.log10((x[:T * HOP].astype(np.float64).reshape(T, HOP) ** 2).mean(1) + 1e-12)
    return db > max(db.max() - ACTIVE_DB, np.percentile(db, 10) + margin_db)


def rttm_turns(path: Path) -> list[tuple[float, float, str]]:
    return [(float(f[3]), float(f[3]) + float(f[4]), f[7]) for f in (ln.split() for ln in path.read_text().splitlines())]


def real_pool(media: Path, files: tuple = REAL_TRAIN, rttm: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """The TRAIN real speech: [(audio, speech frames)], audio cut on frame edges. Only REAL_TRAIN and
    REAL_TRAIN_RTTM are read here (or `files`, without the RTTM stretches: REAL_VAL for the threshold)."""
    from stages.sense.media import load_audio

    out = []
    for rel in files:
        x = load_audio(media / rel, SR)
        m = vad_mask(x)
        on = np.flatnonzero(m)
        m = m & energy_mask(x)
        a, b = max(0, on[0] - 5), min(len(m), on[-1] + 6)
        out.append((x[a * HOP:b * HOP].astype(np.float32), m[a:b]))
    if not rttm:
        return out
    wav, rttm = (media / r for r in REAL_TRAIN_RTTM)
    x = load_audio(wav, SR)
    T = len(x) // HOP
    ref = rttm_turns(rttm)
    spk = {k: frames([(a, b) for a, b, kk in ref if kk == k], T) for k in {k for _, _, k in ref}}
    count = np.sum(list(spk.values()), axis=0)
    m = energy_mask(x)
    for k, act in spk.items():
        solo = np.r_[False, act & (count == 1), False]
        edges = np.flatnonzero(np.diff(solo.astype(np.int8)))
        for a, b in zip(edges[::2], edges[1::2]):
            if b - a >= 60:
                out.append((x[a * HOP:b * HOP].astype(np.float32), m[a:b]))  # annotated speech, loud frames
    return out


def perturb(rng: np.random.Generator, x: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Speed and pitch together: resample by 0.85-1.18 (the mask follows)."""
    from scipy.signal import resample_poly

    f = rng.uniform(0.85, 1.18)
    y = resample_poly(x, 100, int(round(100 * f))).astype(np.float32)
    T = len(y) // HOP
    return y[:T * HOP], m[np.minimum((np.arange(T) * len(m) / max(T, 1)).astype(int), len(m) - 1)]


def utterance(rng: np.random.Generator, pool: list[np.ndarray], formant_share: float,
              real: list | None = None, real_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One utterance and its activity frames: a real train crop (0.8-3 s), a formant voice or a TTS utterance."""
    if real and rng.random() < real_share:
        x, m = real[rng.integers(len(real))]
        L = int(rng.uniform(0.8, 3.0) / HOP_S)
        a = int(rng.integers(0, max(1, len(m) - L + 1)))
        x, m = x[a * HOP:(a + L) * HOP], m[a:a + L]
    elif rng.random() < formant_share:
        x = formant_voice(rng, rng.uniform(0.6, 2.5))
        x = x[:len(x) // HOP * HOP]
        m = activity(x)
    else:
        x = pool[rng.integers(len(pool))]
        x = x[:len(x) // HOP * HOP]
        m = activity(x)
    if real and rng.random() < 0.5:
        x, m = perturb(rng, x, m)
    return x * np.float32(10 ** (rng.uniform(-4, 4) / 20)), m


def activity(x: np.ndarray) -> np.ndarray:
    """Frames (10 ms) where the dry source `x` is within ACTIVE_DB of its loudest frame."""
    T = len(x) // HOP
    db = 10 * np.log10((x[:T * HOP].astype(np.float64).reshape(T, HOP) ** 2).mean(1) + 1e-12)
    return db > db.max() - ACTIVE_DB


def active_power(x: np.ndarray, act: np.ndarray | None = None) -> float:
    act = activity(x) if act is None else act[:len(x) // HOP]
    if not act.any():
        return float(np.mean(x.astype(np.float64) ** 2)) + 1e-12
    return float(np.mean(x[:len(act) * HOP].reshape(len(act), HOP)[act].astype(np.float64) ** 2)) + 1e-12


def track(rng, n: int, pool, gaps: tuple[float, float], formant_share: float, start: float = 0.0,
          real: list | None = None, real_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Utterances one after another with gaps drawn from `gaps` (s), from `start` s, `n` samples;
    and the activity frames [n // HOP]."""
    out, act = np.zeros(n, np.float32), np.zeros(n // HOP, bool)
    pos = int(start / HOP_S)
    while pos < n // HOP - 30:
        u, m = utterance(rng, pool, formant_share, real, real_share)
        k = min(len(m), n // HOP - pos)
        out[pos * HOP:(pos + k) * HOP] += u[:k * HOP]
        act[pos:pos + k] |= m[:k]
        pos += k + int(rng.uniform(*gaps) / HOP_S)
    return out, act


# ---------------------------------------------------------------------------------------------
# scenes

def scene(rng, pool, kind: str, seconds: float = SCENE_S, formant_share: float = 0.25,
          augment: bool = True, real: list | None = None, real_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One mixture and its per-frame overlap label [T] (T = samples // HOP)."""
    n = int(seconds * SR)
    T = n // HOP
    label = np.zeros(T, bool)
    lead = rng.uniform(0, 0.5)
    kw = dict(real=real, real_share=real_share)
    if kind == "overlap":
        a, ma = track(rng, n, pool, (0.1, 0.6), formant_share, lead, **kw)
        b, mb = track(rng, n, pool, (0.2, 1.2), formant_share, rng.uniform(0, 0.4 * seconds), **kw)
        b = b * np.sqrt(active_power(a, ma) / active_power(b, mb) / 10 ** (rng.uniform(-7, 7) / 10))
        label = ma & mb
        x = a + b
    elif kind == "turns":
        x, _ = track(rng, n, pool, (0.02, 0.5), formant_share, lead, **kw)
    elif kind in ("single", "music"):
        x, _ = track(rng, n, pool, (0.1, 0.8), formant_share, lead, **kw)
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


def batch(rng, pool, B: int, real: list | None = None, real_share: float = 0.0):
    kinds = rng.choice(list(KINDS), size=B, p=list(KINDS.values()))
    fs = 0.15 if real else 0.25
    xs, ys = zip(*(scene(rng, pool, k, formant_share=fs, real=real, real_share=real_share) for k in kinds))
    return np.stack(xs), np.stack(ys).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# training

def mel_warp(feats: torch.Tensor, gen: torch.Generator, p: float = 0.5, lo: float = 0.87, hi: float = 1.13) -> torch.Tensor:
    """Vocal-tract-length perturbation on features [B, M, T]: each example's mel axis read at m * alpha
    (linear interpolation, clamped at the top band) with probability `p`, alpha in [lo, hi]."""
    B, M, _ = feats.shape
    alpha = torch.where(torch.rand(B, generator=gen) < p, lo + (hi - lo) * torch.rand(B, generator=gen), torch.ones(B))
    pos = (torch.arange(M)[None] * alpha[:, None]).clamp(max=M - 1)  # [B, M]
    i0 = pos.floor().long()
    i1 = (i0 + 1).clamp(max=M - 1)
    w = (pos - i0)[..., None]
    g = lambda idx: torch.gather(feats, 1, idx[..., None].expand(-1, -1, feats.shape[2]))  # noqa: E731
    return g(i0) * (1 - w) + g(i1) * w


class Batches(torch.utils.data.IterableDataset):
    """An endless stream of training batches (made in a DataLoader worker, beside the training)."""

    def __init__(self, pool, B: int, seed: int, real: list | None = None, real_share: float = 0.0):
        self.pool, self.B, self.seed, self.real, self.real_share = pool, B, seed, real, real_share

    def __iter__(self):
        import torch

        torch.set_num_threads(1)
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            x, y = batch(rng, self.pool, self.B, self.real, self.real_share)
            yield torch.from_numpy(x), torch.from_numpy(y)


def train(steps: int, B: int, seed: int, pool_size: int, device: str = "cpu", workers: int = 1,
          out: Path | None = None, init: Path | None = None, lr: float = 3e-3, real: list | None = None,
          real_share: float = 0.0):
    from safetensors.torch import load_file

    torch.manual_seed(seed)
    pool = tts_pool("train", pool_size, seed)
    print(f"train pool: {len(pool)} TTS utterances ({sum(map(len, pool)) / SR:.0f} s)", file=sys.stderr)
    if real:
        print(f"train real: {len(real)} pieces ({sum(len(x) for x, _ in real) / SR:.1f} s), share {real_share}", file=sys.stderr)
    net = build_net()
    if init is not None:  # continue from earlier weights
        net.load_state_dict({k: v.float() for k, v in load_file(str(init)).items()}, strict=False)
    net = net.to(device)
    print(f"weights: {sum(p.numel() for p in net.parameters())}", file=sys.stderr)
    opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    t0, run = time.perf_counter(), 0.0
    batches = torch.utils.data.DataLoader(Batches(pool, B, seed, real, real_share), batch_size=None, num_workers=workers, prefetch_factor=4)
    gen = torch.Generator().manual_seed(seed)
    for step, (x, y) in zip(range(steps), batches):
        logits = net(mel_warp(log_mel(x), gen).to(device))
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


def load_net(path: Path):
    from safetensors.torch import load_file

    net = build_net()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=False)
    return net.eval()


def detectors(vad, encoder, nets: dict):
    """{name: fn(audio) -> overlap regions}: "old" = diarize's heuristic alone, and each
    (net, threshold, peak) of `nets` as `diarize_audio(overlap_threshold=..., overlap_peak=...)` does it:
    detect_overlap (hysteresis `peak`, None: none) on the same turns (computed once per clip), and
    "<name>&old" = both (the AND rule: diarize's default since 2026-12-04 with the shipped detector at
    0.5, and with the hysteresis peak 0.85 since choose_peak)."""
    import copy

    import stages.diarize as D

    memo: dict = {}

    def diar(x):  # the turns, and the heuristic's overlap (`overlap`) on them
        key = (id(x), len(x))
        if key not in memo:
            memo.clear()
            d = D.diarize_audio(x, vad, encoder)  # (its own overlap is the default AND rule: replaced)
            d.overlap = D._mark_overlap(x, encoder, copy.deepcopy(d.turns)) if d.turns else []
            memo[key] = d
        return memo[key]

    def det(net, th, peak):
        last: dict = {}

        def fn(x):
            key = (id(x), len(x))
            if key in last:
                return last[key]
            last.clear()
            d = diar(x)
            if not d.turns:
                last[key] = []
                return []
            saved = D.overlap_probs
            D.overlap_probs = lambda audio: overlap_probs(audio, net)
            try:
                last[key] = D.detect_overlap(x, copy.deepcopy(d.turns), th, peak)
            finally:
                D.overlap_probs = saved
            return last[key]
        return fn

    def both(fn):  # the AND rule of D.both_overlap: heuristic regions AND the detector's, min duration after
        return lambda x: D.intersect_regions(diar(x).overlap, fn(x))

    dets = {k: det(*v) for k, v in nets.items()}
    return {"old": lambda x: diar(x).overlap, **dets, **{f"{k}&old": both(fn) for k, fn in dets.items()}}


def measure(nets: dict, n_scenes: int, media: Path, seed: int = 12345) -> None:
    from stages.diarize import load_encoder
    from stages.sense.speech import load_vad

    vad, encoder = load_vad(), load_encoder()
    fns = detectors(vad, encoder, nets)
    pool = tts_pool("eval", 120, seed)
    cases = {}
    for kind in ("overlap", "turns", "music"):
        rng = np.random.default_rng(seed + len(kind))
        cases[f"eval TTS {kind} ({n_scenes} x 8 s)"] = [scene(rng, pool, kind, seconds=8.0, formant_share=0.0)
                                                      for _ in range(n_scenes)]
    cases.update(real_cases(media))
    rows = []
    for label, data in cases.items():
        res = {name: [0, 0, 0, []] for name in fns}
        for x, y in data:  # clip by clip: all methods on one clip (its turns computed once)
            for name, fn in fns.items():
                hyp = frames(fn(x), len(y))
                r = res[name]
                r[0] += int((hyp & y).sum()); r[1] += int((hyp & ~y).sum()); r[2] += int((~hyp & y).sum())
                r[3].append(hyp.sum() * HOP_S)
        for name, (tp, fp, fn_, per) in res.items():
            rows.append((label, name, tp, fp, fn_, (tp + fp) * HOP_S, (tp + fn_) * HOP_S, per))
        print(f"measured: {label}", file=sys.stderr, flush=True)
    ths = ", ".join(f"{k} {th}" + (f" (peak {pk})" if pk is not None else "") for k, (_, th, pk) in nets.items())
    print(f"\nthresholds: {ths}; frames of 10 ms; P/R of overlap frames (n/a where no true overlap)")
    print(f"| {'audio':52s} | method   | flagged s | true s | precision | recall | clips flagged | per clip flagged s |")
    print(f"|{'-' * 54}|----------|-----------|--------|-----------|--------|---|---|")
    for label, name, tp, fp, fn_, flagged, true, per in rows:
        p = f"{tp / (tp + fp):.2f}" if tp + fp else "-"
        r = f"{tp / (tp + fn_):.2f}" if tp + fn_ else "n/a"
        pc = " ".join(f"{v:.2f}" for v in per) if 1 < len(per) <= 6 else ""
        nc = f"{sum(v > 0 for v in per)}/{len(per)}"
        print(f"| {label:52s} | {name:8s} | {flagged:9.2f} | {true:6.2f} | {p:>9s} | {r:>6s} | {nc:>5s} | {pc} |")


def real_cases(media: Path) -> dict:
    """../shared speech, {label: [(audio, overlap frames)]}. HELD OUT (REAL_HELD_OUT): retalking_4,
    retalking_5 and silero_test each alone; retalking_4 (and retalking_5) + silero_test from 10 s (30 s)
    at equal loudness, overlap = both silero-vad speech; retalking_4 / silero_test / retalking_4 taking
    turns (0.3 s gaps); retalking_4 over a music bed at 6 dB. Partly TRAIN: pyannote_sample vs its RTTM
    (its single-speaker stretches are trained on). TRAIN: retalking_1, _2 alone (a fit check); VAL: retalking_3."""
    from stages.sense.media import load_audio

    ref = rttm_turns(media / "speech" / "pyannote_sample.rttm")
    py = load_audio(media / "speech" / "pyannote_sample.wav", SR)
    T = len(py) // HOP
    spk = {s: frames([(a, b) for a, b, k in ref if k == s], T) for s in {k for _, _, k in ref}}
    r4, r5, sil = (load_audio(media / rel, SR) for rel in REAL_HELD_OUT)
    out = {"HELD-OUT real, one voice each: retalking_4, _5, silero": [(x, np.zeros(len(x) // HOP, bool)) for x in (r4, r5, sil)]}

    def mixed(own, start):
        other = sil[start * SR:start * SR + len(own)]
        other = other * np.sqrt(np.mean(own ** 2) / np.mean(other ** 2))
        return own + other, vad_mask(own) & vad_mask(other)

    out["HELD-OUT real mix: retalking_4 + silero_test"] = [mixed(r4, 10)]
    out["HELD-OUT real mix: retalking_5 + silero_test (30 s)"] = [mixed(r5, 30)]
    gap = np.zeros(int(0.3 * SR), np.float32)
    other = sil[10 * SR:10 * SR + len(r4)]
    other = other * np.sqrt(np.mean(r4 ** 2) / np.mean(other ** 2))
    turns = np.concatenate([r4, gap, other, gap, r4])
    out["HELD-OUT real turns: retalking_4 / silero_test"] = [(turns, np.zeros(len(turns) // HOP, bool))]
    rng = np.random.default_rng(3)
    out["HELD-OUT real: retalking_4 over music (6 dB)"] = [
        (r4 + music_bed(rng, len(r4)) * np.sqrt(np.mean(r4 ** 2) / 4), np.zeros(len(r4) // HOP, bool))]
    out["pyannote_sample.wav vs RTTM (partly TRAIN)"] = [(py, np.logical_and.reduce(list(spk.values())))]
    tr = [load_audio(media / rel, SR) for rel in REAL_TRAIN + REAL_VAL]
    out["TRAIN/VAL real, one voice each: retalking_1, _2 / _3"] = [(x, np.zeros(len(x) // HOP, bool)) for x in tr]
    return out


def choose_threshold(net, media: Path, seed: int = 777, n: int = 24) -> float:
    """The threshold from TRAIN-side audio only, the net's detector regions as overlap_regions makes them:
    positives = new random two-voice scenes of train TTS voices and the VAL real voice (REAL_VAL, never
    trained on), and VAL mixed at equal loudness with each REAL_TRAIN clip; negatives = train TTS turns,
    single voices and voices over music, VAL alone, VAL over music (6 dB), VAL taking turns with each
    REAL_TRAIN clip. The highest overlap F1 among thresholds where no negative frame is flagged at all and
    VAL alone flags < 0.1 s (else the threshold flagging least): the train-side form of "0 s on a single
    voice". (A first rule that allowed 0.5 % of the negatives chose 0.35 for a net that then flagged 3.1 s
    of held-out silero_test: the train-side negatives are voices the net fits.)"""
    from stages.sense.overlap import smooth_probs

    pool, val = tts_pool("train", 400, 0), real_pool(media, REAL_VAL, rttm=False)
    train_real = real_pool(media, REAL_TRAIN, rttm=False)
    rng = np.random.default_rng(seed)
    pos = [scene(rng, pool, "overlap", 4.0, 0.0, real=val, real_share=0.5) for _ in range(n)]
    neg = [scene(rng, pool, k, 4.0, 0.0) for k in ("turns", "single", "music") for _ in range(n // 2)]
    gap = np.zeros(int(0.3 * SR), np.float32)
    for v, mv in val:
        for t, mt in train_real:
            k = min(len(v), len(t)) // HOP * HOP
            o = t[:k] * np.sqrt(np.mean(v[:k] ** 2) / np.mean(t[:k] ** 2))
            pos.append((v[:k] + o, mv[:k // HOP] & mt[:k // HOP]))
            neg.append((np.concatenate([v, gap, o, gap]), np.zeros((len(v) + len(o) + 2 * len(gap)) // HOP, bool)))
        neg.append((v + music_bed(rng, len(v)) * np.sqrt(np.mean(v ** 2) / 4), np.zeros(len(v) // HOP, bool)))
    alone = [(v, np.zeros(len(v) // HOP, bool)) for v, _ in val]
    grid = np.round(np.arange(0.3, 0.951, 0.05), 2)
    sm = [(smooth_probs(overlap_probs(x, net)), y) for x, y in pos + neg + alone]
    n_neg = sum(len(y) for _, y in sm[len(pos):len(pos) + len(neg)])
    best, fallback = None, None
    for th in grid:
        tp = fp = fn_ = 0
        false = alone_s = 0
        for k, (p, y) in enumerate(sm):
            hyp = frames(overlap_regions(p, th, smoothed=p), len(y))
            if k < len(pos):
                tp, fp, fn_ = tp + int((hyp & y).sum()), fp + int((hyp & ~y).sum()), fn_ + int((~hyp & y).sum())
            elif k < len(pos) + len(neg):
                false += int(hyp.sum())
            else:
                alone_s += hyp.sum() * HOP_S
        f1 = 2 * tp / max(1, 2 * tp + fp + fn_)
        print(f"threshold {th:.2f}: train-side overlap F1 {f1:.3f}, non-overlap flagged {false / n_neg:.2%}, "
              f"VAL alone flagged {alone_s:.2f} s", file=sys.stderr)
        if false == 0 and alone_s < 0.1 and (best is None or f1 > best[0]):
            best = (f1, th)
        if fallback is None or false * HOP_S + alone_s < fallback[0]:
            fallback = (false * HOP_S + alone_s, th)
    return float(best[1] if best else fallback[1])


def train_side_cases(media: Path, n: int = 90, seed: int = 424242) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """TRAIN-side audio for choosing the AND rule's hysteresis peak: [(kind, audio, overlap frames)].
    TTS (train-split voices and texts, 8-s scenes as `measure` makes the eval-split ones): `n` each of two
    voices at once ("overlap"), turn-taking and one voice over music; real (REAL_TRAIN + REAL_VAL,
    retalking_1-3; the session-29 detector never heard real speech): each ordered pair mixed at 0 and -6 dB
    (overlap = both voices' silero-vad speech) and taking turns (a / b / a, gaps 0.1 and 0.4 s); each over
    music (6 dB) and alone. No HELD-OUT file is read."""
    import itertools

    from stages.sense.media import load_audio

    pool = tts_pool("train", 400, 0)
    out = []
    for kind in ("turns", "overlap", "music"):
        rng = np.random.default_rng(seed + len(kind))
        out += [(f"train TTS {kind}", *scene(rng, pool, kind, seconds=8.0, formant_share=0.0)) for _ in range(n)]
    R = {rel: load_audio(media / rel, SR).astype(np.float32) for rel in REAL_TRAIN + REAL_VAL}
    assert not set(R) & set(REAL_HELD_OUT)
    for ra, rb in itertools.permutations(R, 2):
        a, b = R[ra], R[rb]
        k = min(len(a), len(b))
        o = b[:k] * np.sqrt(np.mean(a[:k] ** 2) / np.mean(b[:k] ** 2))
        for db in (0, -6):
            out.append(("train real mix", a[:k] + o * np.float32(10 ** (db / 20)), vad_mask(a[:k]) & vad_mask(o)))
        for g in (0.1, 0.4):
            gap = np.zeros(int(g * SR), np.float32)
            x = np.concatenate([a, gap, o, gap, a])
            out.append(("train real turns", x, np.zeros(len(x) // HOP, bool)))
    for i, v in enumerate(R.values()):
        bed = music_bed(np.random.default_rng(i + 1), len(v)) * np.sqrt(np.mean(v ** 2) / 4)
        out.append(("train real over music", (v + bed).astype(np.float32), np.zeros(len(v) // HOP, bool)))
        out.append(("train real alone", v, np.zeros(len(v) // HOP, bool)))
    return out


def choose_peak(net, threshold: float, media: Path, grid=np.round(np.arange(0.5, 0.951, 0.05), 2)) -> float | None:
    """The AND rule's hysteresis peak from TRAIN-side audio only (train_side_cases): the lowest peak on
    `grid` at which no non-overlap clip (TTS turn-taking, TTS voice over music, real turn-taking, real over
    music, real alone) has any flagged frame; the AND rule as stages.diarize.both_overlap makes it (the
    heuristic's regions and detect_overlap with `net` at `threshold` on diarize_audio's turns). None when
    no peak on the grid clears them. Prints every peak's flagged clips and overlap recall."""
    from stages.diarize import _mark_overlap, diarize_audio, intersect_regions, load_encoder, merge_spans
    from stages.sense.overlap import smooth_probs
    from stages.sense.speech import load_vad

    vad, encoder = load_vad(), load_encoder()
    seen = []
    for kind, x, y in train_side_cases(media):
        d = diarize_audio(x, vad, encoder)
        heur = _mark_overlap(x, encoder, d.turns) if d.turns else []
        probs = overlap_probs(x, net)
        seen.append((kind, y, heur, probs, smooth_probs(probs), [(t.start, t.end) for t in d.turns]))
    print(f"train-side cases: {len(seen)}", file=sys.stderr)
    chosen = None
    for peak in grid:
        stats: dict = {}
        for kind, y, heur, probs, sm, turns in seen:
            regs = overlap_regions(probs, threshold, smoothed=sm, peak=float(peak))
            det = merge_spans((max(a, t0), min(b, t1)) for a, b in regs for t0, t1 in turns if min(b, t1) > max(a, t0))
            hyp = frames(intersect_regions(heur, det), len(y))
            st = stats.setdefault(kind, [0, 0, 0, 0])
            st[0] += 1; st[1] += int(hyp.any()); st[2] += int((hyp & y).sum()); st[3] += int(y.sum())
        negatives = sum(v[1] for k, v in stats.items() if v[3] == 0)
        print(f"peak {peak:.2f}: " + " | ".join(f"{k} {v[1]}/{v[0]} clips" + (f" R {v[2] / v[3]:.2f}" if v[3] else "")
                                              for k, v in stats.items()), file=sys.stderr)
        if chosen is None and negatives == 0:
            chosen = float(peak)
    return chosen


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
    ap.add_argument("--real-share", type=float, default=0.5, help="share of utterances that are REAL_TRAIN crops (0: none)")
    ap.add_argument("--kinds", default=",".join(f"{k}={v}" for k, v in KINDS.items()),
                    help="training scene shares, kind=share,... (normalised)")
    ap.add_argument("--threshold", default="auto", help="'auto' (choose_threshold, train-side data) or a probability")
    ap.add_argument("--scenes", type=int, default=20, help="eval scenes per kind")
    ap.add_argument("--ship", action="store_true", help="write the weights into stages/sense/overlap.safetensors")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "overlap.safetensors")
    ap.add_argument("--eval-only", action="store_true", help="measure --weights (default: the shipped weights)")
    ap.add_argument("--weights", type=Path, help="with --eval-only: the weights to measure (and --ship)")
    ap.add_argument("--baseline", type=Path, help="session 29's weights, measured at 0.5 beside the new ones "
                    "(git show af87476:stages/sense/overlap.safetensors > s29.safetensors)")
    ap.add_argument("--name", default="new", help="the measured detector's name in the table (e.g. s29)")
    ap.add_argument("--peak", default="none", help="the AND rule's hysteresis peak: 'auto' (choose_peak, train-side "
                    "data), a probability, or 'none'; with one, the detector is measured without and with it "
                    "(<name> and <name>^<peak>)")
    ap.add_argument("--media", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "media")
    args = ap.parse_args()

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    shares = dict(kv.split("=") for kv in args.kinds.split(","))
    if set(shares) != set(KINDS):
        ap.error(f"--kinds: give a share for each of {', '.join(KINDS)}")
    total = sum(float(v) for v in shares.values())
    KINDS.update({k: float(v) / total for k, v in shares.items()})
    from stages.sense.overlap import WEIGHTS

    if not args.eval_only:
        t0 = time.perf_counter()
        real = real_pool(args.media) if args.real_share > 0 else None
        net = train(args.steps, args.batch, args.seed, args.pool, args.device, args.workers, args.out,
                    args.init, args.lr, real, args.real_share)
        print(f"trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        save_weights(net, args.out)
        path = args.out
    else:
        path = args.weights or WEIGHTS
    net = load_net(path)  # as shipped: bf16 weights
    th = choose_threshold(net, args.media) if args.threshold == "auto" else float(args.threshold)
    print(f"threshold: {th} ({'chosen on train-side data' if args.threshold == 'auto' else 'given'})", file=sys.stderr)
    if args.ship:
        save_weights(net, WEIGHTS)
        print(f"shipped: {path} -> {WEIGHTS}", file=sys.stderr)
    nets = {"s29": (load_net(args.baseline), 0.5, None)} if args.baseline else {}
    nets[args.name] = (net, th, None)
    if args.peak != "none":
        peak = choose_peak(net, th, args.media) if args.peak == "auto" else float(args.peak)
        print(f"peak: {peak} ({'chosen on train-side data' if args.peak == 'auto' else 'given'})", file=sys.stderr)
        if peak is not None:
            nets[f"{args.name}^{peak}"] = (net, th, peak)
    measure(nets, args.scenes, args.media)


if __name__ == "__main__":
    main()
