"""Audio metrics of generated speech (issue 19): seams at chunk edges, and how far a waveform's log-mel
is from the log-mel it was made from.

- `spectral_flux(wave)`: per STFT frame (n_fft 256, hop 64 at 16 kHz: 16 ms windows, 4 ms apart) the
  mean over bins of |log|X_t| - log|X_t-1||, magnitudes floored at 1e-4 of the clip's largest (so
  silence does not count as change); frames more than 50 dB under the loudest are marked inactive.
- `edge_flux_ratio(wave, edges)`: mean flux of the active frames whose window holds a chunk edge
  over the mean flux of the other active frames. ~1: nothing happens at the edges that does not
  happen elsewhere; a click or a phase jump at each edge lifts it (per-chunk Griffin-Lim: see
  benchmarks/RESULTS.md, 2026-12-04 session 41).
- `logmel_l1(wave, log_mel)`: mean |log-mel(wave) - log_mel| over the steps both have (models/audio.py's
  mel, steps centred at j * hop).
"""
from __future__ import annotations

import numpy as np

N_FFT, HOP = 256, 64
ACTIVE_DB = 50.0


def spectral_flux(wave: np.ndarray, n_fft: int = N_FFT, hop: int = HOP) -> tuple[np.ndarray, np.ndarray]:
    """(flux [F], active [F] bool) for frames 1 .. F of `wave`; frame t covers samples t * hop .. t * hop + n_fft."""
    x = np.asarray(wave, np.float64)
    if len(x) < n_fft + hop:
        raise ValueError(f"need at least {n_fft + hop} samples, got {len(x)}")
    idx = np.arange(n_fft)[None] + hop * np.arange((len(x) - n_fft) // hop + 1)[:, None]
    mag = np.abs(np.fft.rfft(x[idx] * np.hanning(n_fft), axis=1))
    floor = 1e-4 * mag.max() + 1e-12
    logm = np.log(np.maximum(mag, floor))
    flux = np.abs(np.diff(logm, axis=0)).mean(1)
    energy = 10 * np.log10((mag ** 2).sum(1) + 1e-20)
    active = energy[1:] > energy.max() - ACTIVE_DB
    return flux, active


def edge_flux_ratio(wave: np.ndarray, edges, n_fft: int = N_FFT, hop: int = HOP) -> float:
    """Mean flux at frames whose window holds an edge sample over the mean flux elsewhere (active frames)."""
    flux, active = spectral_flux(wave, n_fft, hop)
    start = (np.arange(len(flux)) + 1) * hop
    at = np.zeros(len(flux), bool)
    for e in edges:
        at |= (start <= e) & (e < start + n_fft)
    a, b = at & active, ~at & active
    if not a.any() or not b.any():
        raise ValueError("no active frames at the edges or away from them")
    return float(flux[a].mean() / flux[b].mean())


def logmel_l1(wave: np.ndarray, log_mel: np.ndarray) -> float:
    """Mean |log-mel(wave) - log_mel| (natural log, [T, n_mels]) over their common steps."""
    from stages.synth.voice import log_mel as mel_of

    m = mel_of(np.asarray(wave, np.float32))
    T = min(len(m), len(log_mel))
    return float(np.abs(m[:T] - log_mel[:T]).mean())
