"""Samples and datasets of the synthetic world: `make_sample(seed)` and the `vidu synth` stage.

    s = make_sample(7, seconds=8.0, style="anime", masks=True)   # 201 frames at 256 x 256 and ground truth
    s.events   # [Event(onset, start = onset + INSTRUCTION_DELAY, end, text)]: timed instructions
    s.truth()  # JSON-ready: identity, scene, events, speech segments, visemes, per-frame tracks

Speed: 0.9-1.7 8-second clips per second per CPU core at 256 x 256 (stages/synth/render.py)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from manifests.io import workspace
from stages.run import RunResult, Stage, base_row, ranged
from stages.synth.render import render_clip
from stages.synth.speech import SR, RealDirs, Speech, Voice, mouth_tracks, speak
from stages.synth.world import (
    INSTRUCTION_DELAY,
    STYLES,
    Event,
    Identity,
    Scene,
    State,
    active_instructions,
    animate,
    frame_count,
    random_events,
    random_identity,
    random_scene,
)


@dataclass
class Sample:
    seed: int
    fps: int
    identity: Identity
    scene: Scene
    frames: np.ndarray  # [T, H, W, 3] uint8
    audio: np.ndarray  # [T * SR / fps] float32, 16 kHz mono
    tracks: dict[str, np.ndarray]  # State field -> [T] float32
    actions: list[tuple[float, float, str]]  # (instruction onset s, action end s, instruction), one per event
    instructions: list[str]  # [T] instruction in force (from its onset to its action's end), "" for none
    speech: list[tuple[float, float]]  # utterance intervals, s
    masks: dict[str, np.ndarray] | None = None  # region -> [T, H, W] float32 (render.region_masks), if asked for
    events: list[Event] = field(default_factory=list)  # timed instructions: (onset, start, end, text)
    said: Speech | None = None  # the speech with its source, text and visemes (audio is `audio`)

    def state(self, i: int) -> State:
        return State(**{k: float(v[i]) for k, v in self.tracks.items()})

    def truth(self) -> dict:
        """Everything but the pixels and samples, JSON-ready."""
        T, H, W = self.frames.shape[:3]
        said = self.said or Speech(self.audio, self.speech, [], "", "")
        return {"seed": self.seed, "fps": self.fps, "frames": T, "width": W, "height": H,
                "duration_s": T / self.fps, "identity": asdict(self.identity), "scene": asdict(self.scene),
                "actions": [list(a) for a in self.actions], "events": [list(e) for e in self.events],
                "instruction_delay_s": INSTRUCTION_DELAY, "speech_segments": [list(s) for s in self.speech],
                "speech_source": said.source, "speech_text": said.text, "visemes": [list(v) for v in said.visemes],
                "instructions": self.instructions,
                "tracks": {k: [round(float(x), 4) for x in v] for k, v in self.tracks.items()}}


def render_sample(seed: int, identity: Identity, scene: Scene, speech: Speech, events: list[Event], T: int,
                  r_motion: np.random.Generator, width: int, height: int, fps: int, masks: bool = False,
                  draw: bool = True) -> Sample:
    """The sample of this character, speech and timed instructions: tracks animated, frames drawn (with
    `draw` False they are not: `frames` is then a read-only zero-stride view of black frames that only
    gives the shape, for the inputs and ground truth of streams too long to hold drawn)."""
    mouth = mouth_tracks(speech, T, fps)
    tracks = animate(r_motion, T, fps, mouth["mouth"], [(e.start, e.end, e.text) for e in events], mouth["round"])
    if not draw:
        if masks:
            raise ValueError("masks are drawn with the frames: draw=False has none")
        frames, regions = np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (T, height, width, 3)), None
    elif masks:
        frames, regions = render_clip(identity, tracks, width, height, scene, masks=True)
    else:
        frames, regions = render_clip(identity, tracks, width, height, scene), None
    audio = np.zeros(round(T / fps * SR), np.float32)
    audio[:min(len(audio), len(speech.audio))] = speech.audio[:len(audio)]
    return Sample(seed, fps, identity, scene, frames, audio, tracks, [(e.onset, e.end, e.text) for e in events],
                  active_instructions(events, T, fps),
                  list(speech.segments), regions, list(events), speech)


SPEECH_MIN_S = 4.0  # shorter clips are cut from a clip of speech this long (sentences outlast a 1 s clip)


def clip_speech(rng: np.random.Generator, duration: float, split: str, real_dir: RealDirs,
                voice: Voice | None = None) -> Speech:
    """`speak` for `duration` s; under SPEECH_MIN_S, a window of a SPEECH_MIN_S clip, at a random offset."""
    if duration >= SPEECH_MIN_S:
        return speak(rng, duration, split, real_dir, voice)
    long = speak(rng, SPEECH_MIN_S, split, real_dir, voice)
    t0 = round(float(rng.uniform(0, SPEECH_MIN_S - duration)) * SR) / SR
    n = round(duration * SR)
    a0 = round(t0 * SR)
    clip = lambda a, b: (round(max(a - t0, 0.0), 4), round(min(b - t0, duration), 4))  # noqa: E731
    segments = [clip(a, b) for a, b in long.segments if b > t0 and a < t0 + duration]
    visemes = [(*clip(a, b), v) for a, b, v in long.visemes if b > t0 and a < t0 + duration]
    phones = [(p, *clip(a, b)) for p, a, b in long.phones if b > t0 and a < t0 + duration]
    return Speech(long.audio[a0:a0 + n], [(a, b) for a, b in segments if b - a > 0.05], visemes, long.source,
                  long.text, phones)


def _streams(seed: int) -> list[np.random.Generator]:
    """Clip `seed`'s five independent streams: identity, scene, speech, actions, motion."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)]


