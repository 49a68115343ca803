"""The synthetic avatar: a randomised character (`Identity`) in a randomised `Scene`, drawn in a
given `State` (mouth, eyes, yaw, pitch, smile, raised hand) by a vectorised numpy renderer.

World units: lengths are fractions of the frame height at zoom 1; u grows to the right, v down,
(0, 0) is the frame centre. Yaw > 0 turns the face towards the image's right; pitch > 0 nods down.
The colour palettes keep skin apart from everything else, so stages/synth.py can find the face
by colour. Used through stages/synth.py.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np

from stages.synthmedia import Ellipse, paint

RGB = tuple[int, int, int]
EYE_WHITE: RGB = (242, 240, 232)
MOUTH: RGB = (95, 22, 32)  # inside of the open mouth
PUPIL: RGB = (18, 16, 20)

HEAD_V = -0.1  # v of the head centre at rest
NECK_LEN = 0.3  # chin to shoulders, x head_h
NOD_DROP = 0.18  # the head moves down by pitch * NOD_DROP * head_h
NOD_FEATURES = 0.08  # ... and the features further down inside the face by pitch * this * head_h
YAW_OUTLINE, YAW_HAIR, YAW_FEATURES, YAW_NOSE = 0.06, 0.15, 0.3, 0.42  # shifts at |yaw| = 1, x head_w
HAND_X = 1.9  # hand centre from the body midline, x head_w
HAND_RAISE = -0.1  # palm centre at hand = 1, below the rest head centre, x head_h
HAND_REACH = 0.74  # fingertips above the palm centre, x head_w
MOUTH_REST, MOUTH_OPEN = 0.1, 0.3  # inner mouth half-height = mouth half-width * (REST + OPEN * mouth)
EYE_ASPECT, PUPIL_R = 0.6, 0.25  # eye half-height / half-width; pupil radius / eye half-height

SKIN_TONES = [(255, 224, 196), (241, 194, 158), (224, 172, 130), (198, 134, 96), (160, 104, 72), (120, 78, 56)]
HAIR_COLOURS = [(25, 22, 22), (60, 40, 28), (110, 70, 40), (190, 150, 90), (150, 60, 35), (150, 150, 155),
                (40, 60, 140), (170, 60, 120), (40, 120, 80)]
IRIS_COLOURS = [(60, 100, 170), (70, 130, 90), (90, 60, 35), (50, 35, 25), (120, 110, 70), (110, 120, 130)]
TEXTURES = ("plain", "stripes", "checks", "waves")


@dataclass(frozen=True)
class Identity:
    """Who the character is: colours (RGB) and face geometry. Lengths in world units or as noted."""

    skin: RGB
    hair: RGB
    eyes: RGB  # iris
    shirt: RGB
    lips: RGB
    hair_style: str  # short | long
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


def random_identity(rng: np.random.Generator) -> Identity:
    """A character whose hair, iris, shirt and lids stay far from its skin, and iris from lids and lips."""
    i = rng.uniform(0, len(SKIN_TONES) - 1)
    lo, hi = np.asarray(SKIN_TONES[int(i)]), np.asarray(SKIN_TONES[min(int(i) + 1, len(SKIN_TONES) - 1)])
    skin = tuple(int(v) for v in np.clip(np.rint(lo + (i - int(i)) * (hi - lo) + rng.uniform(-8, 8, 3)), 0, 255))
    far = 2.2 * skin_tolerance(skin)
    hair = _pick(rng, HAIR_COLOURS, 12, [(skin, far)])
    eyes = _pick(rng, IRIS_COLOURS, 12, [(skin, far), (EYE_WHITE, 90), (PUPIL, 45), (MOUTH, 45), (hair, 45),
                                         (shade(skin, 0.5), 45)])
    shirt = _pick(rng, [(128, 128, 128)], 127, [(skin, 2.5 * skin_tolerance(skin)), (hair, 60)])
    lips = tuple(int(round(0.6 * s + 0.4 * c)) for s, c in zip(skin, (175, 45, 65)))
    head_w = rng.uniform(0.12, 0.16)
    return Identity(
        skin=skin, hair=hair, eyes=eyes, shirt=shirt, lips=lips, hair_style=str(rng.choice(["short", "long"])),
        head_w=head_w, head_h=head_w * rng.uniform(1.15, 1.35), eye_spacing=rng.uniform(0.3, 0.4),
        eye_size=rng.uniform(0.14, 0.19), eye_y=rng.uniform(-0.15, 0.0), brow_gap=rng.uniform(0.12, 0.18),
        brow_tilt=rng.uniform(-0.2, 0.2), nose_len=rng.uniform(0.14, 0.22), mouth_w=rng.uniform(0.28, 0.4),
        mouth_y=rng.uniform(0.42, 0.55), hairline=rng.uniform(0.62, 0.85), hair_volume=rng.uniform(1.04, 1.18),
        shoulder_w=rng.uniform(2.3, 3.0), neck_w=rng.uniform(0.4, 0.52), hand_side=int(rng.choice([-1, 1])))


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
    zoom = float(rng.uniform(0.75, 1.3))
    room = 0.48 / zoom - (HAND_X + 0.6) * identity.head_w  # the raised hand stays inside a square frame
    pan_x = identity.hand_side * float(rng.uniform(-0.12, min(0.12, room)))
    return Scene(top=top, bottom=bottom, gradient_angle=float(rng.uniform(0, 2 * np.pi)), texture=texture,
                 texture_amp=amp, texture_freq=float(rng.uniform(3, 12)), texture_angle=float(rng.uniform(0, np.pi)),
                 props=props, pan_x=pan_x, pan_y=float(rng.uniform(-0.06, 0.06)), zoom=zoom)


# ---------------------------------------------------------------------------------------------
# rendering

def _camera(scene: Scene, height: int, width: int) -> tuple[float, float, float]:
    """Pixels per world unit and the pixel position of the world origin."""
    s = scene.zoom * height
    return s, width / 2 + scene.pan_x * s, height / 2 + scene.pan_y * s


@lru_cache(maxsize=16)
def _backdrop(identity: Identity, scene: Scene, width: int, height: int) -> np.ndarray:
    """Background and torso, which never move: [H, W, 3] uint8."""
    s, ox, oy = _camera(scene, height, width)
    xn = (np.arange(width, dtype=np.float32) + 0.5 - width / 2)[None, :] / height
    yn = (np.arange(height, dtype=np.float32) + 0.5 - height / 2)[:, None] / height
    t = np.clip(0.5 + xn * np.cos(scene.gradient_angle) + yn * np.sin(scene.gradient_angle), 0, 1)[..., None]
    img = np.asarray(scene.top, np.float32) * (1 - t) + np.asarray(scene.bottom, np.float32) * t
    if scene.texture != "plain":
        u = (np.arange(width, dtype=np.float32)[None, :] + 0.5 - ox) / s  # world coordinates: pans with the camera
        v = (np.arange(height, dtype=np.float32)[:, None] + 0.5 - oy) / s
        ca, sa, k = np.cos(scene.texture_angle), np.sin(scene.texture_angle), 2 * np.pi * scene.texture_freq
        p1, p2 = k * (u * ca + v * sa), k * (v * ca - u * sa)
        tex = {"stripes": lambda: np.sin(p1), "checks": lambda: np.tanh(4 * np.sin(p1) * np.sin(p2)),
               "waves": lambda: np.sin(p1 + 1.5 * np.sin(p2))}[scene.texture]()
        img = img + scene.texture_amp * tex[..., None]
    img = np.clip(img, 0, 255)[None]
    for u, v, a, b, c in scene.props:
        paint(img, (0, 0), Ellipse(ox + u * s, oy + v * s, a * s, b * s), c)
    W = identity.head_w * s
    top = oy + (HEAD_V + identity.head_h * (1 + NECK_LEN)) * s
    a = identity.shoulder_w * W
    paint(img, (0, 0), Ellipse(ox, top + 0.9 * a, a, 0.9 * a), identity.shirt)
    out = (img[0] + 0.5).astype(np.uint8)
    out.flags.writeable = False
    return out


def _head_features(buf, org, idt: Identity, st: State, bx, fx, fy, W, H) -> None:
    """Brows, eyes, nose and mouth; bx: the body midline, (fx, fy) [T]: the centre the features move with."""
    for side in (-1, 1):
        narrow = 1 - 0.3 * np.maximum(0.0, side * st.yaw)  # the eye on the side turned away is foreshortened
        ex = fx + side * idt.eye_spacing * W * (1 - 0.1 * np.abs(st.yaw))
        ey = fy + idt.eye_y * H
        ew, eh_full = idt.eye_size * W * narrow, EYE_ASPECT * idt.eye_size * W
        eh = eh_full * st.eyes
        paint(buf, org, Ellipse(ex, ey - idt.brow_gap * H, idt.eye_size * W * narrow, 0.045 * H,
                                side * idt.brow_tilt, -0.02 * H), idt.hair)
        paint(buf, org, Ellipse(ex, ey, 1.1 * ew, 1.05 * eh + 0.07 * eh_full + 0.6), shade(idt.skin, 0.5))
        open_ = eh > 0.25
        if open_.any():
            gx = ex + st.yaw * 0.3 * ew
            paint(buf, org, Ellipse(ex, ey, ew, eh), EYE_WHITE, weight=open_)
            paint(buf, org, Ellipse(gx, ey, 0.55 * eh_full, 0.55 * eh), idt.eyes, weight=open_)  # inside the white
            paint(buf, org, Ellipse(gx, ey, PUPIL_R * eh_full, PUPIL_R * eh), PUPIL, weight=open_)
    ny = fy + (idt.eye_y + 0.55 * (idt.mouth_y - idt.eye_y)) * H
    nx = bx + st.yaw * YAW_NOSE * W
    paint(buf, org, Ellipse(nx, ny, 0.09 * W, 0.5 * idt.nose_len * H, 0.15 * st.yaw), shade(idt.skin, 0.78))
    a0 = idt.mouth_w * W
    a = a0 * (1 + 0.2 * st.smile) * (1 - 0.15 * np.abs(st.yaw))
    b = a0 * (MOUTH_REST + MOUTH_OPEN * st.mouth)
    my, bend = fy + idt.mouth_y * H, -0.3 * st.smile * a
    paint(buf, org, Ellipse(fx, my, a + 0.12 * a0, b + 0.16 * a0, bend=bend), idt.lips)
    paint(buf, org, Ellipse(fx, my, a, b, bend=bend), MOUTH)


def _draw_head(img: np.ndarray, idt: Identity, st: State, s: float, ox: float, oy: float) -> None:
    """Paints the head of frame t with st's fields [T] into img [T, H, W, 3] uint8."""
    W, H = idt.head_w * s, idt.head_h * s
    bx, by = ox, oy + HEAD_V * s  # rest head centre; the neck and body stay here
    hx, hy = bx + st.yaw * YAW_OUTLINE * W, by + st.pitch * NOD_DROP * H
    fx, fy = bx + st.yaw * YAW_FEATURES * W, hy + st.pitch * NOD_FEATURES * H
    vol = idt.hair_volume
    x0, x1 = max(int(bx - 1.4 * vol * W), 0), min(int(bx + 1.4 * vol * W) + 2, img.shape[2])
    y0, y1 = max(int(np.min(hy) - 1.1 * vol * H), 0), min(int(by + 1.8 * H) + 2, img.shape[1])
    if x0 >= x1 or y0 >= y1:
        return
    buf = img[:, y0:y1, x0:x1].astype(np.float32)
    org = (x0, y0)
    if idt.hair_style == "long":
        back = Ellipse(hx, hy + 0.45 * H, 1.08 * vol * W, H)
        paint(buf, org, back, idt.hair, shade=0.2, ymin=hy)  # above hy it is under the cap
    shoulders = by + (1 + NECK_LEN) * H
    paint(buf, org, Ellipse(bx, shoulders, idt.neck_w * W, 0.8 * H), shade(idt.skin, 0.7), ymax=shoulders + 0.03 * H)
    paint(buf, org, Ellipse(hx, hy, W, H), idt.skin, shade=0.08)
    _head_features(buf, org, idt, st, bx, fx, fy, W, H)
    hair_x = bx + st.yaw * YAW_HAIR * W
    window = Ellipse(hair_x, fy + H, 1.2 * W, (idt.hairline + 1.0) * H)  # the face under the hair
    paint(buf, org, Ellipse(hair_x, hy - 0.6 * (vol - 1) * H, vol * W, vol * H), idt.hair, shade=0.15, hole=window,
          ymax=hy + 0.05 * H)
    buf += 0.5
    img[:, y0:y1, x0:x1] = buf


