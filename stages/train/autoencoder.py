"""The video autoencoder stage: TAEHV (models/taehv.py) trained on clips of the synthetic world rendered
on the fly, so that what moves inside a 4-frame latent group (mouth, blinks, a hand) survives the round
trip. The streaming decoder is the same weights (TAEHV.stream_decoder).

    vidu train --stage autoencoder --preset small --out runs/ae --steps 3000 --minutes 9 --workers 14
    summary = train(TrainSettings(stage="autoencoder", preset="tiny", steps=100), "runs/ae")

Clip g of a run (g = (step // reuse) * batch + row) is world clip `clip_seed(seed, g)` (its style drawn by
train_style: `animal_share` of them animals; with `cut_actions`, also the action its end cuts; `nod_share` of
them nod instead, train_nod); with `reuse` > 1
each rendered batch trains `reuse` steps, step s seeing it as variant s % reuse: as rendered, reversed
in time (which also moves the 4-frame latent groups by one frame against the motion), mirrored
left-right, reversed and mirrored; so a renderer slower than the GPU does not leave it idle. The world also says
where the mouth, eyes, hands and face are (stages.synth.render.region_masks), which set the per-pixel
loss weights w (the mouth's grown by `mouth_grow`: an animal's muzzle, nose and chin) and the region r
(coverage of mouth, eyes and hands). Loss per clip (x: frames, y: round
trip, d: the difference of consecutive frames, r_t: max(r of frames t and t - 1)):

    sum w |y - x| / sum w  +  sum w (y - x)^2 / sum w  +  temporal_weight * sum w |dy - dx| / sum w
        +  motion_weight * sum r_t |dy - dx| / sum r_t

The last term is the frame-to-frame motion inside the mouth, eyes and hands alone: what a codec that
holds each latent group still would lose, however few pixels it covers (zero for a clip whose round
trip moves as the truth does, whatever its constant error). `init`: start from an autoencoder file's
weights (a warm start; the steps and schedule are this run's); `freeze_encoder`: train the decoder
alone, so the latents stay those of `init` (their statistics too): a teacher or student trained on that
codec's latents takes the new decoder as it is.

One process (a GPU, or the CPU); AdamW with warmup and cosine decay, EMA (its decay warmed up as
min(ema, (1 + step) / (10 + step)): a fast-learning net is not averaged with its first weights), checkpoints and exact resume
as for the teachers (stages/train/machinery.py). Each checkpoint holds model.safetensors (raw) and
ema.safetensors: the EMA weights with their TAEHVConfig, whose latent statistics (per channel, over
STATS_CLIPS clips) make encode_video's latents unit-variance; that file is the codec the teachers take.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import read_state_dict, save_taehv
from models.config import ModelConfig, preset as get_preset
from models.taehv import TAEHV
from stages.run import ranged
from stages.train.machinery import (Dist, adamw, checkpoint_dir, ema_decay, ema_update, latest_state, optimizer_step,
                                    write_checkpoint)

STATS_CLIPS = 8              # clips the latent statistics are measured on at each checkpoint
STATS_SEED = 999_999_937     # their world seeds: clip_seed(STATS_SEED, i), apart from any run's


@dataclass(frozen=True)
class AutoencoderSettings:
    region_weight: float = ranged(10.0, min=1)     # loss weight of mouth, eye and hand pixels
    mouth_grow: float = ranged(0.06, min=0)        # ... and of the mouth's surroundings (snout, nose, chin) this x frame height
    face_weight: float = ranged(2.0, min=1)        # loss weight of the rest of the face
    temporal_weight: float = ranged(1.0, min=0)    # weight of the frame-difference term
    motion_weight: float = ranged(0.0, min=0)      # weight of the frame-difference term inside mouth, eyes, hands
    frames: int | None = ranged(None, min=1)       # frames per training clip, 1 + 4k (None: the preset's clip)
    reuse: int = ranged(1, min=1, max=4)           # steps per rendered batch (its variants: reversed, mirrored)
    init: str | None = None                        # warm start: an autoencoder file of the preset's widths
    freeze_encoder: bool = False                   # train the decoder alone (the latents stay init's)
    animal_share: float | None = ranged(0.4, min=0, max=1)   # training clips of the animal style (None: the world's mix)
    cut_actions: bool = True                       # training clips also show the action their end cuts (world.random_events)
    mouth_contrast: float = ranged(0.0, min=0)     # the mouth zone x clip(this / RGB distance mouth-surroundings, 1, 4); 0: off
    nod_share: float = ranged(0.0, min=0, max=1)   # training clips whose instructions are one nod (train_nod)


def clip_frames(cfg: ModelConfig, ae: AutoencoderSettings) -> int:
    T = ae.frames or cfg.video_frames
    if (T - 1) % 4:
        raise ValueError(f"autoencoder clips are 1 + 4k frames, not {T}")
    return T


def train_style(seed: int, ae: AutoencoderSettings) -> str | None:
    """The character style of training clip `seed`: animal with probability ae.animal_share, else human or
    anime in the world's proportion (world.STYLES); None (the world's own draw) when animal_share is None.
    The animal is the style the codec keeps worst (RESULTS.md session 43: its mouth is the smallest, under
    a snout, beside whiskers), drawn in a quarter of the world's clips."""
    if ae.animal_share is None:
        return None
    from stages.synth.world import STYLES
    u = np.random.default_rng([seed, 0x5717]).random()
    if u < ae.animal_share:
        return "animal"
    rest = {k: v for k, v in STYLES.items() if k != "animal"}
    edge = ae.animal_share + (1 - ae.animal_share) * rest["human"] / sum(rest.values())
    return "human" if u < edge else "anime"


