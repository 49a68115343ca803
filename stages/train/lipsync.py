"""A lip-sync discriminator in latent space, and the sync loss a teacher adds to its video loss.

The teacher can predict the mouth from clean history and ignore the speech (issue 15); a small
discriminator trained on the synthetic world scores whether the mouth in a latent frame fits the
speech around it, and `sync_loss` pulls the teacher's clean-latent estimate x0_hat towards "fits"
without decoding it.

One latent frame t is scored at a time: the video side is an S x S crop of its latent [C, S, S] around
the mouth, the speech side its rows of `audio_features` (the frame's own and the DiT's context:
before + 1 + after rows of [mel_per_latent, n_mels]). Scoring single frames lets the loss act on any
scored span, the one-frame chunks of the causal stage included.

Where the mouth is: the world's mouth region mask (render.region_masks), averaged over the video frames
a latent frame covers and pooled to latent resolution; its centroid centres the crop, per latent frame
(the head sways, so a fixed box would hold the mouth only on average). The crop is a fixed S = max(4,
h / 4) latent pixels: 8 (64 px) at 256 x 256, where the mouth spans about 2-4 x 5-8 latent pixels, and 4
(32 px) at 64 x 64; the model sees lips and some cheek, and one network fits every clip.

Training (contrastive, per latent frame, BCE): positives are a frame with its own speech; negatives are
the same frame with its own speech shifted by >= 2 latent frames (320 ms) or with another clip's speech
at the same time. Clips render longer than the model's (`seconds`) for more frames per clip.

    disc = train_discriminator(preset("small"), codec, clips=256, steps=600, seed=0)
    save_lipsync("out/lipsync.safetensors", disc)
    loss = sync_loss(x0_hat, batch["audio"], batch["mouth_box"], load_lipsync(path), clip_frames)

A batch that uses it carries "mouth_box" [B, F, 2]: `mouth_boxes(s.masks["mouth"], LipSyncConfig.for_model(cfg))`
of each clip, rendered with masks=True (stages/train/data.py render_clip; about 30 % more render time);
`vidu train --lipsync FILE --sync-weight W` adds it (stages/train/losses.py), and the teacher recipe's
lipsync phase trains the discriminator on the GPU from rendered clips (`prepare_clips(..., workers=)`).

Measured (CPU, 1 thread, load ~9 on 2 cores; held-out clips of split "eval", per-frame AUC):
at 64 x 64 through the `small` codec (32 training clips of 4 s, 400 steps) the discriminator stays
at chance on held-out clips (shifted 0.50, other clip 0.52; it memorises the training identities,
other clip 0.82 there): a mouth opening moves well under a latent pixel at that size, so the tiny
preset gets no sync loss from it. At 256 x 256 through the `small` codec only 10 training clips of 2 s
fitted the time here (42 s a clip to render and encode, 30 s for 300 steps): 0.80 shifted / 0.95 other
clip on them, chance on 5 held-out clips (0.51 / 0.47) - too few clips to generalise; the GPU phase
should train on >= 256 clips and check `evaluate` on split "eval" before using the loss.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.audio import audio_features
from models.config import ModelConfig
from models.taehv import TAEHV, frames_to_latents

MIN_SHIFT = 2          # latent frames a shifted-speech negative is moved by, at least


def check_hears_logmel(cfg: ModelConfig) -> None:
    """A one-line error unless the model `cfg` hears log-mel speech, as the discriminator does (its sync loss and
    reward compare the two); a content model (phones and loudness) is refused."""
    if cfg.audio_encoder != "logmel":
        raise ValueError(f"the lip-sync discriminator hears log-mel speech; preset {cfg.name} reads "
                         f"{cfg.audio_encoder} features")


@dataclass(frozen=True)
class LipSyncConfig:
    crop: int                         # S: latent pixels of the square mouth crop
    channels: int = 16                # latent channels
    mel_steps: int = 16               # log-mel steps per latent frame
    n_mels: int = 80
    context: tuple[int, int] = (2, 1)  # speech frames before / after the scored frame
    width: int = 64                   # embedding size of each side
    downscale: int = 8                # video pixels per latent pixel

    @property
    def rows(self) -> int:
        return self.context[0] + 1 + self.context[1]

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> "LipSyncConfig":
        return cls(crop=max(4, cfg.height // 8 // 4), channels=cfg.dit.in_dim, mel_steps=cfg.audio.mel_per_latent,
                   n_mels=cfg.audio.n_mels, context=tuple(cfg.dit.audio_context))


class LipSync(nn.Module):
    """(mouth crops [N, C, S, S], speech rows [N, rows, mel_steps, n_mels]) -> sync logits [N]."""

    def __init__(self, cfg: LipSyncConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.video = nn.Sequential(
            nn.Conv2d(cfg.channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, D))
        T = cfg.rows * 4                                               # video frames heard, 16 for (2, 1)
        self.audio = nn.Sequential(                                    # [N, n_mels, T]: mel steps pooled per video frame
            nn.Conv1d(cfg.n_mels, 48, 3, padding=1), nn.SiLU(),
            nn.Conv1d(48, 48, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(48 * -(-T // 2), D))
        self.head = nn.Sequential(nn.Linear(3 * D, D), nn.SiLU(), nn.Linear(D, 1))

    def forward(self, crops: torch.Tensor, speech: torch.Tensor) -> torch.Tensor:
        v = self.video(crops)                                          # [N, D]
        N, R, K, A = speech.shape
        a = self.audio(speech.reshape(N, R * 4, K // 4, A).mean(2).transpose(1, 2))    # [N, D]
        return self.head(torch.cat([v, a, v * a], 1))[:, 0]


# -- where the mouth is --------------------------------------------------------------------------

def mouth_boxes(mouth: np.ndarray, cfg: LipSyncConfig, frames_per_latent: int = 4) -> torch.Tensor:
    """Mouth region masks of a clip [T, H, W] (T = 1 + 4k video frames) -> top-left corners [F, 2]
    (y, x, latent pixels) of the S x S crop centred on the mouth in each latent frame (latent frame i
    covers video frames 4i - 3 .. 4i). A frame without mouth pixels takes the clip's mean centre."""
    T, H, W = mouth.shape
    d, S = cfg.downscale, cfg.crop
    h, w = H // d, W // d
    pooled = mouth[:, :h * d, :w * d].reshape(T, h, d, w, d).sum((2, 4))            # [T, h, w]
    n_lat = 1 + (T - 1) // frames_per_latent
    per = np.stack([pooled[max(0, frames_per_latent * i - frames_per_latent + 1): frames_per_latent * i + 1].mean(0)
                    for i in range(n_lat)])                                        # [F, h, w]
    mass = per.sum((1, 2))
    if not (mass > 0).any():
        raise ValueError("the clip's mouth mask is empty in every frame")
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    cy = np.where(mass > 0, (per.sum(2) * ys).sum(1) / np.maximum(mass, 1e-9), np.nan)
    cx = np.where(mass > 0, (per.sum(1) * xs).sum(1) / np.maximum(mass, 1e-9), np.nan)
    cy, cx = np.where(np.isnan(cy), np.nanmean(cy), cy), np.where(np.isnan(cx), np.nanmean(cx), cx)
    y0 = np.clip(np.round(cy - S / 2), 0, h - S)
    x0 = np.clip(np.round(cx - S / 2), 0, w - S)
    return torch.from_numpy(np.stack([y0, x0], 1).astype(np.int64))


