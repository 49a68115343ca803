"""Measuring the state of the synthetic character back from pixels, knowing only who it is."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from stages.synth.render import render_clip
from stages.synth.world import (
    BROW_SHADE,
    EYE_WHITE,
    HAND_RAISE,
    HAND_REACH,
    MOUTH,
    NOD_DROP,
    OUTLINE,
    PUPIL,
    REST_ROUND,
    ROUND_NARROW,
    ROUND_TALL,
    TRACKS,
    Identity,
    Scene,
    State,
    shade,
    skin_tolerance,
)

_OPEN = ndimage.generate_binary_structure(2, 1)
# a mouth piece narrower than this (half-width, x the identity's) is read as no mouth: the world draws none under
# 0.68 (rounded lips, eight held-out clips), and a blurred round trip's shut mouth can leave a sliver a few pixels
# wide, whose half-width after the lips' corners (0.12) came out near zero or negative and its opening at -5 to
# -6 (RESULTS.md session 51: one such frame of 101 took a clip's mouth r from ~0.99 to 0.42)
MIN_MOUTH_HALF_WIDTH = 0.3
# reference poses each identity is rendered in to calibrate its readings: track -> value (others at rest)
_REFERENCES = ({}, {"mouth": 1.0}, {"yaw": 1.0}, {"yaw": -1.0}, {"round": 1.0})


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
    lab, n = ndimage.label(lips, np.ones((3, 3), bool))
    if n > 1:  # the mouth is the piece with the most inner mouth (else the largest); stray blends at other
        # features' rims are not: a blurred round trip loses the thin lips, and a muzzle's rim can outgrow the mouth
        count = np.bincount(lab[inner], minlength=n + 1)[1:] if inner.any() else np.bincount(lab.ravel())[1:]
        keep = lab == np.argmax(count) + 1
        lips, inner = keep, inner & keep
    cols = np.nonzero(lips.any(0))[0]
    a = (cols[-1] - cols[0] + 1) / 2 - 0.12 * a0 if len(cols) else 0.0
    if len(cols) < 3 or not inner.any() or a < MIN_MOUTH_HALF_WIDTH * a0:
        return 0.0, 0.0, 0.0
    n = inner.sum(0)  # [w]
    has = np.nonzero(n)[0]
    cy = (inner * np.arange(inner.shape[0])[:, None]).sum(0)[has] / n[has]  # centre row per column
    u2 = ((has - (cols[0] + cols[-1]) / 2) / a) ** 2
    lift = -np.polyfit(u2, cy, 1)[0] if len(has) >= 3 and np.ptp(u2) > 0.05 else 0.0  # row = middle - lift * u^2
    return inner.sum() / (np.pi * a), a, lift


def _face_region(face: np.ndarray) -> np.ndarray:
    """The face blob [h, w] with what it encloses: its holes, and what its convex hull adds beyond slivers
    along the outline (those would move the yaw reading). A feature that reaches the face's outline (an
    animal's muzzle with the head turned fully) leaves a rim of skin a few pixels wide, which a blurring
    codec breaks; with holes alone the muzzle, and the mouth in it, then fell outside the face (RESULTS.md
    2026-12-04 session 44: a held-out animal clip's round trip read with the mouth shut for 16 frames)."""
    filled = ndimage.binary_fill_holes(face)
    rows = np.nonzero(face.any(1))[0]
    if len(rows) < 2:
        return filled
    first, last = face[rows].argmax(1), face.shape[1] - 1 - face[rows, ::-1].argmax(1)
    pts = np.concatenate([np.stack([first, rows], 1), np.stack([last, rows], 1)]).astype(np.float64)
    if np.ptp(pts[:, 0]) == 0:
        return filled
    from scipy.spatial import ConvexHull
    v = pts[ConvexHull(pts).vertices]  # the hull's corners (x, y), in order; its rows' ends: each row's first and last
    lo, hi = np.full(face.shape[0], np.inf), np.full(face.shape[0], -np.inf)  # per row: the hull's x span
    for (x0, y0), (x1, y1) in zip(v, np.roll(v, -1, axis=0)):
        if y0 != y1:  # a level edge's ends are also ends of its neighbours
            r = np.arange(int(min(y0, y1)), int(max(y0, y1)) + 1)
            x = x0 + (r - y0) * (x1 - x0) / (y1 - y0)
            lo[r], hi[r] = np.minimum(lo[r], x), np.maximum(hi[r], x)
    c = np.arange(face.shape[1])
    inside = (c >= lo[:, None] - 1e-6) & (c <= hi[:, None] + 1e-6)
    return filled | ndimage.binary_opening(inside & ~filled, _OPEN, iterations=2)  # not the outline's slivers


def _face_colours(idt: Identity) -> list:
    """Colours drawn on the face that belong to neither the eyes nor the mouth."""
    out = [idt.skin, shade(idt.skin, 0.92), shade(idt.skin, 0.78)]
    if idt.style == "anime":
        out.append(OUTLINE)
    if idt.style == "animal":
        out += [idt.muzzle, idt.nose, shade(idt.skin, 0.55)]
    return out


def _measure(frame: np.ndarray, idt: Identity) -> dict:
    """One frame's raw measurements; the face is the largest skin-coloured blob."""
    f = frame.astype(np.float32)
    skin = np.asarray(idt.skin, np.float32)
    mask = ((f - skin) ** 2).sum(-1) < skin_tolerance(idt.skin) ** 2
    if idt.style == "animal":
        mask = ndimage.binary_closing(mask, _OPEN)  # across the whiskers
    mask = ndimage.binary_opening(mask, _OPEN)
    lab, n = ndimage.label(mask)
    if n == 0:
        return {"found": False}
    sizes = np.bincount(lab.ravel())[1:]
    face_id = int(np.argmax(sizes)) + 1
    rows, cols = ndimage.find_objects(lab)[face_id - 1]
    face = lab[rows, cols] == face_id
    filled = _face_region(face)
    r0, c0 = rows.start, cols.start
    s = (cols.stop - cols.start) / (2 * idt.head_w)  # px per world unit
    W, H = idt.head_w * s, idt.head_h * s
    hx, hy = (cols.start + cols.stop) / 2, rows.stop - H
    fc = f[rows, cols]
    out = {"found": True, "head_x": hx, "head_y": hy, "scale": s, "skin": fc[face].mean(0)}

    split = hy + 0.5 * (idt.eye_y + idt.mouth_y) * H - r0  # between the eyes and the mouth, crop rows
    ys, xs = np.nonzero(filled & ~face)
    low = ys > hy + idt.eye_y * H - r0
    out["yaw"] = (xs[low].mean() + c0 + 0.5 - hx) / W if low.any() else 0.0  # the features' offset, x head_w

    inner = ndimage.binary_erosion(filled, _OPEN, iterations=2)  # off the outline, blended with the backdrop
    k = max(int(np.ceil(split)), 0)
    plain = _face_colours(idt)
    cls = np.where(inner[k:], _nearest(fc[k:], plain + [EYE_WHITE, idt.eyes, PUPIL, idt.lips, MOUTH]), 0)
    plain = plain + [EYE_WHITE, idt.eyes, PUPIL]  # the eyes reach below the split in big-eyed styles
    a0 = idt.mouth_w * W
    opening, a, lift = _mouth_shape(cls == len(plain) + 1, cls >= len(plain), a0)
    out["opening"], out["width"] = opening / a0, a / a0
    out["smile"] = lift / (0.3 * a) if a > 0 else 0.0

    plain = _face_colours(idt) + [shade(idt.skin, 0.5), idt.hair, shade(idt.hair, BROW_SHADE), PUPIL, OUTLINE]
    up = max(int(np.floor(split)), 0)
    cls = np.where(inner[:up], _nearest(fc[:up], plain + [EYE_WHITE, idt.eyes]), 0)
    out["eyes"] = (cls >= len(plain)).sum() / (np.pi * (idt.eye_size * W) ** 2)

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


def _readings(raw: dict[str, np.ndarray], cal: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """Calibrated yaw, round, mouth and eyes from the raw readings of _measure ([T] each or numbers)."""
    yaw = np.clip((raw["yaw"] - cal["yaw"][0]) / cal["yaw"][1], -1.5, 1.5)
    turned = np.minimum(np.abs(yaw), 1)
    width = raw["width"] / ((1 + 0.2 * np.clip(raw["smile"], 0, 1)) * (1 - 0.15 * turned))
    rounding = REST_ROUND + (width - cal["round"][0]) / cal["round"][1]
    opening = raw["opening"] / (1 + ROUND_TALL * (np.clip(rounding, 0, 1) - REST_ROUND))
    return {"yaw": yaw, "round": rounding, "mouth": (opening - cal["mouth"][0]) / cal["mouth"][1],
            "eyes": raw["eyes"] / cal["eyes"][1] / (1 - 0.15 * turned)}  # the eye turned away is foreshortened


def _calibration(identity: Identity, scale: float, width: int, height: int) -> dict[str, tuple[float, float]]:
    """(reading at rest, reading change per unit) of yaw, round, mouth and eyes for this identity
    rendered at this scale in the _REFERENCES poses: how much each reading moves depends on the
    style, the geometry and the colours (blends at the outlines move pixels between classes)."""
    tracks = {k: np.array([r.get(k, getattr(State, k)) for r in _REFERENCES], np.float32) for k in TRACKS}
    frames = render_clip(identity, tracks, width, height, Scene(zoom=scale / height))
    ref = [_measure(f, identity) for f in frames]
    if not all(r["found"] for r in ref):
        return {"yaw": (0.0, 0.25), "round": (1.0, -ROUND_NARROW), "mouth": (0.1, 0.3), "eyes": (0.0, 1.0)}
    unit = lambda d: d if abs(d) > 1e-6 else 1.0  # noqa: E731
    rest, mouth, right, left, rounded = ref
    cal = {"yaw": (rest["yaw"], unit((right["yaw"] - left["yaw"]) / 2)), "eyes": (0.0, unit(rest["eyes"])),
           "round": (rest["width"], 1.0), "mouth": (0.0, 1.0)}
    cal["round"] = (rest["width"], unit((rounded["width"] - rest["width"]) / (1 - REST_ROUND)))
    o = [_readings(r, cal)["mouth"] for r in (rest, mouth)]  # openings corrected for rounding
    cal["mouth"] = (o[0], unit(o[1] - o[0]))
    return cal


def _measure_all(frames: np.ndarray, identity: Identity) -> list[dict]:
    return [_measure(fr, identity) for fr in frames]


def analyze(frames: np.ndarray, identity: Identity, workers: int = 1) -> dict[str, np.ndarray]:
    """Measure a clip of this world [T, H, W, 3] uint8 from its pixels, knowing only who is in it.

    Per frame ([T], or [T, 3] for colours; NaN where the face is not found): found; head_x,
    head_y (px, head centre); scale (px per world unit); yaw (-1 left .. 1 right, from the
    lower-face features' offset from the head's midline); pitch (head drop against the clip's
    median height, so the head must rest most of the clip; 1 = a full nod); mouth (inner-mouth
    area over its width, corrected for rounding); round (lip rounding, from the mouth's width);
    smile (lift of the mouth corners); eyes (visible eye white + iris over that of the identity
    rendered with open eyes); hand (from the fingertips' height against the clip's median head
    height; 0 when no hand is seen); skin, shirt, hair: mean / median RGB in the face, below the
    neck, above the forehead. Readings are calibrated per identity on renders of it in reference
    poses (_calibration). Meant for 256 x 256 (the analyzer's tests also run at 128); ~6 ms a frame,
    measured in `workers` processes (frames are independent) when > 1: a 10-minute stream."""
    Hf = frames.shape[1]
    if workers > 1 and len(frames) > 4 * workers:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        parts = np.array_split(np.arange(len(frames)), 4 * workers)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            per = [p for got in pool.map(_measure_all, [frames[i[0]:i[-1] + 1] for i in parts],
                                         [identity] * len(parts)) for p in got]
    else:
        per = _measure_all(frames, identity)
    keys = ("head_x", "head_y", "scale", "yaw", "opening", "width", "smile", "eyes", "hand_top")
    out = {"found": np.array([p["found"] for p in per])}
    for k in keys:
        out[k] = np.array([p[k] if p["found"] else np.nan for p in per], np.float64)
    for k in ("skin", "shirt", "hair"):
        out[k] = np.stack([p[k] if p["found"] else np.full(3, np.nan) for p in per])
    cal = _calibration(identity, float(np.nanmedian(out["scale"])), frames.shape[2], Hf) if out["found"].any() else {
        "yaw": (0.0, 1.0), "round": (1.0, 1.0), "mouth": (0.0, 1.0), "eyes": (0.0, 1.0)}
    out.update(_readings(out, cal))
    del out["opening"], out["width"]
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


