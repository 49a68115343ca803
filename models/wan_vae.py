"""Wan2.1's causal video VAE (wan/modules/vae.py `WanVAE_` in Wan-Video/Wan2.1), re-written.

8x spatial and 4x temporal compression into `z_dim` channels: a video of 1 + 4k frames encodes to
1 + k latent frames. Parameter names and shapes are the reference's, so Wan2.1_VAE.pth loads as is:

    vae = WanVAE()                                  # WAN21_VAE, latent mean/std of Wan2.1
    load_into(vae, read_state_dict("Wan2.1_VAE.pth"))
    z = vae.encode(video)                           # [B, 3, 1 + 4k, H, W] -> [B, 16, 1 + k, H/8, W/8]
    video = vae.decode(z)                           # no clamp
    stream = vae.stream_decoder()                   # or frame by frame as latents arrive
    frames = stream.push(z[:, :, :1])

Every temporal operator is causal, so the reference runs the encoder on the first frame and then
chunks of 4 frames, and the decoder one latent frame at a time, carrying each causal conv's last
CACHE_T input frames from chunk to chunk. Here those caches live in a plain dict that the caller
owns ({module: tensor}); nothing is stored on the module between calls.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

CACHE_T = 2  # input frames a causal conv carries over: its temporal kernel is 3

# Wan2.1 latent statistics per channel (wan/modules/vae.py `WanVAE`); latents are (mu - mean) / std
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

# {module: what it carries to the next chunk}: a causal conv its last input frames, a temporal
# Resample its last frame (down) or the fact that it has seen the stream's first frame (up)
FeatCache = dict


def _check_stats(mean, std, z_dim: int) -> None:
    if (mean is None) != (std is None):
        raise ValueError("latent_mean and latent_std are both given or both None")
    for name, v in (("latent_mean", mean), ("latent_std", std)):
        if v is not None and len(v) != z_dim:
            raise ValueError(f"{name} has {len(v)} values but z_dim is {z_dim} (pass None for no statistics)")


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # `temperal_downsample` in Wan
    latent_mean: tuple[float, ...] | None = WAN21_LATENT_MEAN    # None: pass `scale` to encode/decode
    latent_std: tuple[float, ...] | None = WAN21_LATENT_STD

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(self.dim_mult) - 1} flags (one per "
                             f"downsampling step), got {len(self.temporal_downsample)}")
        _check_stats(self.latent_mean, self.latent_std, self.z_dim)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """From our own `asdict` or from the reference's `WanVAE_` keyword arguments."""
        d = dict(d)
        if "temperal_downsample" in d:
            d["temporal_downsample"] = d.pop("temperal_downsample")
        d.pop("dropout", None)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown VAE config fields: {', '.join(sorted(unknown))}")
        if "latent_mean" not in d and d.get("z_dim", cls.z_dim) != len(WAN21_LATENT_MEAN):
            # the reference keeps its statistics outside the config; Wan2.1's fit 16 channels only
            d["latent_mean"] = d["latent_std"] = None
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


WAN21_VAE = VAEConfig()