def crop_mouth(latents: torch.Tensor, boxes: torch.Tensor, S: int) -> torch.Tensor:
    """latents [B, C, f, h, w], boxes [B, f, 2] -> crops [B * f, C, S, S] (differentiable; only the
    cropped positions get gradient)."""
    B, C, f, h, w = latents.shape
    if boxes.shape != (B, f, 2):
        raise ValueError(f"mouth boxes {tuple(boxes.shape)} do not fit latents {tuple(latents.shape)}: expected ({B}, {f}, 2)")
    r = torch.arange(S, device=latents.device)
    ys = (boxes[..., 0, None] + r)[..., :, None]                       # [B, f, S, 1]
    xs = (boxes[..., 1, None] + r)[..., None, :]                       # [B, f, 1, S]
    bi = torch.arange(B, device=latents.device)[:, None, None, None]
    ti = torch.arange(f, device=latents.device)[None, :, None, None]
    out = latents.permute(0, 2, 1, 3, 4)[bi, ti, :, ys, xs]            # [B, f, S, S, C]
    return out.permute(0, 1, 4, 2, 3).reshape(B * f, C, S, S)


def speech_rows(audio: torch.Tensor, frames: torch.Tensor, rows: int) -> torch.Tensor:
    """audio [B, before + F + after, K, A], clip frame indices [B, f] -> [B * f, rows, K, A]: each
    frame's own speech row with its context (frame t reads rows t .. t + before + after)."""
    idx = frames[..., None] + torch.arange(rows, device=frames.device)            # [B, f, rows]
    b = torch.arange(audio.shape[0], device=audio.device)[:, None, None]
    return audio[b, idx].flatten(0, 1)


# -- the loss the teacher adds ---------------------------------------------------------------------

