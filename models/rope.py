"""3-axis rotary position embedding as in Wan2.1: the head dim's rotation pairs are split between the
frame, height and width axes (frame gets c - 2*(c//3) pairs, height and width c//3 each, c = D/2).

Positions are explicit integer triples per token ([L, 3]: frame, row, column), so a caller can
re-rotate cached pre-RoPE keys to new positions (streaming with a sliding window).
"""
from __future__ import annotations

import functools

import torch

from vidu_kernels.qk_rope import rope_reference as apply_rope  # noqa: F401  (x [B, L, H, D] rotated; one definition)


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def inv_freqs(head_dim: int, theta: float = 10000.0) -> list[torch.Tensor]:
    """Per axis, the rotation frequencies (float64), as Wan's rope_params for dims 2*pairs."""
    out = []
    for pairs in axis_pairs(head_dim):
        dim = 2 * pairs
        out.append(1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return out


@functools.lru_cache(maxsize=8)
def _device_freqs(head_dim: int, device: torch.device) -> list[torch.Tensor]:
    with torch.inference_mode(False):   # cached: must serve training too, even if first built under inference
        return [f.to(device) for f in inv_freqs(head_dim)]


def rope_angles(pos: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pos: [L, 3] integer positions -> (cos, sin), each [L, D/2] float32."""
    freqs = _device_freqs(head_dim, pos.device)
    p = pos.to(torch.float64)
    ang = torch.cat([torch.outer(p[:, i], freqs[i]) for i in range(3)], dim=1)
    return ang.cos().float(), ang.sin().float()


def grid_positions(frames: torch.Tensor, h: int, w: int, extra: int = 0) -> torch.Tensor:
    """Positions of a frame-major token layout: for each frame position in `frames`, h*w grid tokens
    (row, column), then `extra` tokens at (frame, h, j): the joint audio tokens, on a row of their own
    below the image so they never share a position with a video token. Returns [F*(h*w+extra), 3]."""
    dev = frames.device
    rows = torch.arange(h, device=dev).repeat_interleave(w)
    cols = torch.arange(w, device=dev).repeat(h)
    per_frame = torch.stack([rows, cols], dim=1)
    if extra:
        per_frame = torch.cat([per_frame, torch.stack([torch.full((extra,), h, dtype=torch.long, device=dev),
                                                       torch.arange(extra, device=dev)], dim=1)])
    S = per_frame.shape[0]
    f = frames.to(torch.long).repeat_interleave(S)[:, None]
    return torch.cat([f, per_frame.repeat(len(frames), 1)], dim=1)


@functools.lru_cache(maxsize=16)
def grid_tables(frames: tuple[int, ...], h: int, w: int, extra: int, head_dim: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grid_positions of the frame positions `frames` and their rope_angles (pos, cos, sin), on `device`,
    built once per layout. A stream's chunks repeat a few layouts; built anew, every forward would copy host
    tensors to the device, and a copy from pageable host memory waits for everything queued on the GPU before
    it. A layout whose lowest frame f0 is above 0 (a stream's chunk at its absolute position, hours in) is the
    layout moved down to 0 (built once) shifted by f0 on the device: no copy however far the stream has run.
    Angles are computed in float64 (rope_angles), so positions of 10^6 frames rotate as exactly as small ones.
    The tensors are shared: never modify them."""
    with torch.inference_mode(False):   # cached: must serve training too, even if first built under inference
        lo = min(frames, default=0)
        if lo > 0:
            pos = grid_tables(tuple(f - lo for f in frames), h, w, extra, head_dim, device)[0].clone()
            pos[:, 0] += lo
        else:
            pos = grid_positions(torch.tensor(frames, dtype=torch.long), h, w, extra).to(device)
        return (pos, *rope_angles(pos, head_dim))


def frame_shift_angles(shift: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [1, D/2] that move keys already rotated to their positions by `shift` frames (rows and
    columns kept): rotations compose, so apply_rope with these equals rotating the keys before RoPE to
    their frame positions + shift (up to rounding). Built on the device (no host copy)."""
    pos = torch.zeros(1, 3, dtype=torch.long, device=device)
    pos[:, 0] = shift
    return rope_angles(pos, head_dim)
