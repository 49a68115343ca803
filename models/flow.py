"""Flow-matching noise schedule (Wan2.1's): x_t = (1 - s) x_0 + s eps, the model predicts the
velocity v = eps - x_0, timestep = 1000 s, and Wan's shift s' = k s / (1 + (k - 1) s) spends more
steps at high noise.

    sig = sigmas(3, shift=SHIFT)        # few-step sampling: [1.0, 0.909, 0.714]
    x0 = x0_from_velocity(x_t, v, s)    # what a denoising step keeps
"""
from __future__ import annotations

import torch

# Wan2.1's shift: the default of training (ObjectiveSettings), sampling and streaming (StreamSettings);
# a vidu checkpoint records the one it was trained with
SHIFT = 5.0


def shift_sigma(s: torch.Tensor | float, shift: float) -> torch.Tensor:
    s = torch.as_tensor(s, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def sigmas(steps: int, shift: float = SHIFT) -> list[float]:
    """Noise levels of a `steps`-step sampler, from pure noise down (the final 0 is not included)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    return [float(v) for v in shift_sigma(s, shift)]


def step_at_level(level: float | None, steps: int, shift: float = SHIFT) -> int | None:
    """The first intermediate step (0 .. steps - 2) of `sigmas(steps, shift)` whose noise level is at
    most `level` (where a TwinCache takes its noisy cache), or None."""
    if level is None:
        return None
    sig = sigmas(steps, shift)
    return next((k for k in range(steps - 1) if sig[k] <= level + 1e-9), None)


def timestep(sigma: float | torch.Tensor) -> torch.Tensor | float:
    return sigma * 1000.0


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    return (1 - sigma) * x0 + sigma * noise


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    return x_t - sigma * v