def sync_loss(x0_hat: torch.Tensor, audio: torch.Tensor, boxes: torch.Tensor, disc: LipSync,
              clip_frames: torch.Tensor | None = None) -> torch.Tensor:
    """-log sigmoid(D(mouth of x0_hat, its own speech)), mean over the scored frames of the rows that
    hear speech (a row whose speech was dropped for guidance, all zeros, is left out; 0 if none is).
    x0_hat: [B, C, f, h, w] scored frames; audio: [B, before + F + after, K, A]; boxes: [B, F, 2] the
    clip's mouth boxes (`mouth_boxes`); clip_frames: [f] the scored frames' indices in the clip
    (default 0 .. f - 1). The discriminator is frozen: gradient reaches x0_hat only."""
    B, _, f = x0_hat.shape[:3]
    if clip_frames is None:
        clip_frames = torch.arange(f)
    clip_frames = clip_frames.to(x0_hat.device)
    hears = audio.flatten(1).abs().amax(1) > 0                                     # [B]
    if not bool(hears.any()):
        return x0_hat.sum() * 0.0
    x, a, bx = x0_hat[hears].float(), audio[hears].float(), boxes[hears][:, clip_frames].to(x0_hat.device)
    frames = clip_frames[None].expand(x.shape[0], -1)
    params = {k: v.detach() for k, v in disc.named_parameters()}
    logits = torch.func.functional_call(disc, params, (crop_mouth(x, bx, disc.cfg.crop),
                                                       speech_rows(a, frames, disc.cfg.rows)))
    return -F.logsigmoid(logits).mean()


# -- data: the world's clips as crops and speech ---------------------------------------------------

def render_pair(seed: int, cfg: ModelConfig, seconds: float, split: str) -> dict:
    """One world clip as the discriminator needs it, before coding: frames [T, H, W, 3] uint8, speech
    features [before + F + after, K, A] and mouth boxes [F, 2] (a rendering worker's job: no codec)."""
    from stages.synth import make_sample
    lc = LipSyncConfig.for_model(cfg)
    s = make_sample(seed, width=cfg.width, height=cfg.height, fps=cfg.audio.fps, seconds=seconds, masks=True, split=split)
    n_lat = 1 + (s.frames.shape[0] - 1) // cfg.audio.video_frames_per_latent
    return {"frames": s.frames, "boxes": mouth_boxes(s.masks["mouth"], lc, cfg.audio.video_frames_per_latent),
            "speech": audio_features(torch.from_numpy(s.audio), n_lat, cfg.audio, context=lc.context)}


@torch.no_grad()
def prepare_clips(cfg: ModelConfig, codec: TAEHV, n: int, seed: int = 0, seconds: float = 4.0,
                  split: str = "train", workers: int = 0) -> dict:
    """n world clips of `split` (seeds from `seed`) -> {"crops": [n, F, C, S, S], "speech": [n, before + F +
    after, K, A], "seconds": render + encode time}; rendered in `workers` processes (0: here), coded
    here on the codec's device."""
    lc = LipSyncConfig.for_model(cfg)
    seeds = [seed * 1_000_003 + i for i in range(n)]
    args = (seeds, [cfg] * n, [seconds] * n, [split] * n)
    crops, speech, t0 = [], [], time.perf_counter()
    if workers:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                   initargs=(1,))
        clips = pool.map(render_pair, *args)
    else:
        pool, clips = None, map(render_pair, *args)
    try:
        for c in clips:
            lat = frames_to_latents(codec, c["frames"])                               # [C, F, h, w]
            crops.append(crop_mouth(lat[None], c["boxes"][None], lc.crop))
            speech.append(c["speech"])
    finally:
        if pool is not None:
            pool.shutdown()
    return {"crops": torch.stack(crops), "speech": torch.stack(speech), "seconds": time.perf_counter() - t0}