def _last_frames(prev: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
    if prev is not None and x.shape[2] < n:
        x = torch.cat([prev, x], 2)
    return x[:, :, -n:].clone()  # clone: a view would pin the whole chunk in memory


class CausalConv3d(nn.Conv3d):
    """Conv3d padded 2 * pad_t frames in front and none behind; with a cache, the previous
    chunk's last frames replace that zero padding, so chunked == whole-sequence."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__(c_in, c_out, kernel, stride=stride)
        pt, ph, pw = padding if isinstance(padding, tuple) else (padding,) * 3
        self.context = 2 * pt
        self.pad = (pw, pw, ph, ph, self.context, 0)  # F.pad order: W, H, T

    def forward(self, x: torch.Tensor, cache: FeatCache | None = None) -> torch.Tensor:
        pad = self.pad
        if cache is not None and self.context > 0:
            prev = cache.get(self)
            cache[self] = _last_frames(prev, x, CACHE_T)
            if prev is not None:
                x = torch.cat([prev, x], 2)
                pad = pad[:4] + (self.context - prev.shape[2], 0)
        return super().forward(F.pad(x, pad))


class RMSNorm(nn.Module):
    """x / ||x|| over channels * sqrt(C) * gamma; `ndim` trailing dims: 3 for [B, C, T, H, W], 2 per frame."""

    def __init__(self, dim: int, ndim: int = 3):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _per_frame(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # [B, C, T, H, W] -> module on [(B T), C, H, W] -> [B, C', T, H', W']
    B, C, T, H, W = x.shape
    y = module(x.transpose(1, 2).reshape(B * T, C, H, W))
    return y.reshape(B, T, *y.shape[1:]).transpose(1, 2)


class NearestUp2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32, as Wan does (its fix for nearest-exact in bfloat16)
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """2x spatial resampling per frame; the 3d modes add Wan's causal 2x temporal step.

    upsample3d: the stream's first frame passes through, every later frame becomes 2 (the two
    channel halves of `time_conv`), so T latent frames -> 1 + 2 (T - 1).
    downsample3d: the first frame passes through, later frames are taken by a stride-2 kernel-3
    conv over (previous last frame, chunk), so chunks after the first hold an even number of frames.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode {mode!r} is not one of {self.MODES}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(NearestUp2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            # pad right/bottom only: [H, W] -> [H/2, W/2] with stride 2, no padding
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: FeatCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: torch.Tensor, cache: FeatCache) -> torch.Tensor:
        first = x[:, :, :0]
        if self not in cache:
            cache[self] = True
            first, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2] == 0:
            return first
        y = self.time_conv(x, cache)  # [B, 2C, T, H, W]
        B, C2, T, H, W = y.shape
        y = y.view(B, 2, C2 // 2, T, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B, C2 // 2, 2 * T, H, W)
        return torch.cat([first, y], 2)

    def _downsample_time(self, x: torch.Tensor, cache: FeatCache) -> torch.Tensor:
        prev = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if prev is None:
            return x
        return self.time_conv(torch.cat([prev, x], 2))


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        # indices are the reference's parameter names: residual.{0,2,3,6}
        self.residual = nn.Sequential(
            RMSNorm(c_in), nn.SiLU(), CausalConv3d(c_in, c_out, 3, padding=1),
            RMSNorm(c_out), nn.SiLU(),
            nn.Identity(),  # dropout (p = 0) in Wan
            CausalConv3d(c_out, c_out, 3, padding=1))
        self.shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatCache) -> torch.Tensor:
        return self.shortcut(x) + _run(self.residual, x, cache)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, ndim=2)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)  # starts as the identity, as Wan initialises it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _per_frame(self._attend, x)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1)  # [N, 1, H W, 3C]
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v)  # [N, 1, H W, C]
        return self.proj(o.squeeze(1).transpose(1, 2).reshape(N, C, H, W))


_CACHED = (CausalConv3d, ResidualBlock, Resample)


def _run(layers: nn.Sequential, x: torch.Tensor, cache: FeatCache) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, _CACHED) else layer(x)
    return x


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(c_in), nn.SiLU(), CausalConv3d(c_in, c_out, 3, padding=1))


