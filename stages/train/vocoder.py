"""Train the streaming vocoder (models/vocoder.py) on espeak-ng speech, on CPU in minutes (issue 19).

Data: `utterances` sentences of the "train" texts, half in the character voices (stages.synth.voice
VOICES), half in random "train" voices of the synthetic world (accents, readers and variants of
stages/synth/speech.py), at random rate, pitch and level (-35 .. -12 dBFS RMS, as `augment` levels
speech), then their log-mel (models/audio.py's mel, steps centred at j * hop). A batch is `batch`
segments of `segment` output steps, each read with the `context` steps before it, as streaming reads
them. Loss on the samples every frame covers: multi-resolution STFT (spectral convergence + L1 of log
magnitudes at n_fft 256 / 512 / 1024, hop n_fft / 4) + L1 of the output's log-mel against the input.
Adam, cosine decay. Reproduce the shipped weights: `python benchmarks/train_vocoder.py`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from models.vocoder import Vocoder, VocoderConfig

RESOLUTIONS = (256, 512, 1024)


@dataclass(frozen=True)
class VocoderRecipe:
    steps: int = 6000
    batch: int = 16
    segment: int = 64          # output steps per segment (0.64 s)
    lr: float = 2e-3
    utterances: int = 600
    seed: int = 0
    mel_weight: float = 1.0


def corpus(n: int, seed: int, split: str = "train") -> list[tuple[np.ndarray, np.ndarray]]:
    """[(audio [N] float32, log-mel [T, n_mels] float32)] of `n` TTS sentences (module docstring)."""
    from stages.synth import speech as S
    from stages.synth.voice import VOICES, log_mel

    rng = np.random.default_rng(seed)
    texts, pool, palette = S.texts(split), S.voices(split), sorted(VOICES)
    out = []
    for i in range(n):
        if i % 2 == 0 and split == "train":
            voice, pitch = VOICES[palette[rng.integers(len(palette))]]
        else:
            voice, pitch = pool[rng.integers(len(pool))], int(rng.integers(20, 81))
        u = S.tts(texts[rng.integers(len(texts))], voice, int(rng.integers(120, 231)), pitch, int(rng.integers(20, 91)))
        audio = u.audio * (10 ** (rng.uniform(-35, -12) / 20) / (np.sqrt(np.mean(u.audio ** 2)) + 1e-9))
        audio = np.clip(audio, -1, 1).astype(np.float32)
        out.append((audio, log_mel(audio).astype(np.float32)))
    return out


def _stft_mag(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    w = torch.hann_window(n_fft, device=x.device)
    return torch.stft(x, n_fft, n_fft // 4, window=w, return_complex=True).abs()


def spectral_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multi-resolution STFT loss of waveform y against x, [B, N] each."""
    loss = y.new_zeros(())
    for n in RESOLUTIONS:
        Y, X = _stft_mag(y, n), _stft_mag(x, n)
        loss = loss + torch.linalg.norm(Y - X) / (torch.linalg.norm(X) + 1e-7)
        loss = loss + (torch.log(Y + 1e-5) - torch.log(X + 1e-5)).abs().mean()
    return loss / len(RESOLUTIONS)


def mel_loss(y: torch.Tensor, log_mel: torch.Tensor) -> torch.Tensor:
    """L1 of waveform y's log-mel [B, T', n_mels] against `log_mel` [B, T', n_mels] (same steps)."""
    from models.audio import _mel
    from models.config import AudioConfig

    m = _mel(AudioConfig())(y).clamp_min(1e-5).log().transpose(1, 2)
    T = min(m.shape[1], log_mel.shape[1])
    return (m[:, :T] - log_mel[:, :T]).abs().mean()


def batch(data: list, rng: np.random.Generator, r: VocoderRecipe, cfg: VocoderConfig):
    """(input log-mel [B, context + segment, n_mels], target audio [B, (segment - 3) * hop] from the
    first segment step's sample, its log-mel steps for `mel_loss` [B, S', n_mels])."""
    C, S, hop = cfg.context, r.segment, cfg.hop
    mels, wav, tm = [], [], []
    while len(mels) < r.batch:
        audio, lm = data[rng.integers(len(data))]
        if len(lm) < C + S + 4:
            continue
        j0 = int(rng.integers(C, len(lm) - S - 3))
        mels.append(lm[j0 - C:j0 + S])
        wav.append(audio[j0 * hop:(j0 + S - 3) * hop])
        tm.append(lm[j0 + 2:j0 + S - 5])   # steps whose 512-sample windows lie inside the target
    return torch.as_tensor(np.stack(mels)), torch.as_tensor(np.stack(wav)), torch.as_tensor(np.stack(tm))


def train_vocoder(r: VocoderRecipe = VocoderRecipe(), cfg: VocoderConfig = VocoderConfig(), log=print,
                  data: list | None = None) -> Vocoder:
    """A vocoder trained by recipe `r` (module docstring); `log` gets a line every 100 steps."""
    torch.manual_seed(r.seed)
    rng = np.random.default_rng(r.seed)
    t0 = time.time()
    data = corpus(r.utterances, r.seed) if data is None else data
    log(f"corpus: {len(data)} utterances, {sum(len(a) for a, _ in data) / 16000:.0f} s, {time.time() - t0:.0f} s to make")
    v = Vocoder(cfg)
    opt = torch.optim.Adam(v.parameters(), lr=r.lr, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, r.steps) / r.steps)))
    C, hop = cfg.context, cfg.hop
    for step in range(r.steps):
        mel, wav, tm = batch(data, rng, r, cfg)
        y = v(mel)[:, C * hop:C * hop + wav.shape[1]]
        loss = spectral_loss(y, wav)
        if r.mel_weight:
            loss = loss + r.mel_weight * mel_loss(y[:, 2 * hop - 256:], tm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(v.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == r.steps - 1:
            log(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return v.eval()


def recipe_meta(r: VocoderRecipe) -> dict:
    return {"recipe": str(asdict(r)), "trainer": "stages.train.vocoder.train_vocoder"}
