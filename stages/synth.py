"""A procedural avatar world with ground truth, for training the talking-avatar model and scoring it.

A sample is a character (random `Identity`, stages/synthavatar.py) in a random `Scene` (backdrop,
camera) who talks (formant speech that silero-vad detects, the mouth following its loudness and
closed in pauses) and performs text instructions at known times ("blink", "nod", "turn left", ...).
`analyze` measures the state back from pixels, so generated videos can be scored against the
ground truth.

    vidu synth --n 500 --out data/synth          # .mp4 (H.264 + AAC) and .json ground truth per sample
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
from scipy import ndimage

from manifests.io import workspace
from stages.run import RunResult, Stage, base_row, ranged, run_stage
from stages.synthavatar import (EYE_ASPECT, EYE_WHITE, HAND_RAISE, HAND_REACH, MOUTH, MOUTH_OPEN, MOUTH_REST,
                                NOD_DROP, PUPIL, PUPIL_R, Identity, Scene, State, random_identity,
                                random_scene, render, render_clip, shade, skin_tolerance)
from stages.synthmedia import SR, envelope, voice, write_video

__all__ = ["ACTIONS", "Identity", "Sample", "Scene", "State", "Synth", "analyze", "frame_count", "identity_error",
           "make_sample", "render", "render_clip", "synthesize", "write_dataset"]

# ---------------------------------------------------------------------------------------------
# speech and actions over time

def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


def _hold(p: np.ndarray) -> np.ndarray:
    """Ease in over the first quarter, hold, ease out over the last quarter."""
    return _smoothstep(p / 0.25) * _smoothstep((1 - p) / 0.25)


def _pulse(p: np.ndarray) -> np.ndarray:
    """Fully on for the middle 40 %."""
    return _smoothstep((0.4 - np.abs(p - 0.5)) / 0.2)


def _twice(p: np.ndarray) -> np.ndarray:
    """Two down-and-back movements."""
    return np.sin(2 * np.pi * p) ** 2


def _shake(p: np.ndarray) -> np.ndarray:
    """Two oscillations, -1..1."""
    return np.sin(4 * np.pi * p) * _hold(p)


@dataclass(frozen=True)
class Action:
    track: str  # the State field it drives
    target: float  # value at full weight (weight -1 gives -target)
    seconds: tuple[float, float]  # duration range
    profile: Callable[[np.ndarray], np.ndarray]  # phase 0..1 -> weight


ACTIONS: dict[str, Action] = {
    "blink": Action("eyes", 0.0, (0.45, 0.7), _pulse),
    "nod": Action("pitch", 1.0, (0.8, 1.2), _twice),
    "look up": Action("pitch", -1.0, (0.8, 1.4), _hold),
    "turn left": Action("yaw", -1.0, (0.8, 1.5), _hold),
    "turn right": Action("yaw", 1.0, (0.8, 1.5), _hold),
    "shake head": Action("yaw", 0.6, (0.8, 1.2), _shake),
    "smile": Action("smile", 1.0, (0.8, 1.5), _hold),
    "raise a hand": Action("hand", 1.0, (1.0, 1.5), _hold),
}


def frame_count(seconds: float, fps: float) -> int:
    """T = 1 + 4k frames (the video autoencoder's 4x temporal compression) closest to `seconds`."""
    return 1 + 4 * max(0, int(round((seconds * fps - 1) / 4)))


def random_speech(rng: np.random.Generator, duration: float) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """16 kHz audio of one speaker's utterances (0.6-2.2 s) and pauses (0.35-1.1 s) over a noise
    floor; one clip in ten is silent. Returns the audio and the utterance intervals (s)."""
    audio = 0.005 * rng.standard_normal(int(round(duration * SR)))
    segments = []
    if rng.random() < 0.1:
        return audio.astype(np.float32), segments
    f0, level = rng.uniform(90, 230), rng.uniform(0.3, 0.6)
    t = rng.uniform(0.0, min(0.8, 0.3 * duration))
    while t + 0.6 <= duration - 0.05:
        d = min(rng.uniform(0.6, 2.2), duration - 0.05 - t)
        s = int(round(t * SR))
        u = level * voice(rng, d, f0)
        audio[s:s + len(u)] += u
        segments.append((round(t, 4), round(t + len(u) / SR, 4)))
        t += d + rng.uniform(0.35, 1.1)
    return audio.astype(np.float32), segments


def random_actions(rng: np.random.Generator, duration: float) -> list[tuple[float, float, str]]:
    """Non-overlapping instructions that fit in the clip, about one per 2.5 s (possibly none)."""
    names = list(ACTIONS)
    out = []
    t = rng.exponential(0.6)
    while True:
        name = names[rng.integers(len(names))]
        d = rng.uniform(*ACTIONS[name].seconds)
        if t + d > duration:
            return out
        out.append((round(t, 4), round(t + d, 4), name))
        t += d + 0.2 + rng.exponential(1.2)


def animate(rng: np.random.Generator, T: int, fps: float, mouth: np.ndarray,
            actions: list[tuple[float, float, str]]) -> dict[str, np.ndarray]:
    """Per-frame tracks (State fields -> [T] float32): a slow idle sway of the head and a resting
    smile, the given mouth, and each action blended in over its interval."""
    t = np.arange(T) / fps
    sway = [sum(rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 6.3))
                for _ in range(2)) / 2 for _ in range(2)]
    tracks = {"mouth": mouth, "eyes": np.ones(T), "yaw": 0.08 * sway[0], "pitch": 0.05 * sway[1],
              "smile": np.full(T, rng.uniform(0, 0.15)), "hand": np.zeros(T)}
    for start, end, name in actions:
        a = ACTIONS[name]
        on = (t >= start) & (t < end)
        w = a.profile((t[on] - start) / (end - start))
        base = tracks[a.track][on]
        tracks[a.track][on] = base * (1 - np.abs(w)) + w * a.target
    return {k: v.astype(np.float32) for k, v in tracks.items()}


