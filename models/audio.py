"""Audio aligned to latent frames: conditioning features and the joint-branch audio latent.

Timeline: latent frame i covers video frames 4i-3 .. 4i (latent 0 covers frame 0 and three frames of
silence before it), i.e. `mel_per_latent` = 16 log-mel steps of 10 ms at 16 kHz / 25 fps. One
windowing (`per_latent`) serves every feature: log-mel (the default) and wav2vec2 hidden states
(resampled to the mel rate).

The joint audio latent (x = [v; a], eq. 1 of the paper) is the normalised log-mel of each latent
frame split into `tokens` groups of consecutive steps; `to_waveform` goes back with Griffin-Lim, or
with a TorchScript vocoder loaded from a local path (log-mel [B, n_mels, T] -> wave [B, T*hop]).
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from models.config import AudioConfig

LOG_FLOOR = math.log(1e-5)
LOGMEL_CENTER, LOGMEL_SCALE = -4.0, 4.0   # fixed affine map of natural-log mel to roughly [-2, 2]


@lru_cache(maxsize=4)
def _mel(cfg: AudioConfig):
    from torchaudio.transforms import MelSpectrogram
    return MelSpectrogram(cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop,
                          n_mels=cfg.n_mels, center=True, power=2.0)


def logmel(wave: torch.Tensor, cfg: AudioConfig = AudioConfig()) -> torch.Tensor:
    """wave: [N] float at cfg.sample_rate -> [T, n_mels] normalised log-mel, T = N // hop + 1."""
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform [N], got shape {tuple(wave.shape)}")
    m = _mel(cfg)(wave.float()).clamp_min(1e-5).log().T
    return (m - LOGMEL_CENTER) / LOGMEL_SCALE


def latent_frames_for(samples: int, cfg: AudioConfig = AudioConfig()) -> int:
    """How many latent frames a clip of `samples` audio samples spans (1 + 4k video frames)."""
    video_frames = max(1, math.floor(samples / cfg.sample_rate * cfg.fps))
    return 1 + (video_frames - 1) // cfg.video_frames_per_latent


def per_latent(steps: torch.Tensor, n_latent: int, cfg: AudioConfig = AudioConfig(), pad_value: float | None = None) -> torch.Tensor:
    """steps: [T, D] features at the mel rate (step j at j*hop) -> [n_latent, mel_per_latent, D].
    Missing steps (before the clip, after its end) are filled with `pad_value` (default: log-mel silence)."""
    M = cfg.mel_per_latent
    lead = M - cfg.mel_per_video_frame                  # latent 0 starts 3 video frames before frame 0
    need = n_latent * M
    pad = (LOG_FLOOR - LOGMEL_CENTER) / LOGMEL_SCALE if pad_value is None else pad_value
    body = steps[: need - lead]
    out = torch.full((need, steps.shape[1]), pad, dtype=steps.dtype, device=steps.device)
    out[lead: lead + body.shape[0]] = body
    return out.view(n_latent, M, -1)


def audio_features(wave: torch.Tensor, n_latent: int, cfg: AudioConfig = AudioConfig(),
                   encoder: "Wav2Vec2Features | None" = None) -> torch.Tensor:
    """Conditioning features [n_latent, mel_per_latent, D]: log-mel (D = n_mels) or wav2vec2 states."""
    if encoder is None:
        return per_latent(logmel(wave, cfg), n_latent, cfg)
    return per_latent(encoder(wave, cfg), n_latent, cfg, pad_value=0.0)


def audio_latent(wave: torch.Tensor, n_latent: int, tokens: int, cfg: AudioConfig = AudioConfig()) -> torch.Tensor:
    """Joint-branch latent [n_latent, tokens, mel_per_latent // tokens * n_mels]."""
    if cfg.mel_per_latent % tokens:
        raise ValueError(f"{cfg.mel_per_latent} mel steps per latent frame do not split into {tokens} tokens")
    return per_latent(logmel(wave, cfg), n_latent, cfg).reshape(n_latent, tokens, -1)


def latent_to_logmel(lat: torch.Tensor, cfg: AudioConfig = AudioConfig()) -> torch.Tensor:
    """[n_latent, tokens, C] -> natural-log mel [T, n_mels] on the clip's own timeline (lead removed)."""
    steps = lat.reshape(-1, cfg.n_mels)
    lead = cfg.mel_per_latent - cfg.mel_per_video_frame
    return steps[lead:] * LOGMEL_SCALE + LOGMEL_CENTER