class Encoder3d(nn.Module):
    """[B, 3, T, H, W] -> [B, 2 z_dim, T', H/8, W/8] (mu and log-variance), chunk by chunk."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks, scale = [], 1.0
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(c_in, c_out))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(c_out))
                c_in = c_out
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(c_out, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
                scale /= 2
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor, cache: FeatCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layers in (self.downsamples, self.middle, self.head):
            x = _run(layers, x, cache)
        return x


class Decoder3d(nn.Module):
    """[B, z_dim, t, h, w] -> [B, 3, T', 8h, 8w], any number of latent frames per call."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *reversed(mult))]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks, scale = [], 1.0 / 2 ** (len(mult) - 2)
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                c_in //= 2  # the Resample before this level halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(c_in, c_out))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(c_out))
                c_in = c_out
            if i < len(mult) - 1:
                blocks.append(Resample(c_out, "upsample3d" if temporal_upsample[i] else "upsample2d"))
                scale *= 2
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: FeatCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layers in (self.middle, self.upsamples, self.head):
            x = _run(layers, x, cache)
        return x


def _channel_view(v, like: torch.Tensor) -> torch.Tensor:
    # [C] or a scalar -> broadcastable against [B, C, T, H, W]
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.view(1, -1, 1, 1, 1) if v.ndim else v


class WanVAE(nn.Module):
    def __init__(self, cfg: VAEConfig = WAN21_VAE, latent_mean=None, latent_std=None):
        """`latent_mean` / `latent_std` ([z_dim] each) override the config's statistics."""
        super().__init__()
        self.cfg = cfg
        z = cfg.z_dim
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(cfg)
        mean = cfg.latent_mean if latent_mean is None else latent_mean
        std = cfg.latent_std if latent_std is None else latent_std
        _check_stats(mean, std, z)
        # not persistent: the state dict keeps the reference's layout
        for name, v in (("latent_mean", mean), ("latent_std", std)):
            self.register_buffer(name, None if v is None else torch.as_tensor(v, dtype=torch.float32).clone(),
                                 persistent=False)

    def encode(self, video: torch.Tensor, scale=None) -> torch.Tensor:
        """video [B, 3, 1 + 4k, H, W] in [-1, 1] -> normalized mu [B, z_dim, 1 + k, H/8, W/8].

        `scale` = (mean, 1 / std), tensors [z_dim] or floats; None uses this model's statistics."""
        self._check_video(video)
        mean, inv_std = self._scale(scale)
        cache: FeatCache = {}
        T, f = video.shape[2], self.cfg.temporal_factor
        chunks = [video[:, :, :1]] + [video[:, :, i:i + f] for i in range(1, T, f)]
        h = torch.cat([self.encoder(c, cache) for c in chunks], 2)
        mu = self.conv1(h)[:, :self.cfg.z_dim]  # the other z_dim channels are the log-variance
        return (mu - _channel_view(mean, mu)) * _channel_view(inv_std, mu)

    def decode(self, z: torch.Tensor, scale=None) -> torch.Tensor:
        """Normalized latents [B, z_dim, t, h, w] -> video [B, 3, 1 + 4 (t - 1), 8h, 8w], not clamped.
        One latent frame at a time, as the reference does."""
        self._check_latents(z)
        stream = self.stream_decoder(scale)
        return torch.cat([stream.push(z[:, :, i:i + 1]) for i in range(z.shape[2])], 2)

    def stream_decoder(self, scale=None) -> "StreamDecoder":
        return StreamDecoder(self, self._scale(scale))

    def _scale(self, scale):
        if scale is not None:
            return scale
        if self.latent_mean is None:
            raise ValueError("this VAE has no latent mean/std: pass scale=(mean, 1/std) or build it with "
                             "latent_mean/latent_std")
        return self.latent_mean, 1.0 / self.latent_std

    def _check_video(self, video: torch.Tensor) -> None:
        s, f = self.cfg.spatial_factor, self.cfg.temporal_factor
        ok = video.ndim == 5 and video.shape[1] == 3
        ok = ok and (video.shape[2] - 1) % f == 0 and video.shape[3] % s == 0 and video.shape[4] % s == 0
        if not ok:
            raise ValueError(f"video must be [B, 3, T, H, W] with T = 1 + {f}k and H, W multiples of {s}; "
                             f"got {list(video.shape)}")

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.cfg.z_dim or z.shape[2] < 1:
            raise ValueError(f"latents must be [B, {self.cfg.z_dim}, t >= 1, h, w]; got {list(z.shape)}")


class StreamDecoder:
    """Decodes latent frames as they arrive, owning the decoder's feature caches.

    Concatenating the outputs of every `push` equals `WanVAE.decode` of the whole sequence: the
    first latent frame gives 1 video frame, each later one 4 (for Wan2.1's 4x temporal factor).
    """

    def __init__(self, vae: WanVAE, scale):
        self.vae = vae
        self.mean, self.inv_std = scale
        self.cache: FeatCache = {}

    def push(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, z_dim, t, h, w], t >= 1 -> their video frames [B, 3, T', 8h, 8w]."""
        self.vae._check_latents(z)
        z = z / _channel_view(self.inv_std, z) + _channel_view(self.mean, z)
        return self.vae.decoder(self.vae.conv2(z), self.cache)