def _hand_y(hand, rest_y: float, W: float, H: float, height: int):
    """Palm centre row: below the frame (fingertips hidden) at hand = 0, beside the head at 1."""
    hidden = height + (HAND_REACH + 0.1) * W
    return hidden + (rest_y + HAND_RAISE * H - hidden) * hand


def _draw_hand(img: np.ndarray, idt: Identity, hand: np.ndarray, s: float, ox: float, oy: float) -> None:
    """Paints the raised hand (hand [T]) into img [T, H, W, 3] uint8."""
    W, H = idt.head_w * s, idt.head_h * s
    side = idt.hand_side
    px = ox + side * HAND_X * W
    py = _hand_y(hand, oy + HEAD_V * s, W, H, img.shape[1])
    x0, x1 = max(int(px - 0.8 * W), 0), min(int(px + 0.8 * W) + 2, img.shape[2])
    y0, y1 = max(int(np.min(py) - (HAND_REACH + 0.1) * W), 0), img.shape[1]
    if x0 >= x1 or y0 >= y1:
        return
    buf = img[:, y0:y1, x0:x1].astype(np.float32)
    org = (x0, y0)
    paint(buf, org, Ellipse(px, py + 10 * W, 0.36 * W, 10 * W), shade(idt.shirt, 0.82))  # sleeve
    paint(buf, org, Ellipse(px, py, 0.34 * W, 0.4 * W), idt.skin)
    for k in range(4):
        paint(buf, org, Ellipse(px + (k - 1.5) * 0.17 * W, py - 0.48 * W, 0.075 * W, 0.26 * W, (k - 1.5) * 0.1),
              idt.skin)
    paint(buf, org, Ellipse(px + side * 0.36 * W, py - 0.08 * W, 0.075 * W, 0.22 * W, side * 0.6), idt.skin)
    buf += 0.5
    img[:, y0:y1, x0:x1] = buf