def active_instructions(actions: list[tuple[float, float, str]], T: int, fps: float) -> list[str]:
    """The instruction in force at each frame's time, "" when none."""
    out = [""] * T
    for start, end, name in actions:
        for i in range(max(0, int(np.ceil(start * fps - 1e-9))), min(T, int(np.ceil(end * fps - 1e-9)))):
            out[i] = name
    return out


def mouth_track(audio: np.ndarray, speech: list[tuple[float, float]], T: int, fps: float) -> np.ndarray:
    """Mouth opening per frame: the loudness envelope inside utterances, closed outside them."""
    env = envelope(audio, fps, T)
    centre = (np.arange(T) + 0.5) / fps
    talking = np.zeros(T, bool)
    for s, e in speech:
        talking |= (centre >= s) & (centre < e)
    return np.where(talking, np.clip(1.25 * env, 0, 1), 0.0)


# ---------------------------------------------------------------------------------------------
# samples

@dataclass
class Sample:
    seed: int
    fps: int
    identity: Identity
    scene: Scene
    frames: np.ndarray  # [T, H, W, 3] uint8
    audio: np.ndarray  # [T * SR / fps] float32, 16 kHz mono
    tracks: dict[str, np.ndarray]  # State field -> [T] float32
    actions: list[tuple[float, float, str]]  # (start s, end s, instruction)
    instructions: list[str]  # [T] instruction in force, "" for none
    speech: list[tuple[float, float]]  # utterance intervals, s

    def state(self, i: int) -> State:
        return State(**{k: float(v[i]) for k, v in self.tracks.items()})

    def truth(self) -> dict:
        """Everything but the pixels and samples, JSON-ready."""
        T, H, W = self.frames.shape[:3]
        return {"seed": self.seed, "fps": self.fps, "frames": T, "width": W, "height": H,
                "duration_s": T / self.fps, "identity": asdict(self.identity), "scene": asdict(self.scene),
                "actions": [list(a) for a in self.actions], "speech_segments": [list(s) for s in self.speech],
                "instructions": self.instructions,
                "tracks": {k: [round(float(x), 4) for x in v] for k, v in self.tracks.items()}}


