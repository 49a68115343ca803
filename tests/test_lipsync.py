"""The latent lip-sync discriminator (stages/train/lipsync.py) on the tiny world: it separates a mouth's
own speech from shifted or foreign speech on held-out clips, the controls (shuffled labels, untrained)
stay at chance, the sync loss reaches x0_hat only inside the mouth crop, and training is deterministic.

The codec is a seeded, untrained tiny TAEHV (a real autoencoder network; no trained one is committed):
its latents still carry where and how wide the mouth is."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import preset
from models.taehv import TAEHV
from stages.train.lipsync import (LipSync, LipSyncConfig, auc, crop_mouth, evaluate, fit, load_lipsync,
                                  mouth_boxes, prepare_clips, save_lipsync, sync_loss)

CFG = preset("tiny")
LC = LipSyncConfig.for_model(CFG)
SECONDS, STEPS = 2.4, 200          # 16 latent frames a clip


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    codec = TAEHV(CFG.taehv).eval()
    return (prepare_clips(CFG, codec, 16, seed=0, seconds=SECONDS, split="train"),
            prepare_clips(CFG, codec, 8, seed=1, seconds=SECONDS, split="eval"))


@pytest.fixture(scope="module")
def trained(world):
    return fit(world[0], LC, STEPS, seed=0)


def test_separates_matched_from_mismatched_on_held_out_clips(world, trained):
    r = evaluate(trained, world[1], count=2048)
    assert r["auc_other_clip"] > 0.75 and r["auc_shifted"] > 0.65 and r["auc_window"] > 0.7, r


def test_controls_stay_at_chance(world):
    shuffled = evaluate(fit(world[0], LC, STEPS, seed=0, shuffle_labels=True), world[1], count=2048)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = evaluate(LipSync(LC).eval(), world[1], count=2048)
    for r in (shuffled, untrained):
        assert abs(r["auc_other_clip"] - 0.5) < 0.1 and abs(r["auc_shifted"] - 0.5) < 0.1, (shuffled, untrained)


def test_training_is_deterministic_and_round_trips(world, trained, tmp_path):
    again = fit(world[0], LC, STEPS, seed=0)
    for (k, a), b in zip(trained.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    other = fit(world[0], LC, 5, seed=1)
    loaded = load_lipsync(save_lipsync(tmp_path / "ls.safetensors", trained))
    assert not any(p.requires_grad for p in loaded.parameters())
    c, s = torch.randn(8, LC.channels, LC.crop, LC.crop), torch.randn(8, LC.rows, LC.mel_steps, LC.n_mels)
    assert torch.equal(loaded(c, s), trained(c, s)) and not torch.equal(other(c, s), trained(c, s))


def test_sync_loss_reaches_only_the_mouth_crop(trained):
    B, Fn = 2, 5
    h = w = CFG.height // 8
    x0_hat = torch.randn(B, LC.channels, 3, h, w, requires_grad=True)
    audio = torch.randn(B, LC.context[0] + Fn + LC.context[1], LC.mel_steps, LC.n_mels)
    audio[1] = 0.0                                                   # row 1's speech dropped for guidance
    boxes = torch.tensor([[[1, 2], [2, 2], [3, 1], [4, 4], [0, 0]]] * B)
    frames = torch.tensor([1, 2, 3])
    loss = sync_loss(x0_hat, audio, boxes, trained, frames)
    loss.backward()
    inside = torch.zeros_like(x0_hat, dtype=torch.bool)
    for j, t in enumerate(frames.tolist()):
        y, x = boxes[0, t].tolist()
        inside[0, :, j, y:y + LC.crop, x:x + LC.crop] = True
    g = x0_hat.grad
    assert loss.item() > 0 and g[inside].abs().min() > 0 and torch.equal(g[~inside], torch.zeros_like(g[~inside]))
    assert all(p.grad is None for p in trained.parameters())
    # the loss is D's: -log sigmoid of the logits of row 0's crops with their own speech rows
    crops = crop_mouth(x0_hat[:1].detach(), boxes[:1, frames], LC.crop)
    rows = torch.stack([audio[0, t:t + LC.rows] for t in frames.tolist()])
    want = -torch.nn.functional.logsigmoid(trained(crops, rows)).mean()
    assert torch.allclose(sync_loss(x0_hat.detach(), audio, boxes, trained, frames), want)


def test_mouth_boxes_follow_the_mask():
    T, H, W = 9, 64, 64                                              # 3 latent frames
    m = np.zeros((T, H, W), np.float32)
    m[0, 40:48, 16:32] = 1                                           # latent 0: video frame 0
    m[1:5, 8:16, 40:56] = 1                                          # latent 1: frames 1-4
    boxes = mouth_boxes(m, LC)                                       # latent 2: empty -> the clip's mean
    # centres (latent px) (5.5, 3.0), (1.5, 6.0), mean (3.5, 4.5); corner = centre - 2 rounded half to even, in [0, 4]
    assert boxes.tolist() == [[4, 1], [0, 4], [2, 2]]


def test_auc_reference():
    assert auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])) == 0.5
    assert auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
