"""Voices for the characters, and the content of their TTS speech with the timbre removed (issue 19).

- VOICES: named character voices (an espeak-ng voice and a base pitch); `voice_for(seed)` gives an
  identity its voice. The joint model's generated audio is meant to carry the driving speech's content
  (stages.sense.content: phones + loudness per 10 ms step) in one of these voices.
- `utterance(text, voice, rng)`: one sentence in a VOICES voice at a random rate and pitch range, with
  its ground-truth content (espeak-ng's phoneme events, stages.sense.content.from_espeak).
- The timbre probe: `probe_corpus` speaks the same texts in several voices; `pooled` turns a [T, D]
  sequence into one row per utterance (means, spreads and step-to-step changes of every feature);
  `probe_accuracy` fits a softmax regression on the rows of some texts and scores voice identity on
  the others; `probe_windows` is the local probe, on every 160 ms window of the sequences, voting.
  8 voices x 120 texts (chance 0.125), pooled probe: the truth's phones 0.127-0.135, with the
  loudness 0.17-0.19, log-mel 1.000; pocketsphinx's phones of the same audio 0.79. Window probe:
  0.125 / 0.128 / 1.000 (tests/test_voice.py; benchmarks/voice_foundation.py; benchmarks/RESULTS.md,
  2026-12-04 session 41).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.sense import content as C
from stages.synth.speech import tts

# name: (espeak-ng voice, base pitch 0-100). One accent (en-us): an accent changes the phones themselves
# (en-gb voices spoke the probe texts in 144-162 phone steps where en-us ones took 168-178), and the
# content follows the driving speech's accent. Variants of the "train" split (stages/synth/speech.py)
# whose files set timbre only (formants, pitch range, tone, breath, klatt): "stressAdd" (f1-f5, m2-m4)
# re-times stressed syllables and "echo" (f2, f5, m2) adds a tail, which the generated speech must not
# do (its timing is the driving speech's, for lip sync).
VOICES: dict[str, tuple[str, int]] = {
    "ada": ("en-us+Annie", 55), "bea": ("en-us+grandma", 50), "cleo": ("en-us+steph", 55), "zoe": ("en-us+zac", 40),
    "ben": ("en-us+m1", 45), "dev": ("en-us+m6", 50), "finn": ("en-us+robert", 40), "gus": ("en-us+klatt", 50),
}


def voice_index(name: str) -> int:
    """The index of VOICES name `name` among a model's character voices (DiTConfig.voices): sorted order."""
    return sorted(VOICES).index(name)


def voice_for(seed: int) -> str:
    """The VOICES name of an identity seed."""
    names = sorted(VOICES)
    return names[seed % len(names)]


@dataclass
class VoicedUtterance:
    audio: np.ndarray  # float32, 16 kHz mono
    phone: np.ndarray  # [T] int64 stages.sense.content.PHONES ids, T = steps_for(len(audio))
    loud: np.ndarray  # [T] float32
    voice: str
    text: str


def utterance(text: str, voice: str, rng: np.random.Generator) -> VoicedUtterance:
    """`text` in VOICES[`voice`] at a random rate (120-230 wpm) and pitch range (20-90), the same
    draws for every voice: what differs between voices is their timbre and base pitch."""
    if voice not in VOICES:
        raise ValueError(f"no voice {voice!r}; voices: {', '.join(sorted(VOICES))}")
    espeak, pitch = VOICES[voice]
    u = tts(text, espeak, int(rng.integers(120, 231)), pitch, int(rng.integers(20, 91)))
    c = C.content(u.audio, segments=C.from_espeak(u.phonemes))
    return VoicedUtterance(u.audio, c["phone"], c["loud"], voice, text)


def probe_corpus(voices: list[str], texts: list[str], seed: int = 0) -> list[VoicedUtterance]:
    """Every text in every voice (texts outer), prosody drawn per utterance from one seeded stream."""
    rng = np.random.default_rng(seed)
    return [utterance(t, v, rng) for t in texts for v in voices]


