"""The one renderer of the synthetic world: a vectorised numpy painter of anti-aliased ellipses and
the character of each style (human, anime, animal) drawn with it in a given `State`, with region
masks (face, eyes, mouth, hands) on request.

Speed (CPU seconds on one core of the 2-core dev VM, an 8 s clip at 25 fps = 201 frames at 256 x 256,
benchmarks/RESULTS.md 2026-12-01 "world v2"): human 0.46 s (2.2 clips/s per core), anime 1.04 s (1.0),
animal 0.74 s (1.4); masks add 35-70 %; `make_sample` with speech 0.58 / 1.18 / 1.13 s (1.7 / 0.85 /
0.9 clips/s per core)."""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from stages.synth.world import (
    EYE_WHITE,
    HAND_RAISE,
    HAND_REACH,
    HAND_X,
    HEAD_V,
    MOUTH,
    MOUTH_OPEN,
    MOUTH_REST,
    NECK_LEN,
    NOD_DROP,
    NOD_FEATURES,
    BROW_SHADE,
    OUTLINE,
    PUPIL,
    PUPIL_R,
    REST_ROUND,
    ROUND_NARROW,
    ROUND_TALL,
    TRACKS,
    YAW_FEATURES,
    YAW_HAIR,
    YAW_NOSE,
    YAW_OUTLINE,
    Identity,
    Scene,
    State,
    shade,
)


class Ellipse(NamedTuple):
    """An anti-aliased ellipse in pixel coordinates (pixel (i, j) has its centre at (j + 0.5, i + 0.5)).

    Each field is a number or an array [T]: one ellipse per frame of a batch."""

    x: float | np.ndarray
    y: float | np.ndarray
    a: float | np.ndarray  # half-axes before rotation, pixels
    b: float | np.ndarray
    angle: float | np.ndarray = 0.0  # radians, clockwise on screen
    bend: float | np.ndarray = 0.0  # pixels the ends (|dx| = a) sit below the middle; negative curves them up


_CENTRES = np.arange(8192, dtype=np.float32) + 0.5  # pixel centres along an axis (frames up to 8192 px)


def _per_frame(v) -> np.ndarray:
    """A number or [T] -> [T or 1, 1, 1] float32, to broadcast against [T, h, w]."""
    return np.asarray(v, np.float32).reshape(-1, 1, 1)


def coverage(X: np.ndarray, Y: np.ndarray, e: Ellipse) -> tuple[np.ndarray, np.ndarray]:
    """Coverage in [0, 1] and normalised radius q (1 on the outline), [T or 1, h, w], on pixel-centre
    grids X [1, 1, w], Y [1, h, 1]. Coverage is 0.5 minus the signed distance to the outline, to first
    order: (q - 1) / |grad q|."""
    a, b = np.maximum(_per_frame(e.a), 0.05), np.maximum(_per_frame(e.b), 0.05)
    dx, dy = X - _per_frame(e.x), Y - _per_frame(e.y)
    if np.any(e.angle):
        angle = _per_frame(e.angle)
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, c * dy - s * dx
    if np.any(e.bend):
        dy = dy - _per_frame(e.bend) * (dx / a) ** 2
    ua, ub = dx / a, dy / b
    q = ua * ua + ub * ub
    alpha = (ua * (2 / a)) ** 2 + ((ub * (2 / b)) ** 2 + 1e-12)
    np.sqrt(alpha, out=alpha)  # |grad q|
    np.divide(1 - q, alpha, out=alpha)
    alpha += 0.5
    np.clip(alpha, 0, 1, out=alpha)
    return alpha, q


def _box(e: Ellipse) -> tuple[int, int, int, int]:
    """Frame pixel rows [i0, i1) and columns [j0, j1) that `e` may cover in any of its frames."""
    angle = np.abs(np.asarray(e.angle, np.float64))
    c, s = np.cos(angle), np.sin(angle)
    a, b = np.asarray(e.a, np.float64), np.asarray(e.b, np.float64)
    bend = np.abs(np.asarray(e.bend, np.float64))
    rx = np.hypot(a * c, b * s) + bend * s + 1.5
    ry = np.hypot(a * s, b * c) + bend + 1.5
    return (int(np.floor(np.min(e.y - ry))), int(np.max(e.y + ry)) + 2, int(np.floor(np.min(e.x - rx))),
            int(np.max(e.x + rx)) + 2)


