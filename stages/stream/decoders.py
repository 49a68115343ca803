"""The latent codec of a stream: what encodes the reference image and decodes generated chunks.

A checkpoint trained on PCA-codec latents (stages/train/data.py) records its codec file in its
"sampling" metadata; `PCADecoder` puts that codec behind the interface the session uses for TAEHV
(models/taehv.py):

    dec.config.latent_channels
    dec.encode_video(frames)        # [N, T, 3, H, W] in [0, 1] -> [N, T', C, H/8, W/8]
    dec.stream_decoder().push(z)    # [N, t, C, h, w] -> the frames they complete, [N, T, 3, H, W] in [0, 1]

The PCA codec codes each latent frame on its own (the first frame alone, every later one from a group
of 4 frames), so streaming decode needs no state beyond "is this the first chunk".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.pca_codec import PCACodec
from stages.stream.events import StreamError


@dataclass(frozen=True)
class _Config:
    latent_channels: int


class PCADecoder:
    def __init__(self, codec: PCACodec):
        self.codec = codec.eval()
        self.config = _Config(codec.channels)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "PCADecoder":
        path = Path(path)
        if not path.is_file():
            raise StreamError(f"the checkpoint was trained on the PCA codec {path}, which is missing")
        return cls(PCACodec.load(path).to(device))

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, 1 + 4k, 3, H, W] in [0, 1] -> [N, 1 + k, C, H/8, W/8]."""
        z = self.codec.encode(frames.permute(0, 2, 1, 3, 4).float() * 2 - 1)     # [N, C, 1 + k, h, w]
        return z.permute(0, 2, 1, 3, 4)

    def stream_decoder(self) -> "PCAStreamDecoder":
        return PCAStreamDecoder(self.codec)


class PCAStreamDecoder:
    def __init__(self, codec: PCACodec):
        self.codec = codec
        self.frames_decoded = 0

    @torch.no_grad()
    def push(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [N, t, C, h, w] -> frames [N, 4t (4t - 3 on the first push), 3, 8h, 8w] in [0, 1]."""
        z = latents.permute(0, 2, 1, 3, 4).float()                              # [N, C, t, h, w]
        first = self.frames_decoded == 0
        if not first:                                 # decode() codes latent frame 0 as a first frame
            z = torch.cat([torch.zeros_like(z[:, :, :1]), z], 2)
        video = self.codec.decode(z)                                             # [N, 3, T, H, W] in [-1, 1]
        if not first:
            video = video[:, :, 1:]
        self.frames_decoded += video.shape[2]
        return ((video + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)
