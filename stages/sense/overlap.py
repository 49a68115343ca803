"""Overlapped-speech detector: per 10 ms frame, P(two or more voices at once).

A small CNN on log-mel frames, trained by benchmarks/overlap_detector.py on mixtures made on the fly
(espeak-ng TTS voices of the train split and synthetic formant voices: two voices at once at -7..7 dB,
against turn-taking with short gaps, one voice over a music bed, one voice with noise or reverb,
silence); its weights ship in the package (overlap.safetensors, bf16, 66k weights, 136 kB; made by
`python benchmarks/overlap_detector.py --steps 550 --batch 16 --ship`, 14 min on 2 shared CPU cores).
Nothing is downloaded and nothing trains at run time. `vidu diarize` uses it by default inside the AND
rule (a frame is overlap where this detector at `--overlap-threshold P`, default 0.5, and diarize's
embedding-spread heuristic both flag it); the measurements are in stages/diarize.py's module doc.

Features: 64 log-mel bands (25 ms Hann window, hop 10 ms, 50-8000 Hz) in dB relative to the clip's
95th-percentile frame level, clipped to [-80, 10] dB and scaled by 1/20 (gain invariant).
Net: three 3x3 conv blocks over (mel, time) that pool the mel axis 64 -> 8, then three dilated
1-D convolutions over time (receptive field ~0.6 s), then one logit per frame.

    probs = overlap_probs(audio)                    # [T] per 10 ms frame, 16 kHz mono float32 in
    overlap_regions(probs, threshold=0.5)           # [(start s, end s)], smoothed, short runs dropped
    overlap_regions(probs, 0.5, peak=0.85)          # hysteresis: only runs that reach 0.85 somewhere
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
HOP_S = 0.01  # frame hop: frame k covers [k * HOP_S, (k + 1) * HOP_S)
N_FFT, WIN, HOP, N_MELS = 512, 400, 160, 64
FMIN, FMAX = 50.0, 8000.0
REF_PERCENTILE, FLOOR_DB, CEIL_DB = 95, -80.0, 10.0
SMOOTH_S = 0.15  # median filter of the frame probabilities
MIN_OVERLAP_S = 0.2  # shorter runs over the threshold are dropped
WEIGHTS = Path(__file__).with_name("overlap.safetensors")


def _torch():
    import torch

    return torch


@functools.cache
def _mel_fb():
    import torchaudio

    return torchaudio.functional.melscale_fbanks(N_FFT // 2 + 1, FMIN, FMAX, N_MELS, SAMPLE_RATE, norm="slaney",
                                                 mel_scale="slaney")  # [257, 64]


def log_mel(audio):
    """[B, N] (or [N]) 16 kHz audio (numpy or torch) -> [B, N_MELS, T] features, T = N // HOP."""
    torch = _torch()
    x = torch.as_tensor(np.asarray(audio, np.float32) if not isinstance(audio, torch.Tensor) else audio).float()
    x = x[None] if x.ndim == 1 else x
    T = x.shape[1] // HOP
    spec = torch.stft(x, N_FFT, HOP, WIN, torch.hann_window(WIN, device=x.device), center=True, return_complex=True)
    power = spec.abs() ** 2  # [B, 257, T + 1]
    mel = torch.einsum("bft,fm->bmt", power[..., :T], _mel_fb().to(x.device))
    db = 10 * torch.log10(mel + 1e-10)  # [B, 64, T]
    level = 10 * torch.log10(mel.sum(1) + 1e-10)  # [B, T]
    ref = torch.quantile(level, REF_PERCENTILE / 100, dim=1)  # [B]
    return ((db - ref[:, None, None]).clamp(FLOOR_DB, CEIL_DB) / 20.0)