def make_sample(seed: int, width: int = 256, height: int = 256, fps: int = 25, seconds: float = 4.0) -> Sample:
    """A clip of T = 1 + 4k frames, fully determined by `seed` (the identity by the seed alone)."""
    r_identity, r_scene, r_speech, r_actions, r_motion = (np.random.default_rng(s) for s in
                                                          np.random.SeedSequence(seed).spawn(5))
    identity = random_identity(r_identity)
    scene = random_scene(r_scene, identity)
    T = frame_count(seconds, fps)
    audio, speech = random_speech(r_speech, T / fps)
    actions = random_actions(r_actions, T / fps)
    tracks = animate(r_motion, T, fps, mouth_track(audio, speech, T, fps), actions)
    frames = render_clip(identity, tracks, width, height, scene)
    return Sample(seed, fps, identity, scene, frames, audio, tracks, actions, active_instructions(actions, T, fps),
                  speech)


# ---------------------------------------------------------------------------------------------
# measuring the state back from pixels

YAW_GAIN = 0.25  # centroid shift of the lower-face features at |yaw| = 1, x head_w (fitted on rendered frames)
_OPEN = ndimage.generate_binary_structure(2, 1)


def _nearest(f: np.ndarray, palette: list) -> np.ndarray:
    """Index of the nearest palette colour per pixel: f [h, w, 3] -> [h, w]."""
    P = np.asarray(palette, np.float32)  # [K, 3]
    return np.argmin(((f[:, :, None, :] - P) ** 2).sum(-1), axis=-1)