def paint(buf: np.ndarray, origin: tuple[int, int], e: Ellipse, colour, shade: float = 0.0,
          within: Ellipse | None = None, hole: Ellipse | None = None, ymin=None, ymax=None, weight=None,
          mask: np.ndarray | None = None, grow: float = 0.0) -> None:
    """Composite `colour` over the float32 frames `buf` [T, h, w, 3] (whose pixel (0, 0) is frame
    pixel `origin` = (x0, y0)) where `e` covers them, inside `within`, outside `hole`, between the
    rows `ymin` and `ymax` and times `weight` (each a number or [T]); `shade` darkens towards the outline
    (colour * (1 - shade * q)). With `mask` ([T, h, w, 1] float32 beside `buf`), its coverage grown by
    `grow` px is also added into the mask. Batching frames matters: numpy's per-call overhead, not the
    pixels, dominates a small ellipse."""
    if mask is not None:
        grown = e._replace(a=np.asarray(e.a) + grow, b=np.asarray(e.b) + grow)
        paint(mask, origin, grown, (1.0,), 0.0, within, hole, ymin, ymax, weight)
    x0, y0 = origin
    i0, i1, j0, j1 = 0, buf.shape[1], 0, buf.shape[2]
    for f in (e, within) if within is not None else (e,):  # the box of e (and of within: coverage is their min)
        fi0, fi1, fj0, fj1 = _box(f)
        i0, i1, j0, j1 = max(i0, fi0 - y0), min(i1, fi1 - y0), max(j0, fj0 - x0), min(j1, fj1 - x0)
    if ymin is not None:
        i0 = max(i0, int(np.min(ymin)) - 1 - y0)
    if ymax is not None:
        i1 = min(i1, int(np.max(ymax)) + 2 - y0)
    if i0 >= i1 or j0 >= j1:
        return
    X = _CENTRES[x0 + j0:x0 + j1].reshape(1, 1, -1)
    Y = _CENTRES[y0 + i0:y0 + i1].reshape(1, -1, 1)
    alpha, q = coverage(X, Y, e)
    if within is not None:
        alpha = np.minimum(alpha, coverage(X, Y, within)[0])
    if hole is not None:
        alpha = alpha * (1 - coverage(X, Y, hole)[0])
    if ymin is not None:
        alpha = alpha * np.clip(Y + 0.5 - _per_frame(ymin), 0, 1)
    if ymax is not None:
        alpha = alpha * np.clip(_per_frame(ymax) + 0.5 - Y, 0, 1)
    if weight is not None:
        alpha = alpha * _per_frame(weight)
    sub = buf[:, i0:i1, j0:j1]
    col = np.asarray(colour, np.float32)
    if shade:
        col = (1 - shade * np.minimum(q, 1))[..., None] * col
    d = col - sub
    d *= alpha[..., None]
    sub += d



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


REGIONS = ("face", "eyes", "mouth", "hands")  # region_masks keys
MASK_GROW = 0.01  # masks are grown by this x frame height (px), at least 1 px


class Canvas:
    """A crop of frames being drawn, as float32 [T, h, w, 3], and the same crop of the region masks
    ([T, h, w, 1] float32 views). Calling it paints an ellipse, and adds its coverage to `region`'s mask."""

    def __init__(self, img: np.ndarray, masks: dict[str, np.ndarray] | None, y0: int, y1: int, x0: int, x1: int,
                 grow: float):
        self.img, self.crop = img, (slice(None), slice(y0, y1), slice(x0, x1))
        self.buf = img[self.crop].astype(np.float32)
        self.org = (x0, y0)
        self.masks = {k: m[self.crop] for k, m in masks.items()} if masks else {}
        self.grow = grow

    def __call__(self, e: Ellipse, colour, region: str | None = None, **kw) -> None:
        paint(self.buf, self.org, e, colour, mask=self.masks.get(region), grow=self.grow, **kw)

    def done(self) -> None:
        self.buf += 0.5
        self.img[self.crop] = self.buf


