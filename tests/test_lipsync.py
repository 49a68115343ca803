"""The latent lip-sync discriminator (stages/train/lipsync.py) on the tiny world: it separates a mouth's
own speech from shifted or foreign speech on held-out clips, the controls (shuffled labels, untrained)
stay at chance, the sync loss reaches x0_hat only inside the mouth crop, and training is deterministic.

The discriminator tests read the world's real speech features and mouth tracks, with small synthetic
mouth crops in place of the codec's: a fixed latent pattern scaled by how open the mouth is in each
latent frame, plus noise (the codec path itself is measured in the report on issue 15; here
`prepare_clips` is checked for shapes on an untrained tiny TAEHV)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.audio import audio_features
from models.config import preset
from models.taehv import TAEHV
from stages.synth import make_sample
from stages.train.lipsync import (LipSync, LipSyncConfig, auc, crop_mouth, evaluate, fit, load_lipsync,
                                  mouth_boxes, prepare_clips, save_lipsync, sync_loss)

CFG = preset("tiny")
LC = LipSyncConfig.for_model(CFG)
SECONDS, STEPS, BATCH = 4.0, 150, 64          # 26 latent frames a clip


def _clips(n: int, seed: int, split: str) -> dict:
    """n world clips -> {"crops": [n, F, C, S, S], "speech": [n, before + F + after, K, A]}: crop =
    openness(t) * P + 0.3 noise, openness the mouth track averaged over latent frame t's video frames."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(LC.channels, LC.crop, LC.crop, generator=torch.Generator().manual_seed(0))
    crops, speech = [], []
    for i in range(n):
        s = make_sample(seed * 1_000_003 + i, width=32, height=32, seconds=SECONDS, split=split)
        m = torch.from_numpy(s.tracks["mouth"])
        Fn = 1 + (len(m) - 1) // 4
        open_ = torch.stack([m[max(0, 4 * t - 3): 4 * t + 1].mean() for t in range(Fn)])
        crops.append(open_[:, None, None, None] * P + 0.3 * torch.randn(Fn, *P.shape, generator=g))
        speech.append(audio_features(torch.from_numpy(s.audio), Fn, CFG.audio, context=LC.context))
    return {"crops": torch.stack(crops), "speech": torch.stack(speech)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny convolutions and the mel framing run several times slower when threads
    contend for 2 shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world():
    return _clips(12, 0, "train"), _clips(8, 1, "eval")


@pytest.fixture(scope="module")
def trained(world):
    return fit(world[0], LC, STEPS, BATCH, seed=0)


def test_separates_matched_from_mismatched_on_held_out_clips(world, trained):
    r = evaluate(trained, world[1], count=2048)
    # measured (12 training clips, 8 held-out, 150 steps): shifted 0.66, other clip 0.69, 4-frame windows 0.76
    assert r["auc_shifted"] > 0.58 and r["auc_other_clip"] > 0.6 and r["auc_window"] > 0.66, r


def test_controls_stay_at_chance(world):
    shuffled = evaluate(fit(world[0], LC, STEPS, BATCH, seed=0, shuffle_labels=True), world[1], count=2048)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = evaluate(LipSync(LC).eval(), world[1], count=2048)
    for r in (shuffled, untrained):
        assert abs(r["auc_other_clip"] - 0.5) < 0.1 and abs(r["auc_shifted"] - 0.5) < 0.1, (shuffled, untrained)


def test_training_is_deterministic_and_round_trips(world, trained, tmp_path):
    a, b, other = (fit(world[0], LC, 10, BATCH, seed=seed) for seed in (0, 0, 1))
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    loaded = load_lipsync(save_lipsync(tmp_path / "ls.safetensors", trained))
    assert not any(p.requires_grad for p in loaded.parameters())
    c, s = torch.randn(8, LC.channels, LC.crop, LC.crop), torch.randn(8, LC.rows, LC.mel_steps, LC.n_mels)
    assert torch.equal(loaded(c, s), trained(c, s)) and not torch.equal(other(c, s), a(c, s))


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


def test_prepare_clips_crops_at_the_mouth():
    torch.manual_seed(0)
    d = prepare_clips(CFG, TAEHV(CFG.taehv).eval(), 2, seed=3, seconds=0.8, split="eval")
    # 0.8 s = 21 frames = 6 latent frames; speech rows: 2 before + 6 + 1 after
    assert d["crops"].shape == (2, 6, LC.channels, LC.crop, LC.crop) and d["speech"].shape == (2, 9, 16, 80)
    s = make_sample(3 * 1_000_003, width=64, height=64, seconds=0.8, masks=True, split="eval")
    b = mouth_boxes(s.masks["mouth"], LC)
    lat_mask = torch.from_numpy(s.masks["mouth"][-1]).reshape(8, 8, 8, 8).sum((1, 3))     # [h, w] at latent res
    y, x = b[-1].tolist()
    assert lat_mask[y:y + LC.crop, x:x + LC.crop].sum() > 0.9 * lat_mask.sum()