def train_nod(seed: int, ae: AutoencoderSettings, seconds: float) -> list | None:
    """The instructions of training clip `seed` when it is one of the `nod_share` clips drawn to nod (else
    None: the world's draw): one nod, given at a uniform time that leaves at least VISIBLE_S of it in the clip.
    Speaking heads that nod are the codec's worst mouths (RESULTS.md session 51: the four nodding clips of a
    held-out set were its four lowest), and the world's draw gives them to 13 % of 33-frame training clips
    against 26 % of 4-s held-out animal clips."""
    if not ae.nod_share:
        return None
    from stages.synth.world import ACTIONS, INSTRUCTION_DELAY, VISIBLE_S, event
    r = np.random.default_rng([seed, 0x40D])
    if r.random() >= ae.nod_share:
        return None
    onset = r.uniform(0.0, max(0.0, seconds - INSTRUCTION_DELAY - VISIBLE_S))
    return [event(onset, "nod", r.uniform(*ACTIONS["nod"].seconds))]


def world_clip(cfg: ModelConfig, seed: int, frames: int, ae: AutoencoderSettings | None = None,
               split: str = "train", draw: bool = True, style: str | None = None):
    """World clip `seed` at the preset's size: (frames [T, H, W, 3] uint8, the Sample with its region
    masks, and with `ae` the loss weights [T, H, W] float16). `split`: whose voices speak (train | eval).
    With `ae` (a training clip) its style is train_style's and, with ae.cut_actions, the instruction whose
    action the clip's end cuts is in it too (a 33-frame clip otherwise shows a raised hand in 0.3 % of
    clips, a head turn in 4 %; with it 9 % and 30 %). The region of the motion term is
    `region(sample.masks)`. `draw` False: the Sample alone, no pixels (tests; returns (None, sample, None)).
    `style` (without `ae`): the character's style (an evaluation's extra animals), else the world's draw.
    A clip drawn to nod (train_nod) has that one instruction instead of the world's."""
    from stages.synth import make_sample
    fps = cfg.audio.fps
    kw = dict(style=style) if ae is None else dict(style=train_style(seed, ae), cut_actions=ae.cut_actions,
                                                     events=train_nod(seed, ae, frames / fps))
    s = make_sample(seed, width=cfg.width, height=cfg.height, fps=fps, seconds=frames / fps, masks=draw, split=split,
                    draw=draw, **kw)
    if not draw:
        return None, s, None
    if s.frames.shape[0] != frames:
        raise ValueError(f"the world made {s.frames.shape[0]} frames for a {frames}-frame clip")
    return s.frames, s, (None if ae is None else loss_weights(s.masks, ae, mouth_gain(s.identity, ae)))


def parts(masks: dict[str, np.ndarray]) -> np.ndarray:
    """The coverage of mouth, eyes and hands [T, H, W] in [0, 1] (float32)."""
    return np.maximum(np.maximum(masks["mouth"], masks["eyes"]), masks["hands"])


def region(masks: dict[str, np.ndarray]) -> np.ndarray:
    """The motion term's region: mouth, eyes and hands [T, H, W] uint8 (coverage * 255)."""
    return (parts(masks) * 255 + 0.5).astype(np.uint8)