def character(seed: int, style: str | None = None) -> tuple:
    """Clip `seed`'s character and scene (make_sample's), drawn without its speech, actions or pixels."""
    r_identity, r_scene = _streams(seed)[:2]
    identity = random_identity(r_identity, style)
    return identity, random_scene(r_scene, identity)


def make_sample(seed: int, width: int = 256, height: int = 256, fps: int = 25, seconds: float = 4.0,
                masks: bool = False, style: str | None = None, split: str = "train",
                real_dir: RealDirs = None, cut_actions: bool = False, events: list[Event] | None = None,
                draw: bool = True, voice: Voice | None = None) -> Sample:
    """A clip of T = 1 + 4k frames, fully determined by `seed` (the identity by the seed and `style`
    alone): a character of `style` (default: drawn with world.STYLES), speech of `split`'s voices,
    texts and recordings (speech.speak; `real_dir` holds recordings), timed instructions (with
    `cut_actions`, training's clips: also one whose action the clip's end cuts, world.random_events). With
    `masks`, also the region masks of its frames (face, eyes, mouth, hands). `events` replaces the drawn
    instructions (everything else stays the seed's: a probe of what one instruction does). `draw` False:
    everything but the pixels (render_sample). `voice`: the speech is TTS in this character voice, not
    augmented (speech.speak; the joint model's target)."""
    identity, scene = character(seed, style)
    r_speech, r_actions, r_motion = _streams(seed)[2:]
    T = frame_count(seconds, fps)
    speech = clip_speech(r_speech, T / fps, split, real_dir, voice)
    if events is None:
        events = random_events(r_actions, T / fps, cut_actions)
    return render_sample(seed, identity, scene, speech, events, T, r_motion, width, height, fps, masks, draw)


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
    version: ClassVar[str] = "2"  # 2: world v2 (styles, face framing, TTS speech, timed instructions)
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
    style: str = ""  # "" draws the world.STYLES mix; or human | anime | animal

    def items(self) -> list[dict]:
        return [{"id": f"synth-{self.seed}-{i:06d}", "seed": sample_seed(self.seed, i)} for i in range(self.n)]

    def error_row(self, item: dict, message: str) -> dict:
        return base_row("synth", id=item["id"], path=str(Path(self.out_dir) / f"{item['id']}.mp4"), seed=item["seed"])

    def process(self, item: dict) -> list[dict]:
        sample = make_sample(item["seed"], self.width, self.height, self.fps, self.seconds, style=self.style or None)
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        video, truth = out / f"{item['id']}.mp4", out / f"{item['id']}.json"
        from stages.sense.media import write_video   # PyAV only where files are written (not on the GPU image)
        _atomic(video, lambda p: write_video(p, sample.frames, self.fps, sample.audio))
        gt = sample.truth()
        _atomic(truth, lambda p: p.write_text(json.dumps(gt)))
        T = len(sample.frames)
        return [base_row("synth", id=item["id"], path=str(video), seed=item["seed"], width=self.width,
                         height=self.height, fps=float(self.fps), frames=T, duration_s=T / self.fps,
                         identity=json.dumps(gt["identity"]), actions=json.dumps(gt["actions"]),
                         speech_segments=[{"start": s, "end": e} for s, e in sample.speech], gt_path=str(truth))]


def synthesize(out_dir: str | os.PathLike, n: int, root: Path, seed: int = 0, width: int = 256, height: int = 256,
               fps: int = 25, seconds: float = 4.0, workers: int = 1, quiet: bool = True,
               style: str = "") -> RunResult:
    """Write `n` samples into `out_dir` and their "synth" manifest into the workspace `root`."""
    if style and style not in STYLES:
        raise ValueError(f"--style {style!r}: choose one of {', '.join(STYLES)} (or leave it out for the mix)")
    if n < 1:
        raise ValueError(f"--n must be at least 1, not {n}")
    if width < 64 or height < 64 or width % 2 or height % 2:
        raise ValueError(f"frame size {width}x{height}: both sides must be even and at least 64 (H.264 4:2:0)")
    if fps < 1 or frame_count(seconds, fps) < 5:
        raise ValueError(f"{seconds} s at {fps} fps is too short: a sample needs at least 5 frames")
    out = Path(out_dir).expanduser().resolve()
    stage = Synth(out_dir=str(out), n=n, seed=seed, width=width, height=height, fps=fps, seconds=seconds,
                  style=style)
    from stages.run import run_stage   # the runner (DuckDB) only where a stage runs: the GPU image renders without it
    return run_stage(stage, stage.items(), [], [], root, workers=workers, quiet=quiet)


def write_dataset(out_dir: str | os.PathLike, n: int, seed: int = 0, width: int = 256, height: int = 256,
                  fps: int = 25, seconds: float = 4.0, workers: int = 1, workdir: str | os.PathLike | None = None,
                  quiet: bool = True) -> Path:
    """`synthesize` into the workspace `workdir` (default $VIDU_HOME or ./vidu-work); the manifest path."""
    return synthesize(out_dir, n, workspace(workdir), seed, width, height, fps, seconds, workers, quiet).path
