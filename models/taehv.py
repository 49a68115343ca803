"""TAEHV: a tiny causal video autoencoder for Wan 2.1 latents (taew2_1 layout), for live previews.

A re-implementation of madebyollin/taehv (taehv.py, `TAEHV` with its default layout): the same
`encoder.*` / `decoder.*` nn.Sequential indices and parameter shapes, so taew2_1 weights load with
no renaming. 16 latent channels, 8x spatial and 4x temporal compression; ~11.3 M parameters.
`TAEHVConfig` also describes the slimmer autoencoders trained here (stages/train/autoencoder.py): other
widths, the Wan frame layout (`pad_start`: latent 0 is frame 0 alone, then groups of 4) and
per-channel latent statistics, so that `encode_video` gives unit-variance latents for the DiT.

Every block acts on single frames except MemBlock, which also sees its own input at the previous
time step (zeros before the first), so the whole network is causal in time. That allows
- `decode_video` / `encode_video`: the whole clip at once (all frames batched through each block);
- `stream_decoder().push(chunk)`: the same decode, chunk by chunk, keeping one frame per MemBlock;
  concatenated outputs equal `decode_video` of the concatenated latents.

Frames are NTCHW in [0, 1]; latents are NTCHW, unnormalised (as the Wan 2.1 DiT produces them).

    model = TAEHV(); model.load_state_dict(sd)          # sd: taew2_1 weights, no prefix
    video = model.decode_video(latents)                 # [N, 4T-3, 3, 8H, 8W]
    stream = model.stream_decoder()
    for chunk in latent_chunks: show(stream.push(chunk))
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

IMAGE_CHANNELS = 3


@dataclass(frozen=True)
class TAEHVConfig:
    latent_channels: int = 16
    encoder_width: int = 64
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64)  # per decoder stage, last is the RGB head's input
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)  # TPool stride 2 per stage
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)  # TGrow stride 2 per stage
    # pad a clip with copies of its first frame (True: 1 + 4k frames -> 1 + k latents, latent i >= 1 codes
    # frames 4i-3..4i as the decoder lays them out) or of its last (False: taew2_1)
    pad_start: bool = False
    # per-channel statistics of the encoder's output; encode_video returns (z - mean) / std ((): none)
    latent_mean: tuple[float, ...] = ()
    latent_std: tuple[float, ...] = ()

    def __post_init__(self):
        if len(self.decoder_widths) != 4 or min(self.decoder_widths) < 1 or self.encoder_width < 1:
            raise ValueError(f"decoder_widths are 4 positive widths, not {self.decoder_widths}")
        if len(self.latent_mean) != len(self.latent_std) or len(self.latent_mean) not in (0, self.latent_channels):
            raise ValueError(f"latent_mean and latent_std hold {self.latent_channels} values each, or none")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TAEHVConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown TAEHV config fields: {', '.join(sorted(set(d) - known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def t_downscale(self) -> int:
        return 2 ** sum(self.encoder_time_downscale)

    @property
    def t_upscale(self) -> int:
        return 2 ** sum(self.decoder_time_upscale)

    @property
    def frames_to_trim(self) -> int:
        # the first latent decodes to t_upscale frames but stands for one (Wan's VAE encodes frame 0 alone)
        return self.t_upscale - 1


def conv3x3(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block whose first conv reads [x, past] on channels; past is x one step earlier."""

    def __init__(self, C: int):
        super().__init__()
        self.conv = nn.Sequential(conv3x3(2 * C, C), nn.ReLU(inplace=True), conv3x3(C, C),
                                  nn.ReLU(inplace=True), conv3x3(C, C))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        # x, past: [NT, C, H, W]
        return self.act(self.conv(torch.cat([x, past], 1)) + x)


