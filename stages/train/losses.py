"""The video loss of both teacher stages (stages/train/objectives.py calls it once per step).

`video_loss(x0_hat, x0, sigma, batch, clip_frames, st)`: the model's clean-latent estimate against the
truth on the frames that count (stage 2: the current chunk), given their noise levels, the batch
(which may carry more supervision than the latents, per clip frame) and which clip frames they are.

    loss = mean over (B, C, f, h, w) of  w_sigma(sigma) * w_mouth(pixel) * w_eyes(pixel) * (x0_hat - x0)^2

- w_sigma, `st.loss_weight`: "x0" 1 (the x0 loss), "v" 1 / sigma^2 (the flow-matching velocity loss:
  x0_hat - x0 = -sigma (v_hat - v), so it is || v_hat - v ||^2), weighting the low-noise steps up;
- w_mouth: 1 + (st.mouth_weight - 1) * batch["mouth"], the mouth region's coverage [B, F, h, w] in
  [0, 1] at latent resolution (stages/train/data.py `latent_regions`); clips without it weigh 1;
- w_eyes: 1 + (st.eyes_weight - 1) * batch["eyes"], the same for the eyes region (lids, whites, brows).
The mean is over all elements (not normalised by the weights), so raising a region's weight changes
the gradient in that region's pixels only.

With `st.sync_weight` > 0 and a discriminator file `st.lipsync`, the sync loss is added:
sync_weight * -log sigmoid(D(mouth of x0_hat, its speech)) over the scored frames of rows that hear
speech (stages/train/lipsync.py `sync_loss`; rows whose speech condition dropout removed are left out,
since the model could not have followed it); the batch carries "mouth_box" [B, F, 2].
"""
from __future__ import annotations

import functools

import torch

LOSS_WEIGHTS = ("x0", "v")
# the weighted regions: a clip's coverage [F, h, w] under its name, weighed by ObjectiveSettings.<name>_weight
REGIONS = ("mouth", "eyes")


def sigma_weight(sigma: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, f] noise levels -> [B, f] loss weights of `kind` (LOSS_WEIGHTS)."""
    if kind == "x0":
        return torch.ones_like(sigma)
    if kind == "v":
        return sigma.float().square().reciprocal()
    raise ValueError(f"loss_weight is one of {', '.join(LOSS_WEIGHTS)}, not {kind!r}")


def video_loss(x0_hat: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, batch: dict,
               clip_frames: torch.Tensor, st) -> tuple[torch.Tensor, dict]:
    """x0_hat, x0: [B, C, f, h, w] the scored frames; sigma: [B, f] their noise levels; clip_frames:
    [f] their indices in the batch's clips; st: ObjectiveSettings (loss_weight, mouth_weight, eyes_weight).
    Returns (loss, {name: logged value})."""
    err = (x0_hat.float() - x0.float()).square()                          # [B, C, f, h, w]
    w = sigma_weight(sigma.to(err.device), st.loss_weight)[:, None, :, None, None]
    parts = {}
    for region in REGIONS:
        cover, weight = batch.get(region), getattr(st, f"{region}_weight")
        if cover is None or weight == 1:
            continue
        m = cover[:, clip_frames.to(cover.device)].float()[:, None]       # [B, 1, f, h, w]
        if m.shape[-2:] != err.shape[-2:]:
            raise ValueError(f"{region} masks are {tuple(m.shape[-2:])}; the latents are {tuple(err.shape[-2:])}")
        w = w * (1 + (weight - 1) * m)
        parts[f"{region}_share"] = m.mean().detach()
    loss = (w * err).mean()
    parts["loss_video"] = loss.detach()
    if st.sync_weight > 0:
        from stages.train.lipsync import sync_loss
        if not st.lipsync:
            raise ValueError("sync_weight > 0 needs a lip-sync discriminator file (lipsync)")
        boxes, audio = batch.get("mouth_box"), batch.get("audio")
        if boxes is None or audio is None:
            raise ValueError("the sync loss needs speech features and mouth boxes (world clips rendered with masks)")
        ls = sync_loss(x0_hat, audio, boxes, discriminator(st.lipsync, str(x0_hat.device)), clip_frames)
        loss = loss + st.sync_weight * ls
        parts["loss_sync"] = ls.detach()
    return loss, parts


@functools.lru_cache(maxsize=2)
def discriminator(path: str, device: str):
    """The frozen lip-sync discriminator of the sync loss, loaded once per run and device."""
    from stages.train.lipsync import load_lipsync
    return load_lipsync(path, device)
