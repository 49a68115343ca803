"""A linear video codec fitted by PCA: the autoencoder to use when no pretrained Wan VAE / TAEHV
weights are at hand (e.g. training the `small` preset on the synthetic avatar world here).

Same latent geometry as the Wan2.1 VAE: 8x spatial, 4x temporal, causal 1 + 4k frames (the first
frame coded alone, later frames in groups of 4), `channels` latent channels. Each 8x8 patch of one
frame (192 values) or of 4 frames (768 values) is projected on its top principal components, whitened
to unit variance; decoding is the transpose. Fitted in seconds; stored as a safetensors file.

    codec = PCACodec.fit(videos)             # videos: [N, 3, 1 + 4k, H, W] in [-1, 1]
    z = codec.encode(video); video_hat = codec.decode(z)
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

P, TG = 8, 4          # spatial patch, temporal group


def _patches(x: torch.Tensor, t: int) -> torch.Tensor:
    """[B, 3, T, H, W] with T = k * t -> [B, k, H/P, W/P, 3 * t * P * P]."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // t, t, H // P, P, W // P, P)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, T // t, H // P, W // P, C * t * P * P)


def _unpatch(p: torch.Tensor, t: int) -> torch.Tensor:
    B, k, h, w, _ = p.shape
    x = p.reshape(B, k, h, w, 3, t, P, P).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(B, 3, k * t, h * P, w * P)


class PCACodec(nn.Module):
    def __init__(self, channels: int = 16):
        super().__init__()
        self.channels = channels
        for name, d in (("first", 3 * P * P), ("rest", 3 * TG * P * P)):
            self.register_buffer(f"{name}_mean", torch.zeros(d))
            self.register_buffer(f"{name}_basis", torch.zeros(d, channels))    # columns: components
            self.register_buffer(f"{name}_std", torch.ones(channels))

    @classmethod
    @torch.no_grad()
    def fit(cls, videos: torch.Tensor, channels: int = 16) -> "PCACodec":
        codec = cls(channels)
        codec._check(videos)
        for name, data in (("first", _patches(videos[:, :, :1].float(), 1)),
                           ("rest", _patches(videos[:, :, 1:].float(), TG))):
            flat = data.reshape(-1, data.shape[-1]).double()
            mean = flat.mean(0)
            _, s, vh = torch.linalg.svd(flat - mean, full_matrices=False)
            std = s[:channels] / (flat.shape[0] - 1) ** 0.5
            getattr(codec, f"{name}_mean").copy_(mean.float())
            getattr(codec, f"{name}_basis").copy_(vh[:channels].T.float())
            getattr(codec, f"{name}_std").copy_(std.clamp_min(1e-6).float())
        return codec

    def _check(self, video: torch.Tensor) -> None:
        B, C, T, H, W = video.shape
        if C != 3 or (T - 1) % TG or H % P or W % P:
            raise ValueError(f"video must be [B, 3, 1 + 4k, H, W] with H, W multiples of 8; got {list(video.shape)}")

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1 + 4k, H, W] in [-1, 1] -> [B, channels, 1 + k, H/8, W/8] (unit-variance channels)."""
        self._check(video)
        parts = []
        for name, data in (("first", _patches(video[:, :, :1].float(), 1)), ("rest", _patches(video[:, :, 1:].float(), TG))):
            z = (data - getattr(self, f"{name}_mean")) @ getattr(self, f"{name}_basis") / getattr(self, f"{name}_std")
            parts.append(z)
        return torch.cat(parts, 1).permute(0, 4, 1, 2, 3)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[B, channels, 1 + k, h, w] -> [B, 3, 1 + 4k, 8h, 8w] (not clamped)."""
        z = z.float().permute(0, 2, 3, 4, 1)
        out = []
        for name, zz, t in (("first", z[:, :1], 1), ("rest", z[:, 1:], TG)):
            if zz.shape[1] == 0:
                continue
            p = (zz * getattr(self, f"{name}_std")) @ getattr(self, f"{name}_basis").T + getattr(self, f"{name}_mean")
            out.append(_unpatch(p, t))
        return torch.cat(out, 2)

    def save(self, path: str | Path) -> Path:
        from models.checkpoint import save_safetensors
        return save_safetensors(path, self.state_dict(), {"format": "vidu-pca-codec", "channels": self.channels})

    @classmethod
    def load(cls, path: str | Path) -> "PCACodec":
        from models.checkpoint import load_into, read_metadata, read_state_dict
        meta = read_metadata(path)
        codec = cls(int(meta.get("channels", 16)))
        return load_into(codec, read_state_dict(path), what=f"codec {Path(path).name}")