class TPool(nn.Module):
    """Merges `stride` consecutive frames into one: [NT, C, H, W] -> [NT / stride, C, H, W]."""

    def __init__(self, C: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(C * stride, C, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        NT, C, H, W = x.shape
        # frames t..t+stride-1 of one clip become one frame with their channels side by side
        return self.conv(x.reshape(NT // self.stride, self.stride * C, H, W))


class TGrow(nn.Module):
    """Splits each frame into `stride` frames: [NT, C, H, W] -> [NT * stride, C, H, W]."""

    def __init__(self, C: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(C, C * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        NT, C, H, W = x.shape
        # output channel group s is the frame s steps after the first of this input frame
        return self.conv(x).reshape(NT * self.stride, C, H, W)


def _encoder_stage(C: int, stride: int) -> list[nn.Module]:
    return [TPool(C, stride), conv3x3(C, C, stride=2, bias=False), MemBlock(C), MemBlock(C), MemBlock(C)]


def _decoder_stage(C: int, C_out: int, stride: int) -> list[nn.Module]:
    return [MemBlock(C), MemBlock(C), MemBlock(C), nn.Upsample(scale_factor=2), TGrow(C, stride),
            conv3x3(C, C_out, bias=False)]


def build_encoder(cfg: TAEHVConfig) -> nn.Sequential:
    # indices: 0 conv, 2/7/12 TPool, 3/8/13 strided conv, 4-6/9-11/14-16 MemBlock, 17 conv to latents
    C = cfg.encoder_width
    stages = [_encoder_stage(C, 2 if down else 1) for down in cfg.encoder_time_downscale]
    return nn.Sequential(conv3x3(IMAGE_CHANNELS, C), nn.ReLU(inplace=True),
                         *(m for stage in stages for m in stage), conv3x3(C, cfg.latent_channels))


def build_decoder(cfg: TAEHVConfig) -> nn.Sequential:
    # indices: 0 Clamp, 1 conv, 3-5/9-11/15-17 MemBlock, 6/12/18 Upsample, 7/13/19 TGrow,
    # 8/14/20 conv to the next width, 22 conv to RGB
    C = cfg.decoder_widths
    stages = [_decoder_stage(C[i], C[i + 1], 2 if up else 1) for i, up in enumerate(cfg.decoder_time_upscale)]
    return nn.Sequential(Clamp(), conv3x3(cfg.latent_channels, C[0]), nn.ReLU(inplace=True),
                         *(m for stage in stages for m in stage),
                         nn.ReLU(inplace=True), conv3x3(C[3], IMAGE_CHANNELS))


def _previous_frames(x: Tensor, last: Tensor | None) -> Tensor:
    """x: [N, T, C, H, W]; the frame before each of x's, `last` ([N, C, H, W]) or zeros before x[:, 0]."""
    first = torch.zeros_like(x[:, :1]) if last is None else last[:, None]
    return torch.cat([first, x[:, :-1]], 1)


def apply_blocks(blocks: nn.Sequential, x: Tensor, memory: dict[int, Tensor] | None = None) -> Tensor:
    """Run `blocks` on x [N, T, C, H, W], all frames batched per block; returns [N, T', C', H', W'].

    memory maps a MemBlock's index to its input's last frame [N, C, H, W] from the previous call;
    it is read and updated in place. None means a fresh clip (zeros before the first frame).
    """
    N = x.shape[0]
    h = x.flatten(0, 1)
    for i, block in enumerate(blocks):
        if isinstance(block, MemBlock):
            frames = h.unflatten(0, (N, -1))
            past = _previous_frames(frames, None if memory is None else memory.get(i))
            if memory is not None:
                memory[i] = frames[:, -1].clone()  # a view would keep the whole chunk alive
            h = block(h, past.flatten(0, 1))
        else:
            h = block(h)
    return h.unflatten(0, (N, -1))


def _check_video(x: Tensor, C: int, what: str, fn: str) -> None:
    if x.ndim != 5 or x.shape[2] != C or x.shape[1] < 1:
        raise ValueError(f"{fn} expects {what} as [N, T>=1, {C}, H, W], got shape {tuple(x.shape)}")


class TAEHV(nn.Module):
    def __init__(self, config: TAEHVConfig = TAEHVConfig()):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.decoder = build_decoder(config)

    def encode_video(self, frames: Tensor) -> Tensor:
        """frames [N, T, 3, H, W] in [0, 1] -> latents [N, ceil(T / 4), 16, H/8, W/8] (pad_start:
        ceil((T + 3) / 4), so 1 + 4k frames give 1 + k latents)."""
        _check_video(frames, IMAGE_CHANNELS, "RGB frames", "encode_video")
        cfg = self.config
        if cfg.pad_start:
            frames = torch.cat([frames[:, :1].expand(-1, cfg.t_downscale - 1, -1, -1, -1), frames], 1)
        n_pad = -frames.shape[1] % cfg.t_downscale
        if n_pad:
            frames = torch.cat([frames, frames[:, -1:].expand(-1, n_pad, -1, -1, -1)], 1)
        z = apply_blocks(self.encoder, frames)
        if cfg.latent_mean:
            mean, std = self._stats(z)
            z = (z - mean) / std
        return z

    def decode_video(self, latents: Tensor, clamp: bool = True) -> Tensor:
        """latents [N, T, 16, h, w] -> frames [N, 4T - 3, 3, 8h, 8w] in [0, 1] (clamp=False: not
        clamped, for training)."""
        _check_video(latents, self.config.latent_channels, "latents", "decode_video")
        frames = apply_blocks(self.decoder, self.unnormalize(latents))[:, self.config.frames_to_trim:]
        return frames.clamp(0, 1) if clamp else frames

    def unnormalize(self, latents: Tensor) -> Tensor:
        """Latents as encode_video gives them -> as the decoder takes them."""
        if not self.config.latent_mean:
            return latents
        mean, std = self._stats(latents)
        return latents * std + mean

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        # [C, 1, 1] on like's device and dtype, broadcast over [N, T, C, h, w]
        c = self.config
        return tuple(torch.tensor(v, device=like.device, dtype=like.dtype)[:, None, None]
                     for v in (c.latent_mean, c.latent_std))

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


def frames_to_latents(codec: TAEHV, frames) -> Tensor:
    """Frames [T, H, W, 3] uint8 (numpy) -> latents [C, F, h, w] on the CPU (1 + 4k frames: 1 + k latent
    frames), coded on the codec's device."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(next(codec.parameters()).device)   # uint8 travels
    x = x.permute(0, 3, 1, 2)[None].float() / 255
    return codec.encode_video(x)[0].permute(1, 0, 2, 3).cpu()


@torch.no_grad()
def latents_to_frames(codec: TAEHV, latents: Tensor) -> np.ndarray:
    """Latents [B, C, F, h, w] (the DiT's layout) -> frames [B, 4F - 3, H, W, 3] uint8 (numpy): the
    inverse of `frames_to_latents`, batched."""
    x = codec.decode_video(latents.float().permute(0, 2, 1, 3, 4))
    return (x.permute(0, 1, 3, 4, 2) * 255 + 0.5).to(torch.uint8).cpu().numpy()


class StreamDecoder:
    """Decodes latents as they arrive; per push the cost is that of the chunk alone.

    State between pushes: the last input frame of each MemBlock (TGrow and the other blocks act on
    one frame at a time, so need none) and the count of frames decoded, for the start-up trim.
    """

    def __init__(self, model: TAEHV):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.memory: dict[int, Tensor] = {}
        self.frames_decoded = 0
        self.shape: tuple[int, int, int] | None = None  # (N, h, w) of the latents in this stream

    @torch.no_grad()
    def push(self, latents: Tensor) -> Tensor:
        """latents [N, T, 16, h, w] -> the frames they complete, [N, 4T (4T - 3 on the first push), 3, 8h, 8w]."""
        _check_video(latents, self.model.config.latent_channels, "latents", "push")
        N, _, _, h, w = latents.shape
        if self.shape is not None and self.shape != (N, h, w):
            raise ValueError(f"push got (N, h, w) = {(N, h, w)} but the stream has {self.shape}; call reset() first")
        self.shape = (N, h, w)
        frames = apply_blocks(self.model.decoder, self.model.unnormalize(latents), self.memory)
        n_trim = max(0, self.model.config.frames_to_trim - self.frames_decoded)
        self.frames_decoded += frames.shape[1]
        return frames[:, n_trim:].clamp(0, 1)