def render_clip(identity: Identity, tracks: dict[str, np.ndarray], width: int, height: int,
                scene: Scene = Scene(), chunk: int = 48) -> np.ndarray:
    """Frames [T, height, width, 3] uint8 for per-frame State fields `tracks` ([T] each), drawn in
    equal batches of at most `chunk` frames (about 1 ms a frame at 256 x 256)."""
    T = len(tracks["mouth"])
    out = np.empty((T, height, width, 3), np.uint8)
    out[:] = _backdrop(identity, scene, width, height)
    s, ox, oy = _camera(scene, height, width)
    chunk = -(-T // -(-T // chunk))
    for t0 in range(0, T, chunk):
        st = State(**{k: np.asarray(tracks[k][t0:t0 + chunk], np.float32) for k in TRACKS})
        frames = out[t0:t0 + chunk]
        _draw_head(frames, identity, st, s, ox, oy)
        up = np.nonzero(st.hand > 0.01)[0]
        if len(up):
            raised = frames[up]
            _draw_hand(raised, identity, st.hand[up], s, ox, oy)
            frames[up] = raised
    return out


def render(identity: Identity, state: State, width: int, height: int, scene: Scene = Scene()) -> np.ndarray:
    """One RGB frame [height, width, 3] uint8."""
    return render_clip(identity, {k: [getattr(state, k)] for k in TRACKS}, width, height, scene)[0]
