"""The one renderer of the synthetic world: a vectorised numpy painter of anti-aliased ellipses and
the character drawn with it in a given `State`."""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from stages.synth.world import (
    EYE_ASPECT,
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
    PUPIL,
    PUPIL_R,
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
    angle = np.abs(np.asarray(e.angle, np.float64))
    c, s = np.cos(angle), np.sin(angle)
    a, b = np.asarray(e.a, np.float64), np.asarray(e.b, np.float64)
    bend = np.abs(np.asarray(e.bend, np.float64))
    rx = np.hypot(a * c, b * s) + bend * s + 1.5
    ry = np.hypot(a * s, b * c) + bend + 1.5
    i0 = max(int(np.floor(np.min(e.y - ry))) - y0, 0)
    i1 = min(int(np.max(e.y + ry)) + 2 - y0, buf.shape[1])
    j0 = max(int(np.floor(np.min(e.x - rx))) - x0, 0)
    j1 = min(int(np.max(e.x + rx)) + 2 - x0, buf.shape[2])
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


def _head_features(cv: Canvas, idt: Identity, st: State, bx, fx, fy, W, H) -> None:
    """Brows, eyes, nose and mouth; bx: the body midline, (fx, fy) [T]: the centre the features move with."""
    for side in (-1, 1):
        narrow = 1 - 0.3 * np.maximum(0.0, side * st.yaw)  # the eye on the side turned away is foreshortened
        ex = fx + side * idt.eye_spacing * W * (1 - 0.1 * np.abs(st.yaw))
        ey = fy + idt.eye_y * H
        ew, eh_full = idt.eye_size * W * narrow, EYE_ASPECT * idt.eye_size * W
        eh = eh_full * st.eyes
        cv(Ellipse(ex, ey - idt.brow_gap * H, idt.eye_size * W * narrow, 0.045 * H, side * idt.brow_tilt, -0.02 * H),
           idt.hair, "eyes")
        cv(Ellipse(ex, ey, 1.1 * ew, 1.05 * eh + 0.07 * eh_full + 0.6), shade(idt.skin, 0.5), "eyes")
        open_ = eh > 0.25
        if open_.any():
            gx = ex + st.yaw * 0.3 * ew
            cv(Ellipse(ex, ey, ew, eh), EYE_WHITE, "eyes", weight=open_)
            cv(Ellipse(gx, ey, 0.55 * eh_full, 0.55 * eh), idt.eyes, weight=open_)  # inside the white
            cv(Ellipse(gx, ey, PUPIL_R * eh_full, PUPIL_R * eh), PUPIL, weight=open_)
    ny = fy + (idt.eye_y + 0.55 * (idt.mouth_y - idt.eye_y)) * H
    nx = bx + st.yaw * YAW_NOSE * W
    cv(Ellipse(nx, ny, 0.09 * W, 0.5 * idt.nose_len * H, 0.15 * st.yaw), shade(idt.skin, 0.78))
    a0 = idt.mouth_w * W
    a = a0 * (1 + 0.2 * st.smile) * (1 - 0.15 * np.abs(st.yaw))
    b = a0 * (MOUTH_REST + MOUTH_OPEN * st.mouth)
    my, bend = fy + idt.mouth_y * H, -0.3 * st.smile * a
    cv(Ellipse(fx, my, a + 0.12 * a0, b + 0.16 * a0, bend=bend), idt.lips, "mouth")
    cv(Ellipse(fx, my, a, b, bend=bend), MOUTH)


def _draw_head(img: np.ndarray, masks, idt: Identity, st: State, s: float, ox: float, oy: float, grow: float) -> None:
    """Paints the head of frame t with st's fields [T] into img [T, H, W, 3] uint8 (and its masks)."""
    W, H = idt.head_w * s, idt.head_h * s
    bx, by = ox, oy + HEAD_V * s  # rest head centre; the neck and body stay here
    hx, hy = bx + st.yaw * YAW_OUTLINE * W, by + st.pitch * NOD_DROP * H
    fx, fy = bx + st.yaw * YAW_FEATURES * W, hy + st.pitch * NOD_FEATURES * H
    vol = idt.hair_volume
    box = _crop(img, bx - 1.4 * vol * W, bx + 1.4 * vol * W, np.min(hy) - 1.1 * vol * H, by + 1.8 * H)
    if box is None:
        return
    cv = Canvas(img, masks, *box, grow)
    if idt.hair_style == "long":
        back = Ellipse(hx, hy + 0.45 * H, 1.08 * vol * W, H)
        cv(back, idt.hair, shade=0.2, ymin=hy)  # above hy it is under the cap
    shoulders = by + (1 + NECK_LEN) * H
    cv(Ellipse(bx, shoulders, idt.neck_w * W, 0.8 * H), shade(idt.skin, 0.7), ymax=shoulders + 0.03 * H)
    cv(Ellipse(hx, hy, W, H), idt.skin, "face", shade=0.08)
    _head_features(cv, idt, st, bx, fx, fy, W, H)
    hair_x = bx + st.yaw * YAW_HAIR * W
    window = Ellipse(hair_x, fy + H, 1.2 * W, (idt.hairline + 1.0) * H)  # the face under the hair
    cv(Ellipse(hair_x, hy - 0.6 * (vol - 1) * H, vol * W, vol * H), idt.hair, shade=0.15, hole=window,
       ymax=hy + 0.05 * H)
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
    """Frames [T, height, width, 3] uint8 for per-frame State fields `tracks` ([T] each), drawn in
    equal batches of at most `chunk` frames (about 1 ms a frame at 256 x 256). With `masks`, returns
    (frames, region masks) as `region_masks` describes them, for about 30 % more time."""
    T = len(tracks["mouth"])
    out = np.empty((T, height, width, 3), np.uint8)
    out[:] = _backdrop(identity, scene, width, height)
    mk = {k: np.zeros((T, height, width), np.float32) for k in REGIONS} if masks else None
    grow = max(1.0, MASK_GROW * height)
    s, ox, oy = _camera(scene, height, width)
    chunk = -(-T // -(-T // chunk))
    for t0 in range(0, T, chunk):
        st = State(**{k: np.asarray(tracks[k][t0:t0 + chunk], np.float32) for k in TRACKS})
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