def build_net():
    """The detector: [B, N_MELS, T] features -> [B, T] logits."""
    torch = _torch()
    nn = torch.nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d((2, 1))]

    class OverlapNet(nn.Module):
        def __init__(self, c=(8, 16, 32), d=48):
            super().__init__()
            self.conv = nn.Sequential(*block(1, c[0]), *block(c[0], c[1]), *block(c[1], c[2]))  # mel 64 -> 8
            F = c[2] * N_MELS // 8
            self.temporal = nn.Sequential(
                nn.Conv1d(F, d, 3, padding=1, bias=False), nn.BatchNorm1d(d), nn.ReLU(),
                nn.Conv1d(d, d, 5, padding=4, dilation=2, bias=False), nn.BatchNorm1d(d), nn.ReLU(),
                nn.Conv1d(d, d, 5, padding=8, dilation=4, bias=False), nn.BatchNorm1d(d), nn.ReLU(),
                nn.Conv1d(d, 1, 1))

        def forward(self, feats):  # feats: [B, M, T]
            h = self.conv(feats[:, None])  # [B, C, M / 8, T]
            return self.temporal(h.flatten(1, 2))[:, 0]  # [B, T]

    return OverlapNet()


def save_weights(net, path: Path = WEIGHTS) -> None:
    from safetensors.torch import save_file

    torch = _torch()
    save_file({k: v.detach().cpu().to(torch.bfloat16).contiguous() for k, v in net.state_dict().items()
               if v.dtype.is_floating_point}, str(path))


@functools.cache
def load_detector(path: str | None = None):
    """The shipped detector (eval mode, float32). Fails with a specific message if the file is missing."""
    from safetensors.torch import load_file

    p = Path(path) if path else WEIGHTS
    if not p.is_file():
        raise FileNotFoundError(f"overlap detector weights not found: {p} (train with benchmarks/overlap_detector.py --ship)")
    net = build_net()
    state = {k: v.float() for k, v in load_file(str(p)).items()}
    net.load_state_dict(state, strict=False)  # num_batches_tracked is not shipped
    missing = set(k for k, v in net.state_dict().items() if v.dtype.is_floating_point) - set(state)
    if missing:
        raise ValueError(f"{p}: missing detector tensors {sorted(missing)[:3]}")
    return net.eval()


def overlap_probs(audio: np.ndarray, net=None) -> np.ndarray:
    """P(overlap) per 10 ms frame of 16 kHz mono audio, [len(audio) // 160] float32."""
    torch = _torch()
    if len(audio) < WIN:
        return np.zeros(len(audio) // HOP, np.float32)
    net = net if net is not None else load_detector()
    with torch.no_grad():
        return torch.sigmoid(net(log_mel(audio)))[0].numpy().astype(np.float32)


def smooth_probs(probs: np.ndarray, smooth_s: float = SMOOTH_S) -> np.ndarray:
    """Frame probabilities [T] median-filtered over `smooth_s`."""
    from scipy.ndimage import median_filter

    if len(probs) == 0:
        return probs
    return median_filter(probs, size=max(1, round(smooth_s / HOP_S)) | 1, mode="nearest")


def overlap_regions(probs: np.ndarray, threshold: float = 0.5, smooth_s: float = SMOOTH_S,
                    min_s: float = MIN_OVERLAP_S, smoothed: np.ndarray | None = None,
                    peak: float | None = None) -> list[tuple[float, float]]:
    """Runs of median-smoothed frame probabilities over `threshold` lasting at least `min_s`
    (`smoothed`: smooth_probs(probs, smooth_s) when the caller has it already). `peak` (hysteresis):
    only runs whose highest smoothed probability reaches `peak` are kept (their extent is still set
    by `threshold`); None keeps every run."""
    p = smooth_probs(probs, smooth_s) if smoothed is None else smoothed
    on = np.r_[False, p > threshold, False]
    edges = np.flatnonzero(np.diff(on.astype(np.int8)))
    return [(s * HOP_S, e * HOP_S) for s, e in zip(edges[::2], edges[1::2])
            if (e - s) * HOP_S >= min_s - 1e-9 and (peak is None or p[s:e].max() >= peak)]