def draw_pairs(data: dict, count: int, g: torch.Generator, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`count` (crop, speech, label, kind) examples: half matched (kind 0), a quarter own speech shifted by
    >= MIN_SHIFT frames (kind 1), a quarter another clip's speech at the same frame (kind 2)."""
    crops, speech = data["crops"], data["speech"]
    n, Fn = crops.shape[:2]
    if Fn <= 2 * MIN_SHIFT or n < 2:
        raise ValueError(f"need >= 2 clips of > {2 * MIN_SHIFT} latent frames, got {n} of {Fn}")
    clip = torch.randint(n, (count,), generator=g)
    t = torch.randint(Fn, (count,), generator=g)
    kind = torch.zeros(count, dtype=torch.long)
    kind[count // 2:] = 1
    kind[count // 2 + count // 4:] = 2
    # shift: a uniform offset in [MIN_SHIFT, Fn - 1 - MIN_SHIFT] away, wrapped: |shift| >= MIN_SHIFT mod Fn
    off = MIN_SHIFT + torch.randint(Fn - 2 * MIN_SHIFT, (count,), generator=g)
    other = (clip + 1 + torch.randint(n - 1, (count,), generator=g)) % n
    a_clip = torch.where(kind == 2, other, clip)
    a_t = torch.where(kind == 1, (t + off) % Fn, t)
    idx = a_t[:, None] + torch.arange(rows)
    return crops[clip, t], speech[a_clip[:, None], idx], (kind == 0).float(), kind


def fit(data: dict, lc: LipSyncConfig, steps: int = 600, batch: int = 512, lr: float = 2e-3, seed: int = 0,
        shuffle_labels: bool = False, device: str | torch.device = "cpu") -> LipSync:
    """Train a LipSync on prepared clips (BCE on `draw_pairs`); `shuffle_labels` permutes each batch's
    labels (the control that must stay at chance). Batch 512: at 128, 128 or more of the world's clips
    through its codec stay at chance for 600 steps at any learning rate (benchmarks/lipsync_fit.py)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LipSync(lc)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    for _ in range(steps):
        c, s, y, _ = draw_pairs(data, batch, g, lc.rows)
        if shuffle_labels:
            y = y[torch.randperm(batch, generator=g)]
        loss = F.binary_cross_entropy_with_logits(model(c.to(device), s.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def train_discriminator(cfg: ModelConfig, codec: TAEHV, clips: int = 256, steps: int = 600, seed: int = 0,
                        seconds: float = 4.0, device: str | torch.device = "cpu") -> LipSync:
    """The recipe's phase before stage 1: `clips` training clips of the world through `codec`, `steps`
    steps; frozen and in eval mode."""
    lc = LipSyncConfig.for_model(cfg)
    model = fit(prepare_clips(cfg, codec, clips, seed, seconds, "train"), lc, steps, seed=seed, device=device)
    return model.requires_grad_(False)


# -- measuring --------------------------------------------------------------------------------------

def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties count half (Mann-Whitney U / (n_pos n_neg))."""
    d = pos.double()[:, None] - neg.double()[None, :]
    return float(((d > 0).double() + 0.5 * (d == 0).double()).mean())


@torch.no_grad()
def evaluate(model: LipSync, data: dict, count: int = 4096, seed: int = 1, window: int = 4) -> dict:
    """Held-out scores: per-frame AUC of matched vs shifted speech, vs another clip's speech, accuracy at
    logit 0, and the AUC of `window`-frame means (matched vs shifted by the same offset)."""
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    c, s, y, kind = draw_pairs(data, count, g, model.cfg.rows)
    logit = torch.cat([model(c[i:i + 1024].to(dev), s[i:i + 1024].to(dev)).cpu() for i in range(0, count, 1024)])
    pos = logit[kind == 0]
    out = {"auc_shifted": auc(pos, logit[kind == 1]), "auc_other_clip": auc(pos, logit[kind == 2]),
           "accuracy": float(((logit > 0).float() == y).float().mean())}
    crops, speech = data["crops"], data["speech"]
    n, Fn = crops.shape[:2]
    rows, wm, ws = model.cfg.rows, [], []
    for i in range(n):
        for t0 in range(0, Fn - window + 1, window):
            t = torch.arange(t0, t0 + window)
            off = MIN_SHIFT + int(torch.randint(Fn - 2 * MIN_SHIFT, (1,), generator=g))
            for sh, acc in ((0, wm), (off, ws)):
                idx = ((t + sh) % Fn)[:, None] + torch.arange(rows)
                acc.append(model(crops[i, t].to(dev), speech[i, idx].to(dev)).mean().cpu())
    out["auc_window"] = auc(torch.stack(wm), torch.stack(ws))
    return out


# -- files ------------------------------------------------------------------------------------------

def save_lipsync(path: str | Path, model: LipSync, extra: dict | None = None) -> Path:
    from models.checkpoint import save_safetensors
    return save_safetensors(path, model.state_dict(), {"format": "vidu-lipsync",
                                                       "config": dataclasses.asdict(model.cfg), **(extra or {})})


def load_lipsync(path: str | Path, device: str | torch.device = "cpu") -> LipSync:
    """A saved discriminator, frozen and in eval mode."""
    from safetensors.torch import load_file
    from models.checkpoint import CheckpointError, load_into, read_metadata
    meta = read_metadata(path)
    if meta.get("format") != "vidu-lipsync":
        raise CheckpointError(f"{path} is not a lip-sync discriminator (format {meta.get('format')!r})")
    c = dict(meta["config"])
    c["context"] = tuple(c["context"])
    model = LipSync(LipSyncConfig(**c))
    sd = {k: v.float() for k, v in load_file(str(path)).items()}     # saved in float32 or shipped in bf16
    load_into(model, sd, what=f"lip-sync checkpoint {Path(path).name}")
    return model.to(device).eval().requires_grad_(False)