def to_waveform(lat: torch.Tensor, cfg: AudioConfig = AudioConfig(), vocoder: "Vocoder | None" = None,
                n_iter: int = 32) -> torch.Tensor:
    """Joint audio latent -> waveform [N] at cfg.sample_rate (Griffin-Lim unless a vocoder is given)."""
    log_mel = latent_to_logmel(lat.float(), cfg)
    return _griffin_lim(log_mel, cfg, n_iter) if vocoder is None else vocoder(log_mel)


@lru_cache(maxsize=4)
def _inverse(cfg: AudioConfig, n_iter: int):
    from torchaudio.transforms import GriffinLim, InverseMelScale
    inv = InverseMelScale(cfg.n_fft // 2 + 1, n_mels=cfg.n_mels, sample_rate=cfg.sample_rate, driver="gelsd")
    gl = GriffinLim(n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop, power=2.0, n_iter=n_iter,
                    rand_init=False)
    return inv, gl


def _griffin_lim(log_mel: torch.Tensor, cfg: AudioConfig, n_iter: int) -> torch.Tensor:
    """natural-log mel [T, n_mels] -> waveform [(T - 1) * hop]."""
    inv, gl = _inverse(cfg, n_iter)
    return gl(inv(log_mel.exp().T))


class Vocoder:
    """A TorchScript vocoder from a local file: log-mel [B, n_mels, T] -> waveform [B, samples]."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocoder not found: {path} (give a TorchScript file: log-mel -> waveform)")
        self.module = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def __call__(self, log_mel: torch.Tensor) -> torch.Tensor:
        return self.module(log_mel.T[None]).reshape(-1)


class Wav2Vec2Features:
    """wav2vec2-family hidden states (transformers, from a local directory), resampled to the mel rate."""

    def __init__(self, path: str | Path, layer: int = -1, device: str = "cpu"):
        from transformers import AutoFeatureExtractor, AutoModel
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"wav2vec2 model directory not found: {path}")
        self.extractor = AutoFeatureExtractor.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.layer, self.device = layer, device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, wave: torch.Tensor, cfg: AudioConfig = AudioConfig()) -> torch.Tensor:
        inputs = self.extractor(wave.numpy(), sampling_rate=cfg.sample_rate, return_tensors="pt")
        out = self.model(inputs.input_values.to(self.device), output_hidden_states=True)
        h = out.hidden_states[self.layer][0].float().cpu()        # [T_w2v, D] at ~50 Hz
        steps = wave.shape[0] // cfg.hop + 1
        return F.interpolate(h.T[None], size=steps, mode="linear", align_corners=False)[0].T


def window_features(window: torch.Tensor, n_latent: int, cfg: AudioConfig = AudioConfig()) -> torch.Tensor:
    """Streaming form of `audio_features`: `window` holds exactly the samples of `n_latent` consecutive
    latent frames (n_latent * samples_per_latent; for the stream's first frame, the 3 lead-in video
    frames are zeros) -> [n_latent, mel_per_latent, n_mels]. Edges use the STFT's reflection padding."""
    need = n_latent * cfg.samples_per_latent
    if window.shape[0] != need:
        raise ValueError(f"window has {window.shape[0]} samples; {n_latent} latent frames need {need}")
    return logmel(window, cfg)[: n_latent * cfg.mel_per_latent].reshape(n_latent, cfg.mel_per_latent, -1)


def chunk_waveform(lat: torch.Tensor, first: bool, cfg: AudioConfig = AudioConfig(), vocoder: "Vocoder | None" = None,
                   n_iter: int = 16) -> torch.Tensor:
    """A streamed chunk's joint audio latent [F, tokens, C] -> the samples that play with its video
    frames (the first chunk drops its lead-in)."""
    n = lat.shape[0]
    samples = n * cfg.samples_per_latent - (cfg.samples_per_latent - cfg.hop * cfg.mel_per_video_frame if first else 0)
    log_mel = lat.float().reshape(-1, cfg.n_mels) * LOGMEL_SCALE + LOGMEL_CENTER
    if first:
        log_mel = log_mel[cfg.mel_per_latent - cfg.mel_per_video_frame:]
    wave = _griffin_lim(log_mel, cfg, n_iter) if vocoder is None else vocoder(log_mel)
    return wave[:samples] if wave.shape[0] >= samples else F.pad(wave, (0, samples - wave.shape[0]))