def _crop(img: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> tuple[int, int, int, int] | None:
    """Pixel bounds (y0, y1, x0, x1) of a box clipped to the frames [T, H, W, 3]; None when empty."""
    c = max(int(y0), 0), min(int(y1) + 2, img.shape[1]), max(int(x0), 0), min(int(x1) + 2, img.shape[2])
    return c if c[0] < c[1] and c[2] < c[3] else None


class _Pose(NamedTuple):
    """Where the head of each frame is, px ([T] arrays or numbers)."""

    W: float  # head half-width
    H: float  # head half-height
    bx: float  # body midline
    by: float  # rest head centre row
    hx: np.ndarray  # head outline centre
    hy: np.ndarray
    fx: np.ndarray  # the centre the features move with
    fy: np.ndarray
    nx: np.ndarray  # nose column
    ny: np.ndarray  # nose row
    my: np.ndarray  # mouth row
    hair_x: np.ndarray


def _pose(idt: Identity, st: State, s: float, ox: float, oy: float) -> _Pose:
    W, H = idt.head_w * s, idt.head_h * s
    bx, by = ox, oy + HEAD_V * s  # the neck and body stay here
    k = 0.6 if idt.style == "anime" else 1.0  # big eyes stay inside the face when it turns
    hx, hy = bx + st.yaw * YAW_OUTLINE * W, by + st.pitch * NOD_DROP * H
    fx, fy = bx + st.yaw * k * YAW_FEATURES * W, hy + st.pitch * NOD_FEATURES * H
    ny = fy + (idt.eye_y + 0.55 * (idt.mouth_y - idt.eye_y)) * H
    return _Pose(W, H, bx, by, hx, hy, fx, fy, bx + st.yaw * k * YAW_NOSE * W, ny, fy + idt.mouth_y * H,
                 bx + st.yaw * YAW_HAIR * W)


def _eyes(cv: Canvas, idt: Identity, st: State, p: _Pose) -> None:
    """Brows (not for animals), lids and eyes: human eyes, anime eyes (tall irises with highlights,
    line-art lids) or animal eyes (all iris, a slit pupil)."""
    W, H = p.W, p.H
    for side in (-1, 1):
        narrow = 1 - 0.3 * np.maximum(0.0, side * st.yaw)  # the eye on the side turned away is foreshortened
        ex = p.fx + side * idt.eye_spacing * W * (1 - 0.1 * np.abs(st.yaw))
        ey = p.fy + idt.eye_y * H
        ew, eh_full = idt.eye_size * W * narrow, idt.eye_aspect * idt.eye_size * W
        eh = eh_full * st.eyes
        gx = ex + st.yaw * 0.3 * ew
        open_ = eh > 0.25
        if idt.style != "animal":
            brow_w, brow_h = (1, 0.045) if idt.style == "human" else (0.8, 0.028)
            cv(Ellipse(ex, ey - idt.brow_gap * H, brow_w * ew, brow_h * H, side * idt.brow_tilt, -0.02 * H),
               shade(idt.hair, BROW_SHADE), "eyes")
        lid = shade(idt.skin, 0.5) if idt.style != "anime" else OUTLINE
        cv(Ellipse(ex, ey, 1.1 * ew, 1.05 * eh + 0.07 * eh_full + 0.6), lid, "eyes")
        if not open_.any():
            continue
        if idt.style == "human":
            cv(Ellipse(ex, ey, ew, eh), EYE_WHITE, "eyes", weight=open_)
            cv(Ellipse(gx, ey, 0.55 * eh_full, 0.55 * eh), idt.eyes, weight=open_)  # inside the white
            cv(Ellipse(gx, ey, PUPIL_R * eh_full, PUPIL_R * eh), PUPIL, weight=open_)
        elif idt.style == "anime":
            cv(Ellipse(ex, ey, ew, eh), EYE_WHITE, "eyes", weight=open_)
            cv(Ellipse(gx, ey + 0.08 * eh, 0.62 * ew, 0.86 * eh), idt.eyes, weight=open_, within=Ellipse(ex, ey, ew, eh))
            cv(Ellipse(gx, ey + 0.12 * eh, 0.3 * ew, 0.45 * eh), PUPIL, weight=open_)
            cv(Ellipse(gx - 0.25 * ew, ey - 0.3 * eh, 0.17 * ew, 0.2 * eh), EYE_WHITE, weight=open_)  # highlights
            cv(Ellipse(gx + 0.22 * ew, ey + 0.35 * eh, 0.08 * ew, 0.1 * eh), EYE_WHITE, weight=open_)
        else:
            cv(Ellipse(ex, ey, ew, eh), idt.eyes, "eyes", weight=open_)
            cv(Ellipse(gx, ey, 0.16 * ew, 0.85 * eh), PUPIL, weight=open_)
            cv(Ellipse(gx - 0.3 * ew, ey - 0.35 * eh, 0.13 * ew, 0.13 * eh), EYE_WHITE, weight=open_)


def _mouth(cv: Canvas, idt: Identity, st: State, p: _Pose) -> None:
    a0 = idt.mouth_w * p.W
    r = st.round - REST_ROUND
    a = a0 * (1 + 0.2 * st.smile) * (1 - 0.15 * np.abs(st.yaw)) * (1 - ROUND_NARROW * r)
    b = a0 * (MOUTH_REST + MOUTH_OPEN * st.mouth) * (1 + ROUND_TALL * r)
    bend = -0.3 * st.smile * a
    cv(Ellipse(p.fx, p.my, a + 0.12 * a0, b + 0.16 * a0, bend=bend), idt.lips, "mouth")
    cv(Ellipse(p.fx, p.my, a, b, bend=bend), MOUTH, "mouth")


def _cap(cv: Canvas, idt: Identity, p: _Pose) -> None:
    """The hair over the crown, with a window for the face below the hairline."""
    W, H, vol = p.W, p.H, idt.hair_volume
    window = Ellipse(p.hair_x, p.fy + H, (1.2 + 0.1 * (idt.style == "anime")) * W, (idt.hairline + 1.0) * H)
    cv(Ellipse(p.hair_x, p.hy - 0.6 * (vol - 1) * H, vol * W, vol * H), idt.hair, shade=0.15 * (idt.style != "anime"),
       hole=window, ymax=p.hy + 0.05 * H)


def _human(cv: Canvas, idt: Identity, st: State, p: _Pose) -> None:
    cv(Ellipse(p.hx, p.hy, p.W, p.H), idt.skin, "face", shade=0.08)
    _eyes(cv, idt, st, p)
    cv(Ellipse(p.nx, p.ny, 0.09 * p.W, 0.5 * idt.nose_len * p.H, 0.15 * st.yaw), shade(idt.skin, 0.78))
    _mouth(cv, idt, st, p)
    _cap(cv, idt, p)


def _anime(cv: Canvas, idt: Identity, st: State, p: _Pose) -> None:
    """Flat colours, bold outlines, a pointed chin, large eyes, a tiny nose, spiky or long hair with bangs."""
    W, H = p.W, p.H
    lw = max(1.0, 0.05 * W)  # line width, px
    cranium = Ellipse(p.hx, p.hy - 0.1 * H, W, 0.9 * H)
    cy = p.hy - 0.2 * H  # the jaw: the lower half of the lens between two circles, pointed at (hx, hy + H)
    d = (1.44 * H * H / (0.95 * W) - 0.95 * W) / 2
    R = d + 0.95 * W
    for grow, colour, region in ((lw, OUTLINE, None), (0.0, idt.skin, "face")):
        cv(cranium._replace(a=W + grow, b=0.9 * H + grow), colour, region)
        cv(Ellipse(p.hx - d, cy, R + grow, R + grow), colour, region, within=Ellipse(p.hx + d, cy, R + grow, R + grow),
           ymin=cy)
    _eyes(cv, idt, st, p)
    cv(Ellipse(p.nx, p.ny, 0.035 * W, 0.5 * idt.nose_len * H), shade(idt.skin, 0.78))
    _mouth(cv, idt, st, p)
    vol, top = idt.hair_volume, p.hy - 0.6 * (idt.hair_volume - 1) * H
    if idt.hair_style == "spiky":
        for k, phi in enumerate(np.linspace(-1.05, 1.05, 7)):
            r = 0.92 + 0.08 * (k % 2)
            cv(Ellipse(p.hair_x + np.sin(phi) * r * vol * W, top - np.cos(phi) * r * vol * H, 0.16 * W, 0.34 * H, phi),
               idt.hair)
    _cap(cv, idt, p)
    fringe = p.fy - idt.hairline * H  # bangs over the forehead, above the brows
    for k in (-1.5, -0.5, 0.5, 1.5):
        cv(Ellipse(p.hair_x + k * 0.28 * W, fringe + 0.02 * H, 0.17 * W, 0.12 * H, -0.3 * k), idt.hair)


def _animal(cv: Canvas, idt: Identity, st: State, p: _Pose) -> None:
    """Ears on a marked crown, a round furry head, a muzzle with a nose, whiskers; slit-pupil eyes."""
    W, H = p.W, p.H
    for side in (-1, 1):
        ear = Ellipse(p.hair_x + side * 0.56 * W, p.hy - 0.9 * H, 0.3 * W, 0.55 * H, side * 0.45, 0.1 * H)
        cv(ear, idt.hair, shade=0.1)
        cv(ear._replace(x=ear.x - side * 0.02 * W, y=ear.y + 0.12 * H, a=0.15 * W, b=0.34 * H), (226, 150, 160))
    cv(Ellipse(p.hx, p.hy - 0.05 * H, W, 0.95 * H), idt.skin, "face", shade=0.06)
    cv(Ellipse(p.hx, p.hy + 0.3 * H, 0.9 * W, 0.7 * H), idt.skin, "face", shade=0.06)  # cheeks: the bottom is the head's
    _eyes(cv, idt, st, p)
    mid = (p.ny + p.my) / 2
    whisker = shade(idt.skin, 0.55)
    for side in (-1, 1):
        for k in (-1, 0, 1):
            cv(Ellipse(p.fx + side * 0.6 * W, mid + k * 0.07 * H, 0.26 * W, max(0.5, 0.008 * H), side * k * 0.15), whisker)
    for side in (-1, 1):
        cv(Ellipse(p.fx + side * 0.17 * W, mid, 0.26 * W, 0.2 * H), idt.muzzle)
    cv(Ellipse(p.fx, p.my + 0.06 * H, 0.22 * W, 0.16 * H), idt.muzzle)  # chin
    cv(Ellipse(p.fx, mid, 0.018 * W, 0.5 * (p.my - p.ny)), idt.lips)  # philtrum
    cv(Ellipse(p.nx, p.ny, 0.13 * W, 0.5 * idt.nose_len * H, 0.15 * st.yaw), idt.nose)
    _mouth(cv, idt, st, p)
    _cap(cv, idt, p)


_STYLE_HEADS = {"human": _human, "anime": _anime, "animal": _animal}


def _draw_head(img: np.ndarray, masks, idt: Identity, st: State, s: float, ox: float, oy: float, grow: float) -> None:
    """Paints the head of frame t with st's fields [T] into img [T, H, W, 3] uint8 (and its masks)."""
    p = _pose(idt, st, s, ox, oy)
    W, H, vol = p.W, p.H, idt.hair_volume
    box = _crop(img, p.bx - 1.45 * vol * W, p.bx + 1.45 * vol * W, np.min(p.hy) - 1.5 * vol * H, p.by + 1.8 * H)
    if box is None:
        return
    cv = Canvas(img, masks, *box, grow)
    if idt.hair_style == "long":
        cv(Ellipse(p.hx, p.hy + 0.45 * H, 1.08 * vol * W, H), idt.hair, shade=0.2, ymin=p.hy)  # above hy: under the cap
    shoulders = p.by + (1 + NECK_LEN) * H
    cv(Ellipse(p.bx, shoulders, idt.neck_w * W, 0.8 * H), shade(idt.skin, 0.7), ymax=shoulders + 0.03 * H)
    _STYLE_HEADS[idt.style](cv, idt, st, p)
    cv.done()


def _hand_y(hand, rest_y: float, W: float, H: float, height: int):
    """Palm centre row: below the frame (fingertips hidden) at hand = 0, beside the head at 1."""
    hidden = height + (HAND_REACH + 0.1) * W
    return hidden + (rest_y + HAND_RAISE * H - hidden) * hand


def _draw_hand(img: np.ndarray, masks, idt: Identity, hand: np.ndarray, s: float, ox: float, oy: float,
               grow: float) -> None:
    """Paints the raised hand (hand [T]) into img [T, H, W, 3] uint8 (and its masks)."""
    W, H = idt.head_w * s, idt.head_h * s
    side = idt.hand_side
    px = ox + side * HAND_X * W
    py = _hand_y(hand, oy + HEAD_V * s, W, H, img.shape[1])
    box = _crop(img, px - 0.8 * W, px + 0.8 * W, np.min(py) - (HAND_REACH + 0.1) * W, img.shape[1])
    if box is None:
        return
    cv = Canvas(img, masks, *box, grow)
    cv(Ellipse(px, py + 10 * W, 0.36 * W, 10 * W), shade(idt.shirt, 0.82), "hands")  # sleeve
    cv(Ellipse(px, py, 0.34 * W, 0.4 * W), idt.skin, "hands")
    for k in range(4):
        cv(Ellipse(px + (k - 1.5) * 0.17 * W, py - 0.48 * W, 0.075 * W, 0.26 * W, (k - 1.5) * 0.1), idt.skin, "hands")
    cv(Ellipse(px + side * 0.36 * W, py - 0.08 * W, 0.075 * W, 0.22 * W, side * 0.6), idt.skin, "hands")
    cv.done()


def render_clip(identity: Identity, tracks: dict[str, np.ndarray], width: int, height: int,
                scene: Scene = Scene(), chunk: int = 48, masks: bool = False):
    """Frames [T, height, width, 3] uint8 for per-frame State fields `tracks` ([T] each; a missing one
    stays at the State default), drawn in
    equal batches of at most `chunk` frames (about 1 ms a frame at 256 x 256). With `masks`, returns
    (frames, region masks) as `region_masks` describes them, for about 30 % more time."""
    T = len(next(iter(tracks.values())))
    out = np.empty((T, height, width, 3), np.uint8)
    out[:] = _backdrop(identity, scene, width, height)
    mk = {k: np.zeros((T, height, width), np.float32) for k in REGIONS} if masks else None
    grow = max(1.0, MASK_GROW * height)
    s, ox, oy = _camera(scene, height, width)
    chunk = -(-T // -(-T // chunk))
    for t0 in range(0, T, chunk):
        st = State(**{k: np.asarray(tracks[k][t0:t0 + chunk] if k in tracks else np.full(min(chunk, T - t0), getattr(
            State, k)), np.float32) for k in TRACKS})
        frames = out[t0:t0 + chunk]
        part = {k: m[t0:t0 + chunk, :, :, None] for k, m in mk.items()} if mk else None
        _draw_head(frames, part, identity, st, s, ox, oy, grow)
        up = np.nonzero(st.hand > 0.01)[0]
        if len(up):
            raised = frames[up]
            raised_masks = {k: m[up] for k, m in part.items()} if part else None
            _draw_hand(raised, raised_masks, identity, st.hand[up], s, ox, oy, grow)
            frames[up] = raised
            for k, m in (raised_masks or {}).items():
                part[k][up] = m
    return (out, mk) if masks else out


def region_masks(identity: Identity, tracks: dict[str, np.ndarray], width: int, height: int,
                 scene: Scene = Scene()) -> dict[str, np.ndarray]:
    """Where the face, eyes (lids, whites, brows), mouth (lips and inside) and hands (with the sleeve) are drawn:
    region -> [T, height, width] float32 coverage in [0, 1] of those parts, grown by MASK_GROW of the
    frame height. Parts hidden behind others still count (a hand over the face)."""
    return render_clip(identity, tracks, width, height, scene, masks=True)[1]


def render(identity: Identity, state: State, width: int, height: int, scene: Scene = Scene()) -> np.ndarray:
    """One RGB frame [height, width, 3] uint8."""
    return render_clip(identity, {k: [getattr(state, k)] for k in TRACKS}, width, height, scene)[0]