def mouth_zone(mouth: np.ndarray, grow: float) -> np.ndarray:
    """The mouth's coverage [T, H, W] grown by `grow` x frame height (a box, per frame): for the animal style
    the muzzle, nose and chin the analyzer reads the mouth and the yaw against (RESULTS.md session 43: the
    codec recoloured a dark muzzle, weighted as plain face, and lost the mouth inside it)."""
    k = int(round(grow * mouth.shape[1]))
    if k <= 0:
        return mouth
    from scipy.ndimage import maximum_filter1d
    return maximum_filter1d(maximum_filter1d(mouth, 2 * k + 1, axis=1), 2 * k + 1, axis=2)


def mouth_gain(identity, ae: AutoencoderSettings) -> float:
    """How much more the mouth zone of this character weighs: clip(ae.mouth_contrast / d, 1, 4), d the RGB
    distance between the open mouth's colour and the colour around it (an animal's muzzle, else its skin);
    1 when ae.mouth_contrast is 0. The analyzer tells the mouth from its surroundings by the nearest colour,
    so an error of d / 2 recolours a mouth pixel: 25 levels on a dark muzzle (d 50, the world's lowest; a
    white muzzle 338, human skins 58-250, median 194), errors the L1 + L2 loss hardly sees (RESULTS.md
    2026-12-04 session 44: five dark-muzzled held-out clips keep the mouth at r 0.88-0.96, mean 0.915; seven
    white-muzzled 0.93-0.98, mean 0.963). 150: a dark muzzle x 3, a grey one (d 109) x 1.4, 6 % of human
    skins a little."""
    if not ae.mouth_contrast:
        return 1.0
    from stages.synth.world import MOUTH
    around = identity.muzzle if identity.style == "animal" else identity.skin
    d = float(np.linalg.norm(np.subtract(MOUTH, around, dtype=np.float64)))
    return float(np.clip(ae.mouth_contrast / max(d, 1.0), 1.0, 4.0))


def loss_weights(masks: dict[str, np.ndarray], ae: AutoencoderSettings, mouth: float = 1.0) -> np.ndarray:
    """The world's region coverages ([T, H, W] each) -> per-pixel loss weights [T, H, W] float16: region_weight
    on mouth, eyes and hands (the mouth grown by ae.mouth_grow, and x `mouth`: mouth_gain), face_weight on the
    rest of the face, 1 elsewhere."""
    zone = mouth_zone(masks["mouth"], ae.mouth_grow)
    regions = np.maximum(parts(masks), mouth * zone)
    w = np.maximum(1.0, np.maximum(ae.face_weight * masks["face"], ae.region_weight * regions))
    return w.astype(np.float16)


class WorldClips(torch.utils.data.Dataset):
    """Item g: (frames [T, H, W, 3] uint8, weights [T, H, W] float16, region [T, H, W] uint8) of world
    clip clip_seed(seed, g)."""

    def __init__(self, cfg: ModelConfig, seed: int, ae: AutoencoderSettings):
        self.cfg, self.seed, self.ae, self.T = cfg, seed, ae, clip_frames(cfg, ae)

    def __len__(self) -> int:
        return 2 ** 62

    def __getitem__(self, g: int):
        from stages.train.data import clip_seed
        frames, s, w = world_clip(self.cfg, clip_seed(self.seed, g), self.T, self.ae)
        return torch.from_numpy(frames), torch.from_numpy(w), torch.from_numpy(region(s.masks))


def variant(batch: tuple[torch.Tensor, ...], v: int) -> tuple[torch.Tensor, ...]:
    """Variant v of a batch of clips (tensors [B, T, H, W, ...]): 0 as is, 1 reversed in time,
    2 mirrored left-right, 3 reversed and mirrored."""
    dims = ((1,) if v % 2 else ()) + ((3,) if v >= 2 else ())
    return tuple(t.flip(dims) if dims else t for t in batch)


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    """[B, T, H, W, 3] uint8 -> [B, T, 3, H, W] float in [0, 1]."""
    return frames.permute(0, 1, 4, 2, 3).float() / 255