def log_mel(audio: np.ndarray) -> np.ndarray:
    """[T, 80] natural-log mel of the model's audio config (models/audio.py), step j centred at j * hop."""
    import torch

    from models.audio import _mel
    from models.config import AudioConfig

    cfg = AudioConfig()
    x = torch.nn.functional.pad(torch.as_tensor(audio, dtype=torch.float32), (cfg.n_fft // 2, cfg.n_fft // 2))
    with torch.no_grad():
        return _mel(cfg)(x).clamp_min(1e-5).log().T.numpy()


def pooled(x: np.ndarray) -> np.ndarray:
    """[T, D] -> [3 D]: per feature its mean, standard deviation and mean absolute step-to-step change."""
    x = np.asarray(x, np.float64)
    return np.concatenate([x.mean(0), x.std(0), np.abs(np.diff(x, axis=0)).mean(0)])


def _softmax_fit(Z: np.ndarray, y: np.ndarray, K: int, steps: int, l2: float, lr: float) -> np.ndarray:
    """Weights [D, K] of a softmax regression on rows Z [N, D] (full-batch gradient descent, L2 `l2`)."""
    onehot = np.eye(K)[y]
    W = np.zeros((Z.shape[1], K))
    for _ in range(steps):
        logits = Z @ W
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        W -= lr * (Z.T @ (p - onehot) / len(Z) + l2 * W)
    return W


def _standardise(X: np.ndarray, train: np.ndarray):
    mu, sd = X[train].mean(0), X[train].std(0) + 1e-6
    return lambda A: np.concatenate([(A - mu) / sd, np.ones((len(A), 1))], 1)


def probe_accuracy(X: np.ndarray, y: np.ndarray, train: np.ndarray, steps: int = 500, l2: float = 1e-2,
                   lr: float = 0.5) -> float:
    """Voice identity accuracy on the rows not in `train` of a softmax regression fitted (full-batch
    gradient descent, L2 `l2`, features standardised on the train rows) on the rows in `train`."""
    X, y, train = np.asarray(X, np.float64), np.asarray(y), np.asarray(train, bool)
    z = _standardise(X, train)
    W = _softmax_fit(z(X[train]), y[train], int(y.max()) + 1, steps, l2, lr)
    return float(np.mean((z(X[~train]) @ W).argmax(1) == y[~train]))


def windows(x: np.ndarray, width: int = 16, hop: int = 8) -> np.ndarray:
    """[T, D] -> [n, width * D]: flattened windows of `width` steps every `hop` steps."""
    return np.stack([x[i:i + width].reshape(-1) for i in range(0, len(x) - width + 1, hop)])


def probe_windows(seqs: list[np.ndarray], y: np.ndarray, groups: np.ndarray, folds: int = 4, width: int = 16,
                  steps: int = 300) -> float:
    """The local probe: a softmax regression on every `width`-step window (160 ms) of the train folds'
    sequences [T, D]; an utterance's voice is the argmax of its windows' summed log-probabilities.
    Accuracy over all utterances, folds by `groups` as in `probe_folds`."""
    ids = np.unique(groups)
    fold_of = dict(zip(ids, np.arange(len(ids)) % folds))
    f = np.array([fold_of[g] for g in groups])
    wins = [windows(np.asarray(s, np.float64), width) for s in seqs]
    K, hits = int(np.max(y)) + 1, 0
    for k in range(folds):
        Xtr = np.concatenate([w for w, ff in zip(wins, f) if ff != k])
        ytr = np.concatenate([np.full(len(w), c) for w, c, ff in zip(wins, y, f) if ff != k])
        z = _standardise(Xtr, np.ones(len(Xtr), bool))
        W = _softmax_fit(z(Xtr), ytr, K, steps, 1e-2, 0.5)
        for w, c, ff in zip(wins, y, f):
            if ff == k:
                logits = z(w) @ W
                logp = logits - logits.max(1, keepdims=True)
                logp -= np.log(np.exp(logp).sum(1, keepdims=True))
                hits += int(logp.sum(0).argmax() == c)
    return hits / len(y)


def probe_folds(X: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 4) -> float:
    """Voice identity accuracy over all rows, each row scored by the `probe_accuracy` regression fitted
    on the other folds' rows: groups (e.g. text ids) are split into `folds` folds, so a text scored was
    never heard in training, in any voice."""
    ids = np.unique(groups)
    fold_of = dict(zip(ids, np.arange(len(ids)) % folds))
    f = np.array([fold_of[g] for g in groups])
    hits = [probe_accuracy(X, y, f != k) * np.sum(f == k) for k in range(folds)]
    return float(np.sum(hits) / len(y))