def _region_colour(f: np.ndarray, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    H, W = f.shape[:2]
    i0, i1, j0, j1 = max(int(y0), 0), min(int(y1), H), max(int(x0), 0), min(int(x1), W)
    if i1 - i0 < 2 or j1 - j0 < 2:
        return np.full(3, np.nan)
    return np.median(f[i0:i1, j0:j1].reshape(-1, 3), axis=0)


def _mouth_shape(inner: np.ndarray, lips: np.ndarray, a0: float) -> tuple[float, float, float]:
    """Inner-mouth half-height (area / (pi * half-width)), half-width, and how far its corners sit
    above its middle (px), from masks of inner-mouth and lips-or-inner pixels [h, w]."""
    cols = np.nonzero(lips.any(0))[0]
    if len(cols) < 3 or not inner.any():
        return 0.0, 0.0, 0.0
    a = (cols[-1] - cols[0] + 1) / 2 - 0.12 * a0
    n = inner.sum(0)  # [w]
    has = np.nonzero(n)[0]
    cy = (inner * np.arange(inner.shape[0])[:, None]).sum(0)[has] / n[has]  # centre row per column
    u2 = ((has - (cols[0] + cols[-1]) / 2) / a) ** 2
    lift = -np.polyfit(u2, cy, 1)[0] if len(has) >= 3 and np.ptp(u2) > 0.05 else 0.0  # row = middle - lift * u^2
    return inner.sum() / (np.pi * a), a, lift


def _measure(frame: np.ndarray, idt: Identity) -> dict:
    """One frame's measurements; the face is the largest skin-coloured blob."""
    f = frame.astype(np.float32)
    skin = np.asarray(idt.skin, np.float32)
    mask = ndimage.binary_opening(((f - skin) ** 2).sum(-1) < skin_tolerance(idt.skin) ** 2, _OPEN)
    lab, n = ndimage.label(mask)
    if n == 0:
        return {"found": False}
    sizes = np.bincount(lab.ravel())[1:]
    face_id = int(np.argmax(sizes)) + 1
    rows, cols = ndimage.find_objects(lab)[face_id - 1]
    face = lab[rows, cols] == face_id
    filled = ndimage.binary_fill_holes(face)
    r0, c0 = rows.start, cols.start
    s = (cols.stop - cols.start) / (2 * idt.head_w)  # px per world unit
    W, H = idt.head_w * s, idt.head_h * s
    hx, hy = (cols.start + cols.stop) / 2, rows.stop - H
    fc = f[rows, cols]
    out = {"found": True, "head_x": hx, "head_y": hy, "scale": s, "skin": fc[face].mean(0)}

    split = hy + 0.5 * (idt.eye_y + idt.mouth_y) * H - r0  # between the eyes and the mouth, crop rows
    ys, xs = np.nonzero(filled & ~face)
    low = ys > hy + idt.eye_y * H - r0
    offset = (xs[low].mean() + c0 + 0.5 - hx) / W if low.any() else 0.0
    out["yaw"] = float(np.clip(offset / YAW_GAIN, -1.5, 1.5))

    inner = ndimage.binary_erosion(filled, _OPEN, iterations=2)  # off the outline, blended with the backdrop
    k = max(int(np.ceil(split)), 0)
    palette = [idt.skin, shade(idt.skin, 0.92), shade(idt.skin, 0.78), idt.lips, MOUTH]
    cls = np.where(inner[k:], _nearest(fc[k:], palette), 0)
    a0 = idt.mouth_w * W
    opening, a, lift = _mouth_shape(cls == 4, cls >= 3, a0)
    out["mouth"] = (opening / a0 - MOUTH_REST) / MOUTH_OPEN
    out["smile"] = lift / (0.3 * a) if a > 0 else 0.0

    palette = [idt.skin, shade(idt.skin, 0.92), shade(idt.skin, 0.78), shade(idt.skin, 0.5), idt.hair, PUPIL,
               EYE_WHITE, idt.eyes]
    up = max(int(np.floor(split)), 0)
    cls = np.where(inner[:up], _nearest(fc[:up], palette), 0)
    narrow = 2 - 0.3 * min(abs(out["yaw"]), 1)
    full = np.pi * (idt.eye_size * W) ** 2 * (EYE_ASPECT * narrow - 2 * PUPIL_R ** 2 * EYE_ASPECT ** 2)
    out["eyes"] = (cls >= 6).sum() / full

    others = [i + 1 for i in range(n) if i + 1 != face_id and sizes[i] > 0.1 * W * W]
    hand_top = None
    for i in others:
        r, c = ndimage.find_objects(lab)[i - 1]
        if abs((c.start + c.stop) / 2 - hx) > 1.2 * W:
            hand_top = r.start if hand_top is None else min(hand_top, r.start)
    out["hand_top"] = np.nan if hand_top is None else float(hand_top)

    out["shirt"] = _region_colour(f, hy + 1.6 * H, hy + 2.2 * H, hx - 0.5 * W, hx + 0.5 * W)
    out["hair"] = _region_colour(f, r0 - 0.15 * H, r0 - 1, hx - 0.3 * W, hx + 0.3 * W)
    return out


def _eye_reference(identity: Identity, scale: float, width: int, height: int) -> float:
    """The eye reading of this identity rendered with open eyes at this scale: the share of eye
    pixels that colour blends at the lids move to other classes depends on the colours."""
    ref = _measure(render(identity, State(), width, height, Scene(zoom=scale / height)), identity)
    return ref["eyes"] if ref["found"] and ref["eyes"] > 0 else 1.0


def analyze(frames: np.ndarray, identity: Identity) -> dict[str, np.ndarray]:
    """Measure a clip of this world [T, H, W, 3] uint8 from its pixels, knowing only who is in it.

    Per frame ([T], or [T, 3] for colours; NaN where the face is not found): found; head_x,
    head_y (px, head centre); scale (px per world unit); yaw (-1 left .. 1 right, from the
    lower-face features' offset from the head's midline); pitch (head drop against the clip's
    median height, so the head must rest most of the clip; 1 = a full nod); mouth (inner-mouth
    area over its width); smile (lift of the mouth corners); eyes (visible eye white + iris over
    that of the identity rendered with open eyes); hand (from the fingertips' height against the
    clip's median head height; 0 when no hand is seen); skin, shirt, hair: mean / median RGB in
    the face, below the neck, above the forehead. Calibrated at 256 x 256; about 6 ms a frame."""
    Hf = frames.shape[1]
    per = [_measure(fr, identity) for fr in frames]
    keys = ("head_x", "head_y", "scale", "yaw", "mouth", "smile", "eyes", "hand_top")
    out = {"found": np.array([p["found"] for p in per])}
    for k in keys:
        out[k] = np.array([p[k] if p["found"] else np.nan for p in per], np.float64)
    for k in ("skin", "shirt", "hair"):
        out[k] = np.stack([p[k] if p["found"] else np.full(3, np.nan) for p in per])
    if out["found"].any():
        out["eyes"] /= _eye_reference(identity, float(np.nanmedian(out["scale"])), frames.shape[2], Hf)
    H = identity.head_h * out["scale"]
    W = identity.head_w * out["scale"]
    rest = np.nanmedian(out["head_y"]) if out["found"].any() else np.nan
    out["pitch"] = (out["head_y"] - rest) / (NOD_DROP * H)
    hidden = Hf + (HAND_REACH + 0.1) * W
    palm = out.pop("hand_top") + HAND_REACH * W
    out["hand"] = np.where(np.isnan(palm), 0.0, (hidden - palm) / (hidden - rest - HAND_RAISE * H))
    out["hand"][~out["found"]] = np.nan
    return out


def identity_error(m: dict[str, np.ndarray], identity: Identity) -> float:
    """Mean RGB distance between measured skin / shirt / hair colours and the identity's."""
    d = [np.linalg.norm(m[k] - np.asarray(getattr(identity, k)), axis=-1) for k in ("skin", "shirt", "hair")]
    return float(np.nanmean(np.stack(d)))


# ---------------------------------------------------------------------------------------------
# datasets

def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a dataset drawn with `seed` (independent streams, 32-bit)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")  # the suffix tells PyAV the container
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class Synth(Stage):
    """Writes one sample per item: <out_dir>/<id>.mp4 and its ground truth <out_dir>/<id>.json."""

    name: ClassVar[str] = "synth"
    kind: ClassVar[str] = "synth"
    version: ClassVar[str] = "1"
    reads: ClassVar[tuple[str, ...]] = ("seed",)
    writes: ClassVar[tuple[str, ...]] = ("path", "seed", "width", "height", "fps", "frames", "duration_s",
                                         "identity", "actions", "speech_segments", "gt_path")

    out_dir: str = "synth"
    n: int = ranged(100, min=1)
    seed: int = ranged(0, min=0)
    width: int = ranged(256, min=64)
    height: int = ranged(256, min=64)
    fps: int = ranged(25, min=1)
    seconds: float = ranged(4.0, min=0)

    def items(self) -> list[dict]:
        return [{"id": f"synth-{self.seed}-{i:06d}", "seed": sample_seed(self.seed, i)} for i in range(self.n)]

    def error_row(self, item: dict, message: str) -> dict:
        return base_row("synth", id=item["id"], path=str(Path(self.out_dir) / f"{item['id']}.mp4"), seed=item["seed"])

    def process(self, item: dict) -> list[dict]:
        sample = make_sample(item["seed"], self.width, self.height, self.fps, self.seconds)
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        video, truth = out / f"{item['id']}.mp4", out / f"{item['id']}.json"
        _atomic(video, lambda p: write_video(p, sample.frames, self.fps, sample.audio))
        gt = sample.truth()
        _atomic(truth, lambda p: p.write_text(json.dumps(gt)))
        T = len(sample.frames)
        return [base_row("synth", id=item["id"], path=str(video), seed=item["seed"], width=self.width,
                         height=self.height, fps=float(self.fps), frames=T, duration_s=T / self.fps,
                         identity=json.dumps(gt["identity"]), actions=json.dumps(gt["actions"]),
                         speech_segments=[{"start": s, "end": e} for s, e in sample.speech], gt_path=str(truth))]


def synthesize(out_dir: str | os.PathLike, n: int, root: Path, seed: int = 0, width: int = 256, height: int = 256,
               fps: int = 25, seconds: float = 4.0, workers: int = 1, quiet: bool = True) -> RunResult:
    """Write `n` samples into `out_dir` and their "synth" manifest into the workspace `root`."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, not {n}")
    if width < 64 or height < 64 or width % 2 or height % 2:
        raise ValueError(f"frame size {width}x{height}: both sides must be even and at least 64 (H.264 4:2:0)")
    if fps < 1 or frame_count(seconds, fps) < 5:
        raise ValueError(f"{seconds} s at {fps} fps is too short: a sample needs at least 5 frames")
    out = Path(out_dir).expanduser().resolve()
    stage = Synth(out_dir=str(out), n=n, seed=seed, width=width, height=height, fps=fps, seconds=seconds)
    return run_stage(stage, stage.items(), [], [], root, workers=workers, quiet=quiet)


def write_dataset(out_dir: str | os.PathLike, n: int, seed: int = 0, width: int = 256, height: int = 256,
                  fps: int = 25, seconds: float = 4.0, workers: int = 1, workdir: str | os.PathLike | None = None,
                  quiet: bool = True) -> Path:
    """`synthesize` into the workspace `workdir` (default $VIDU_HOME or ./vidu-work); the manifest path."""
    return synthesize(out_dir, n, workspace(workdir), seed, width, height, fps, seconds, workers, quiet).path