def autoencoder_loss(model: TAEHV, x: torch.Tensor, w: torch.Tensor, ae: AutoencoderSettings,
                     r: torch.Tensor | None = None):
    """x [B, T, 3, H, W] in [0, 1], w [B, T, H, W], r [B, T, H, W] the motion region -> (loss, parts);
    the model may run under autocast. With ae.freeze_encoder the encoder runs without gradients."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not ae.freeze_encoder):
        z = model.encode_video(x)
    return reconstruction_loss(model.decode_video(z, clamp=False).float(), x, w, ae, r)


def reconstruction_loss(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ae: AutoencoderSettings,
                        r: torch.Tensor | None = None):
    """y, x [B, T, 3, H, W] (round trip, truth), w [B, T, H, W] per-pixel weights, r [B, T, H, W] the
    motion term's region (uint8 coverage * 255, or float in [0, 1]; needed when ae.motion_weight > 0)
    -> (loss, parts)."""
    w = w.float()[:, :, None]                                       # [B, T, 1, H, W]
    err = y - x
    norm = w.sum() * 3
    l1 = (w * err.abs()).sum() / norm
    l2 = (w * err.square()).sum() / norm
    loss = l1 + l2
    parts = {"l1": l1.detach(), "l2": l2.detach()}
    if ae.temporal_weight and x.shape[1] > 1:
        wt = torch.minimum(w[:, 1:], w[:, :-1])
        dt = ((err[:, 1:] - err[:, :-1]).abs() * wt).sum() / (wt.sum() * 3)   # |dy - dx| = |d err|
        loss = loss + ae.temporal_weight * dt
        parts["temporal"] = dt.detach()
    if ae.motion_weight and x.shape[1] > 1:
        if r is None:
            raise ValueError("motion_weight > 0 needs the region of mouth, eyes and hands")
        r = (r.float() / 255 if r.dtype == torch.uint8 else r.float())[:, :, None]
        rt = torch.maximum(r[:, 1:], r[:, :-1])
        dm = ((err[:, 1:] - err[:, :-1]).abs() * rt).sum() / (rt.sum() * 3).clamp_min(1.0)
        loss = loss + ae.motion_weight * dm
        parts["motion"] = dm.detach()
    return loss, parts


@torch.no_grad()
def latent_stats(model: TAEHV, clips: list[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of model's (unnormalised) latents of `clips` ([1, T, 3, H, W] each)."""
    z = torch.cat([model.encode_video(x).float().transpose(1, 2).flatten(2) for x in clips], 2)   # [1, C, n]
    mean, std = z.mean((0, 2)), z.std((0, 2)).clamp_min(1e-4)
    return tuple(mean.tolist()), tuple(std.tolist())


