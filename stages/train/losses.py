"""The video loss of both teacher stages (stages/train/objectives.py calls it once per step).

`video_loss(x0_hat, x0, sigma, batch, clip_frames)`: the model's clean-latent estimate against the
truth on the frames that count (stage 2: the current chunk), given their noise levels, the batch
(which may carry more supervision than the latents, per clip frame) and which clip frames they are.
"""
from __future__ import annotations

import torch


def video_loss(x0_hat: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, batch: dict,
               clip_frames: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """x0_hat, x0: [B, C, f, h, w] the scored frames; sigma: [B, f] their noise levels; clip_frames:
    [f] their indices in the batch's clips. Returns (loss, {name: logged value})."""
    loss = (x0_hat.float() - x0.float()).square().mean()
    return loss, {"loss_video": loss.detach()}
