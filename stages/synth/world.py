"""The synthetic avatar world: who the character is (`Identity`), where (`Scene`), what it does in
one frame (`State`), and the instructed actions over time.

World units: lengths are fractions of the frame height at zoom 1; u grows to the right, v down,
(0, 0) is the frame centre. Yaw > 0 turns the face towards the image's right; pitch > 0 nods down.
The colour palettes keep skin apart from everything else, so the analyzer can find the face by colour.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import numpy as np

from stages.synth.speech import REST_ROUND

RGB = tuple[int, int, int]
EYE_WHITE: RGB = (242, 240, 232)
MOUTH: RGB = (95, 22, 32)  # inside of the open mouth
PUPIL: RGB = (18, 16, 20)

HEAD_V = -0.06  # v of the head centre at rest
NECK_LEN = 0.3  # chin to shoulders, x head_h
NOD_DROP = 0.18  # the head moves down by pitch * NOD_DROP * head_h
NOD_FEATURES = 0.08  # ... and the features further down inside the face by pitch * this * head_h
YAW_OUTLINE, YAW_HAIR, YAW_FEATURES, YAW_NOSE = 0.06, 0.15, 0.3, 0.42  # shifts at |yaw| = 1, x head_w
HAND_X = 1.65  # hand centre from the body midline, x head_w
HAND_RAISE = -0.1  # palm centre at hand = 1, below the rest head centre, x head_h
HAND_REACH = 0.74  # fingertips above the palm centre, x head_w
MOUTH_REST, MOUTH_OPEN = 0.1, 0.3  # inner mouth half-height = mouth half-width * (REST + OPEN * mouth)
ROUND_NARROW, ROUND_TALL = 0.35, 0.3  # rounding r: mouth width x (1 - NARROW (r - REST_ROUND)), height x (1 + TALL (r - REST_ROUND))
EYE_ASPECT, PUPIL_R = 0.6, 0.25  # eye half-height / half-width; pupil radius / eye half-height
OUTLINE: RGB = (34, 26, 30)  # anime line art
BROW_SHADE = 0.6  # brows are the hair colour darkened to this: contrast where face detectors look
FACE_HEIGHT = (0.45, 0.55)  # the head (chin to crown) spans this share of the frame height (dlib HOG finds it)
STYLES = {"human": 0.5, "anime": 0.25, "animal": 0.25}  # character styles and how often random_identity draws them

SKIN_TONES = [(255, 224, 196), (241, 194, 158), (224, 172, 130), (198, 134, 96), (160, 104, 72), (120, 78, 56)]
HAIR_COLOURS = [(25, 22, 22), (60, 40, 28), (110, 70, 40), (190, 150, 90), (150, 60, 35), (150, 150, 155),
                (40, 60, 140), (170, 60, 120), (40, 120, 80)]
IRIS_COLOURS = [(60, 100, 170), (70, 130, 90), (90, 60, 35), (50, 35, 25), (120, 110, 70), (110, 120, 130)]
TEXTURES = ("plain", "stripes", "checks", "waves")
ANIME_SKIN = [(255, 232, 218), (252, 218, 196), (240, 196, 168), (214, 160, 124), (170, 118, 88)]
ANIME_HAIR = [(30, 28, 40), (250, 225, 140), (240, 150, 190), (90, 130, 230), (150, 90, 200), (220, 60, 60),
              (200, 205, 215), (60, 170, 120), (250, 140, 50)]
ANIME_IRIS = [(40, 110, 220), (30, 160, 90), (200, 40, 60), (140, 60, 200), (220, 150, 30), (30, 170, 190)]
FUR = [(226, 140, 62), (196, 112, 52), (150, 150, 155), (232, 212, 172), (140, 96, 62), (240, 236, 228),
       (212, 172, 104), (110, 100, 96)]
FUR_MARKS = [(60, 44, 36), (34, 30, 30), (110, 110, 116), (180, 90, 40), (235, 230, 220), (140, 100, 70)]
ANIMAL_IRIS = [(196, 196, 60), (214, 150, 40), (100, 176, 80), (90, 150, 214), (170, 120, 40)]
MUZZLES = [(248, 244, 236), (226, 204, 192), (250, 226, 196), (120, 104, 100), (60, 52, 52)]
NOSES = [(222, 128, 138), (52, 40, 44), (176, 96, 96)]


@dataclass(frozen=True)
class Identity:
    """Who the character is: colours (RGB) and face geometry. Lengths in world units or as noted."""

    skin: RGB
    hair: RGB
    eyes: RGB  # iris
    shirt: RGB
    lips: RGB
    hair_style: str  # short | long (human, anime), spiky (anime), ears (animal: a crown with ears)
    head_w: float  # head half-width
    head_h: float  # head half-height
    eye_spacing: float  # eye centre to face midline, x head_w
    eye_size: float  # eye half-width, x head_w
    eye_y: float  # eye centre below the head centre, x head_h (negative: above)
    brow_gap: float  # brows above the eyes, x head_h
    brow_tilt: float  # radians
    nose_len: float  # x head_h
    mouth_w: float  # mouth half-width, x head_w
    mouth_y: float  # mouth centre below the head centre, x head_h
    hairline: float  # top of the forehead above the head centre, x head_h
    hair_volume: float  # hair outline / head outline
    shoulder_w: float  # x head_w
    neck_w: float  # neck half-width, x head_w
    hand_side: int  # -1: the hand rises on the image's left; +1: on its right
    style: str = "human"  # human | anime | animal
    eye_aspect: float = EYE_ASPECT  # eye half-height / half-width
    muzzle: RGB = (0, 0, 0)  # animal: the muzzle under the nose
    nose: RGB = (0, 0, 0)  # animal: the nose tip

    @classmethod
    def from_dict(cls, d: dict) -> "Identity":
        """From `dataclasses.asdict` output read back from JSON (colours come back as lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class Scene:
    """Per-sample backdrop and camera."""

    top: RGB = (70, 90, 120)  # gradient colours
    bottom: RGB = (35, 45, 65)
    gradient_angle: float = np.pi / 2  # direction from `top` to `bottom`, radians
    texture: str = "plain"  # plain | stripes | checks | waves
    texture_amp: float = 0.0  # 0..255 units
    texture_freq: float = 6.0  # cycles per world unit
    texture_angle: float = 0.0
    props: tuple[tuple[float, float, float, float, RGB], ...] = ()  # backdrop ellipses (u, v, half-axes, colour)
    pan_x: float = 0.0  # world units the character sits right of / below the frame centre
    pan_y: float = 0.0
    zoom: float = 1.0


@dataclass(frozen=True)
class State:
    """What the character does in one frame."""

    mouth: float = 0.0  # 0 closed .. 1 wide open
    round: float = REST_ROUND  # lip rounding: 0 spread .. 1 rounded (narrower and taller)
    eyes: float = 1.0  # 1 open .. 0 closed
    yaw: float = 0.0  # -1 turned to the image's left .. 1 to its right
    pitch: float = 0.0  # -1 looking up .. 1 nodded down
    smile: float = 0.0  # 0 .. 1
    hand: float = 0.0  # 0 below the frame .. 1 raised beside the head


TRACKS = tuple(f.name for f in fields(State))


def _dist(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def shade(c: RGB, k: float) -> tuple[float, float, float]:
    """The colour darkened to k of its brightness."""
    return tuple(k * v for v in c)


def skin_tolerance(skin: RGB) -> float:
    """RGB distance within which a pixel counts as this skin (shading reaches 8 %, shadows 22 %)."""
    return 0.16 * max(_dist(skin, (0, 0, 0)), 100.0)


def _pick(rng: np.random.Generator, palette: list[RGB], jitter: float, away_from: list[tuple[RGB, float]]) -> RGB:
    """A palette colour with jitter at least the given distance from each given colour."""
    for _ in range(1000):
        base = np.asarray(palette[rng.integers(len(palette))], np.float64)
        c = np.clip(base + rng.uniform(-jitter, jitter, 3), 0, 255)
        if all(_dist(c, o) >= d for o, d in away_from):
            return tuple(int(v) for v in np.rint(c))
    raise RuntimeError("no colour far enough from the others")  # palettes leave room; never reached


def _first_far(options: list[RGB], away_from: list[tuple[RGB, float]]) -> RGB:
    """The first option at least the given distance from each given colour (else the farthest)."""
    margin = [min(_dist(c, o) - d for o, d in away_from) for c in options]
    return options[int(np.argmax(np.asarray(margin) >= 0))] if max(margin) >= 0 else options[int(np.argmax(margin))]


def _skin(rng: np.random.Generator, tones: list[RGB]) -> RGB:
    """A tone between two neighbours of the list, jittered."""
    i = rng.uniform(0, len(tones) - 1)
    lo, hi = np.asarray(tones[int(i)]), np.asarray(tones[min(int(i) + 1, len(tones) - 1)])
    return tuple(int(v) for v in np.clip(np.rint(lo + (i - int(i)) * (hi - lo) + rng.uniform(-8, 8, 3)), 0, 255))


def random_identity(rng: np.random.Generator, style: str | None = None) -> Identity:
    """A character of the given style (default: drawn with the STYLES mix) whose hair, iris, shirt and
    lids stay far from its skin (fur), and iris from lids and lips."""
    style = style or str(rng.choice(list(STYLES), p=list(STYLES.values())))
    if style not in STYLES:
        raise ValueError(f"unknown character style {style!r}: choose one of {', '.join(STYLES)}")
    skin = _skin(rng, {"human": SKIN_TONES, "anime": ANIME_SKIN, "animal": FUR}[style])
    tol = skin_tolerance(skin)
    far = 2.2 * tol
    hair = _pick(rng, {"human": HAIR_COLOURS, "anime": ANIME_HAIR, "animal": FUR_MARKS}[style], 12, [(skin, far)])
    muzzle = nose = (0, 0, 0)
    if style == "animal":
        muzzle = _first_far(MUZZLES, [(skin, far), (hair, 60)])
        nose = _first_far(NOSES, [(skin, far), (muzzle, 80), (MOUTH, 60)])
        lips = _first_far([(64, 46, 48), (150, 84, 96), (40, 40, 64), (200, 150, 150)],
                          [(skin, far), (muzzle, 70), (MOUTH, 55), (nose, 70)])
    else:
        lips = tuple(int(round(0.6 * s + 0.4 * c)) for s, c in zip(skin, (175, 45, 65) if style == "human" else (150, 30, 50)))
    irises = {"human": IRIS_COLOURS, "anime": ANIME_IRIS, "animal": ANIMAL_IRIS}[style]
    eyes = _pick(rng, irises, 12, [(skin, far), (EYE_WHITE, 90), (PUPIL, 45), (MOUTH, 45), (hair, 45),
                                   (shade(skin, 0.5), 45), (muzzle, 45), (OUTLINE, 45), (lips, 45),
                                   (shade(hair, BROW_SHADE), 45)])
    shirt = _pick(rng, [(128, 128, 128)], 127, [(skin, 2.5 * tol), (hair, 60), (muzzle, 40)])
    u = rng.uniform
    common = dict(skin=skin, hair=hair, eyes=eyes, shirt=shirt, lips=lips, style=style, muzzle=muzzle, nose=nose,
                  shoulder_w=u(2.3, 3.0), neck_w=u(0.4, 0.52), hand_side=int(rng.choice([-1, 1])),
                  brow_tilt=u(-0.2, 0.2), hair_volume=u(1.04, 1.18))
    if style == "human":
        head_w = u(0.12, 0.16)
        return Identity(**common, hair_style=str(rng.choice(["short", "long"])), head_w=head_w,
                        head_h=head_w * u(1.15, 1.35), eye_spacing=u(0.3, 0.4), eye_size=u(0.14, 0.19),
                        eye_y=u(-0.15, 0.0), brow_gap=u(0.12, 0.18), nose_len=u(0.14, 0.22), mouth_w=u(0.28, 0.4),
                        mouth_y=u(0.42, 0.55), hairline=u(0.62, 0.85))
    if style == "anime":
        head_w = u(0.13, 0.16)
        return Identity(**common, hair_style=str(rng.choice(["spiky", "long"])), head_w=head_w,
                        head_h=head_w * u(1.12, 1.25), eye_spacing=u(0.34, 0.4), eye_size=u(0.21, 0.25),
                        eye_aspect=u(1.0, 1.15), eye_y=u(0.02, 0.1), brow_gap=u(0.36, 0.4), nose_len=u(0.05, 0.08),
                        mouth_w=u(0.2, 0.26), mouth_y=u(0.42, 0.5), hairline=u(0.64, 0.74))
    head_w = u(0.14, 0.17)
    return Identity(**common, hair_style="ears", head_w=head_w, head_h=head_w * u(0.92, 1.05),
                    eye_spacing=u(0.38, 0.46), eye_size=u(0.17, 0.21), eye_aspect=u(0.8, 0.95), eye_y=u(-0.18, -0.08),
                    brow_gap=u(0.2, 0.26), nose_len=u(0.1, 0.14), mouth_w=u(0.22, 0.3), mouth_y=u(0.5, 0.58),
                    hairline=u(0.72, 0.85))


def _segment_dist(p, a, b) -> float:
    p, a, b = (np.asarray(v, np.float64) for v in (p, a, b))
    t = np.clip(np.dot(p - a, b - a) / max(np.dot(b - a, b - a), 1e-9), 0, 1)
    return _dist(p, a + t * (b - a))


def random_scene(rng: np.random.Generator, identity: Identity) -> Scene:
    """A backdrop whose every colour (gradient +- texture) stays far from the skin, and a camera."""
    texture = str(rng.choice(TEXTURES))
    amp = 0.0 if texture == "plain" else float(rng.uniform(6, 30))
    need = 2.5 * skin_tolerance(identity.skin) + amp * np.sqrt(3)

    def colour() -> RGB:
        while True:
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
            if _dist(c, identity.skin) >= need:
                return c

    while True:  # a gradient with a clear change of brightness: varied layouts for perceptual hashes
        top, bottom = colour(), colour()
        if _segment_dist(identity.skin, top, bottom) >= need and abs(sum(top) - sum(bottom)) >= 150:
            break
    props = tuple((float(rng.uniform(-0.9, 0.9)), float(rng.uniform(-0.6, 0.4)), float(rng.uniform(0.08, 0.5)),
                   float(rng.uniform(0.08, 0.5)), colour()) for _ in range(rng.integers(4, 12)))
    zoom = float(rng.uniform(*FACE_HEIGHT)) / (2 * identity.head_h)  # face-framed: head and shoulders
    room = 0.48 / zoom - (HAND_X + 0.5) * identity.head_w  # the raised hand stays inside a square frame
    pan_x = identity.hand_side * (float(rng.uniform(-0.04, min(0.04, room))) if room > -0.04 else room)
    return Scene(top=top, bottom=bottom, gradient_angle=float(rng.uniform(0, 2 * np.pi)), texture=texture,
                 texture_amp=amp, texture_freq=float(rng.uniform(3, 12)), texture_angle=float(rng.uniform(0, np.pi)),
                 props=props, pan_x=pan_x, pan_y=float(rng.uniform(-0.02, 0.02)), zoom=zoom)



# ---------------------------------------------------------------------------------------------
# actions and instructions over time

def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


def _hold(p: np.ndarray) -> np.ndarray:
    """Ease in over the first quarter, hold, ease out over the last quarter."""
    return _smoothstep(p / 0.25) * _smoothstep((1 - p) / 0.25)


def _pulse(p: np.ndarray) -> np.ndarray:
    """Fully on for the middle 40 %, easing in from the start and out to the end."""
    return _smoothstep((0.5 - np.abs(p - 0.5)) / 0.3)


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


INSTRUCTION_DELAY = 0.2  # s from an instruction's onset (when it is given) to the start of its action


class Event(NamedTuple):
    """A timed instruction: given at `onset`, performed from `start` = onset + INSTRUCTION_DELAY to `end` (s)."""

    onset: float
    start: float
    end: float
    text: str  # the instruction, an ACTIONS name


def event(onset: float, text: str, seconds: float) -> Event:
    """The instruction `text` given at `onset`, its action lasting `seconds`."""
    start = round(onset + INSTRUCTION_DELAY, 4)
    return Event(round(onset, 4), start, round(start + seconds, 4), text)


VISIBLE_S = 0.2  # cut_actions: an action that ends past the clip still shows at least this long in it


def random_events(rng: np.random.Generator, duration: float, cut_actions: bool = False) -> list[Event]:
    """Non-overlapping instructions whose actions fit in the clip, about one per 2.5 s (possibly none).
    `cut_actions` (training clips): also the next instruction whose action the clip's end cuts, if at
    least VISIBLE_S of it is in the clip, so short clips see instructions act (a 1.3 s clip otherwise
    holds a whole action in ~1 of 5 clips). The draws are the same either way: a seed's events only
    gain that last one."""
    names = list(ACTIONS)
    out = []
    t = rng.exponential(0.6)
    while True:
        name = names[rng.integers(len(names))]
        e = event(t, name, rng.uniform(*ACTIONS[name].seconds))
        if e.end > duration:
            return out + [e] if cut_actions and e.start + VISIBLE_S <= duration else out
        out.append(e)
        t = e.end + 0.2 + rng.exponential(1.2)


def animate(rng: np.random.Generator, T: int, fps: float, mouth: np.ndarray,
            actions: list[tuple[float, float, str]], rounding: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-frame tracks (State fields -> [T] float32): a slow idle sway of the head and a resting
    smile, the given mouth opening and rounding, and each action (start s, end s, name) blended in
    over its interval."""
    t = np.arange(T) / fps
    sway = [sum(rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 6.3))
                for _ in range(2)) / 2 for _ in range(2)]
    tracks = {"mouth": np.asarray(mouth, np.float64), "round": np.full(T, REST_ROUND) if rounding is None else
              np.asarray(rounding, np.float64), "eyes": np.ones(T), "yaw": 0.08 * sway[0], "pitch": 0.05 * sway[1],
              "smile": np.full(T, rng.uniform(0, 0.15)), "hand": np.zeros(T)}
    for start, end, name in actions:
        a = ACTIONS[name]
        on = (t >= start) & (t < end)
        w = a.profile((t[on] - start) / (end - start))
        base = tracks[a.track][on]
        tracks[a.track][on] = base * (1 - np.abs(w)) + w * a.target
    return {k: v.astype(np.float32) for k, v in tracks.items()}


def active_instructions(events: list[Event], T: int, fps: float) -> list[str]:
    """The instruction in force at each frame's time, from its onset to the end of its action; "" when none."""
    out = [""] * T
    for start, _, end, name in events:
        for i in range(max(0, int(np.ceil(start * fps - 1e-9))), min(T, int(np.ceil(end * fps - 1e-9)))):
            out[i] = name
    return out