class AutoencoderTrainer:
    def __init__(self, st, out: Path, d: Dist, workers: int = 0):
        if d.world > 1:
            raise ValueError("the autoencoder stage runs in one process (no torchrun)")
        self.st, self.out, self.d, self.workers = st, Path(out), d, workers
        self.ae: AutoencoderSettings = st.autoencoder
        self.cfg = get_preset(st.preset)
        arch = self.cfg.taehv
        if arch.latent_channels != self.cfg.dit.in_dim:
            raise ValueError(f"preset {st.preset}: the autoencoder makes {arch.latent_channels}-channel latents, "
                             f"the DiT takes {self.cfg.dit.in_dim}")
        self.arch = dataclasses.replace(arch, latent_mean=(), latent_std=())
        torch.manual_seed(st.seed)
        self.model = TAEHV(self.arch).to(d.device).train()
        self.init_stats = None
        if self.ae.init:
            self.init_stats = warm_start(self.model, self.ae.init, self.arch)
        if self.ae.freeze_encoder:
            if not self.ae.init:
                raise ValueError("freeze_encoder keeps the encoder of an init file: give init too")
            self.model.encoder.requires_grad_(False)
        self.ema = {k: p.detach().clone().float() for k, p in self.model.named_parameters()}
        self.opt, self.sched = adamw(self.model, st, d.device)
        self.step, self.history = 0, []
        self.clips = WorldClips(self.cfg, st.seed, self.ae)
        self._batches = self._held = None
        self._stats_clips: list[torch.Tensor] | None = None

    def _loader(self):
        st, n = self.st, self.ae.reuse
        rows = [list(range(b * st.batch, (b + 1) * st.batch)) for b in range(self.step // n, -(-st.steps // n))]
        kw = dict(num_workers=self.workers, pin_memory=self.d.device.type == "cuda")
        if self.workers:
            kw.update(prefetch_factor=4, worker_init_fn=_one_thread)
        return iter(torch.utils.data.DataLoader(self.clips, batch_sampler=rows, **kw))

    def close(self) -> None:
        """End the data loader's worker processes (training ended, perhaps before its batches did)."""
        self._batches = self._held = None

    def train_step(self) -> dict:
        st, dev = self.st, self.d.device
        if self._batches is None:
            self._batches, self._held = self._loader(), None
        if self._held is None or self.step % self.ae.reuse == 0:
            self._held = tuple(t.to(dev, non_blocking=True) for t in next(self._batches))
        frames, w, r = variant(self._held, self.step % self.ae.reuse)
        x = to_unit(frames)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, parts = autoencoder_loss(self.model, x, w, self.ae, r)
        loss.backward()
        gnorm = optimizer_step(self.model, self.opt, self.sched, st.grad_clip)
        ema_update(self.ema, self.model, ema_decay(self.step, st.ema))
        logged = {"step": self.step, "loss": float(loss.detach()), "grad_norm": float(gnorm),
                  **{k: float(v) for k, v in parts.items()}, "lr": self.sched.get_last_lr()[0]}
        self.step += 1
        return logged

    def checkpoint_dir(self, step: int) -> Path:
        return checkpoint_dir(self.out, step)

    def ema_model(self) -> TAEHV:
        """The EMA weights as a float32 TAEHV with their latent statistics (eval mode, on the run's device)."""
        model = TAEHV(self.arch).to(self.d.device).eval()
        model.load_state_dict(self.ema)
        if self._stats_clips is None:
            from stages.train.data import clip_seed
            T = clip_frames(self.cfg, self.ae)
            self._stats_clips = [to_unit(torch.from_numpy(world_clip(self.cfg, clip_seed(STATS_SEED, i), T)[0])[None])
                                 for i in range(STATS_CLIPS)]
        if self.ae.freeze_encoder and self.init_stats:
            mean, std = self.init_stats            # the encoder is init's: so are its latents' statistics
        else:
            mean, std = latent_stats(model, [x.to(self.d.device) for x in self._stats_clips])
        cfg = dataclasses.replace(self.arch, latent_mean=mean, latent_std=std)
        normalised = TAEHV(cfg).to(self.d.device).eval()
        normalised.load_state_dict(self.ema)
        return normalised

    def save(self) -> Path:
        st = self.st
        lineage = [{"stage": "autoencoder", "steps": self.step, "preset": self.cfg.name, "batch": st.batch,
                    "data": f"synth:{st.seed}", "date": time.strftime("%Y-%m-%d")}]
        if self.ae.init:                   # a warm start: the run it started from comes first
            from models.checkpoint import read_metadata
            lineage[0].update(init=Path(self.ae.init).name, freeze_encoder=self.ae.freeze_encoder)
            lineage = list(read_metadata(self.ae.init).get("lineage") or []) + lineage
        ema = self.ema_model()

        def write(tmp: Path) -> None:
            save_taehv(tmp / "model.safetensors", self.model, self.arch, {"kind": "raw", "step": self.step,
                                                                          "lineage": lineage})
            save_taehv(tmp / "ema.safetensors", ema, ema.config, {"kind": "ema", "step": self.step, "lineage": lineage})
            torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "step": self.step,
                        "history": self.history, "settings": st.to_dict()}, tmp / "state.pt")
        return write_checkpoint(self.out, self.step, write, self.history, f"autoencoder ({self.cfg.name})")

    def resume(self) -> bool:
        found = latest_state(self.out, self.st)
        if found is None:
            return False
        path, state = found
        self.model.load_state_dict(read_state_dict(path / "model.safetensors"))
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        ema = read_state_dict(path / "ema.safetensors")
        for k, v in self.ema.items():
            v.copy_(ema[k])
        self.step, self.history = state["step"], state["history"]
        self._batches = self._held = None
        return True


def warm_start(model: TAEHV, path: str, arch) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Load the autoencoder file `path` into `model` (its widths must be `arch`'s); returns its latent
    statistics (mean, std), or None when it has none."""
    from models.checkpoint import load_taehv
    src = load_taehv(path)
    if dataclasses.replace(src.config, latent_mean=(), latent_std=()) != arch:
        raise ValueError(f"init {path} is a TAEHV of {src.config}, not of this preset's widths {arch}")
    model.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
    return (src.config.latent_mean, src.config.latent_std) if src.config.latent_mean else None


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)
