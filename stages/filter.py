"""`vidu filter`: measure each clip and reject the ones unfit for talking-avatar training.

Frames are sampled on a regular grid over the clip (`sample_fps`, longer side at most `max_side`;
stages.sense.media.clip_frames: the frame shown at each grid time, the convention every stage samples
by) and every measure below is computed on them; each rejection names its
reasons. Luma is Rec.601 in [0, 1]; "active area" excludes letterbox/pillarbox bars (rows and
columns that stay near black in every sampled frame).

- subject: faces per sampled frame (dlib HOG by default; a local dlib MMOD/HOG detector file or
  a transformers object-detection directory with --subject-detector), overlapping boxes merged
  (NMS), linked into tracks by IoU or centre distance. `subject_count` counts tracks present in
  at least `min_track_ratio` of the frames, so one spurious detection does not make a second
  subject. The main subject is the longest track: its median box (`face_box`), box area over
  frame area (`face_area_ratio`) and the fraction of frames it is seen in (`face_frame_ratio`).
- cleanliness: strong edges (|gradient| > 0.25 luma/px) that stay in place in 90 % of the frames.
  `static_overlay_ratio` = area fraction of 8x8 cells dense in them; `text_score` = area fraction
  of horizontal runs of at least 4 such cells that also hold fixed vertical strokes of constant
  polarity (lines of characters: subtitles, captions, tickers, watermarks with lettering).
- quality: `sharpness` = median variance of the luma Laplacian at the analysis size; exposure
  (`luma_mean`, `clipped_ratio` below 2 % or above 98 %); `blockiness` = mean luma step across the
  8x8 coding-block boundaries over the mean step inside blocks, on a few frames at native size
  (1 = no blocking); `flicker` = median |second difference| of per-frame mean luma, relative to
  the mean; `jitter` = RMS of the high-pass (second difference) of the global-motion path.
- stability: global motion between consecutive sampled frames = median phase-correlation shift
  of textured background tiles (4x4 grid, tiles mostly outside the subject's region), so a head
  moving in front of a plain background is not camera motion; `camera_motion` = median speed in
  frame widths per second.
- interactivity: `subject_motion` = mean |luma difference| between consecutive sampled frames
  inside the subject's face and upper-body box, after undoing the global motion.
- safety (--safety-model): a local transformers image classifier; `safety_score` = highest
  probability of a configured unsafe label over a few frames.
- omni (--omni-model): a local vision-language model asked for a JSON object of labels.

Run: vidu prefilter raw/ | vidu clip | vidu filter
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from models.hf import VisionLanguageModel, as_label, first_json_object, load, model_dir
from manifests.schemas import FILTER_COLUMNS
from stages.sense.media import clip_frames
from stages.sense.pixels import laplacian, luma
from stages.run import Stage, base_row, ranged

Box = tuple[float, float, float, float]  # x0, y0, x1, y1
Detector = Callable[[np.ndarray], list[tuple[Box, float]]]  # RGB frame -> [(pixel box, score)]

OMNI_KEYS = ("editing", "subject", "action", "emotion", "face", "speech", "scene", "shot", "tone")
OMNI_PROMPT = ("Describe this video clip as one JSON object with exactly these keys, each a short string: "
               + ", ".join(OMNI_KEYS) + ". editing: cuts, effects or overlays; subject: who is on screen; "
               "action: what they do; emotion; face: visibility and pose of the main face; speech: whether "
               "and how the subject speaks; scene: place; shot: framing and camera movement; tone: mood. "
               "Answer with the JSON object only.")
NATIVE_FRAMES = 6  # frames decoded at native size for blockiness


def active_area(Y: np.ndarray, black: float = 0.08) -> tuple[slice, slice]:
    """Rows and columns inside letterbox/pillarbox bars (near black in every frame)."""
    peak = Y.max(axis=0)
    rows, cols = np.flatnonzero(peak.max(axis=1) > black), np.flatnonzero(peak.max(axis=0) > black)
    if len(rows) < 8 or len(cols) < 8:
        return slice(None), slice(None)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


# ---------------------------------------------------------------------------------------------
# subject: detection and tracking

def box_iou(a: list[Box], b: list[Box]) -> np.ndarray:
    """[len(a), len(b)] IoU matrix (torchvision.ops.box_iou; 0 where both boxes are empty)."""
    import torch
    from torchvision.ops import box_iou as tv_box_iou

    if not a or not b:
        return np.zeros((len(a), len(b)))
    m = tv_box_iou(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    return torch.nan_to_num(m, nan=0.0).numpy()


def _same_face(a: Box, b: Box, o: float, min_iou: float) -> float:
    """Match score of two boxes of IoU `o`: the IoU, or (when it is low) closeness of centres
    within half a box."""
    if o >= min_iou:
        return o
    size = max(a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1])
    d = np.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2)
    return float(min_iou * (1 - d / (0.5 * size))) if size > 0 and d < 0.5 * size else 0.0


def nms(scored: list[tuple[Box, float]], max_iou: float = 0.5) -> list[Box]:
    """Boxes by decreasing score, dropping any that overlaps a kept one by more than `max_iou`
    (torchvision.ops.nms)."""
    import torch
    from torchvision.ops import nms as tv_nms

    if not scored:
        return []
    boxes = torch.tensor([b for b, _ in scored], dtype=torch.float64)
    keep = tv_nms(boxes, torch.tensor([s for _, s in scored], dtype=torch.float64), max_iou)
    return [scored[i][0] for i in keep.tolist()]


def track_faces(detections: list[list[Box]], min_iou: float = 0.3, max_gap: int = 3) -> list[dict[int, Box]]:
    """Greedy tracks over frames: {frame index: box}. A box joins the best-matching track seen in
    the last `max_gap` frames (one box per track per frame), else starts a new track."""
    tracks: list[dict[int, Box]] = []
    for t, boxes in enumerate(detections):
        live = [k for k, tr in enumerate(tracks) if t - max(tr) <= max_gap]
        lasts = [tracks[k][max(tracks[k])] for k in live]
        overlap = box_iou(list(boxes), lasts)  # [boxes, live tracks]
        pairs = []
        for i, b in enumerate(boxes):
            for j, k in enumerate(live):
                s = _same_face(lasts[j], b, float(overlap[i, j]), min_iou)
                if s > 0:
                    pairs.append((s, i, k))
        used_box, used_track = set(), set()
        for s, i, k in sorted(pairs, reverse=True):
            if i not in used_box and k not in used_track:
                tracks[k][t] = boxes[i]
                used_box.add(i)
                used_track.add(k)
        tracks += [{t: b} for i, b in enumerate(boxes) if i not in used_box]
    return tracks


def subject_measures(detections: list[list[Box]], width: int, height: int, min_track_ratio: float) -> dict:
    """subject_count, face_tracks, face_frame_ratio, face_area_ratio, face_box from per-frame boxes."""
    n = max(len(detections), 1)
    tracks = sorted(track_faces(detections), key=len, reverse=True)
    count = sum(len(tr) / n >= min_track_ratio for tr in tracks)
    out = {"subject_count": int(count), "face_tracks": len(tracks), "face_frame_ratio": 0.0,
           "face_area_ratio": None, "face_box": None}
    if tracks:
        boxes = np.array(list(tracks[0].values()), np.float64) / [width, height, width, height]
        box = np.clip(np.median(boxes, axis=0), 0.0, 1.0)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        out.update(face_frame_ratio=len(tracks[0]) / n, face_area_ratio=float(np.median(areas)),
                   face_box=[float(v) for v in box])
    return out


def _dlib_hog(upsample: int) -> Detector:
    from stages.sense import faces

    return lambda rgb: faces.face_boxes(rgb, upsample)


def _dlib_file(path: Path, upsample: int) -> tuple[str, Detector]:
    import dlib

    try:
        cnn = dlib.cnn_face_detection_model_v1(str(path))
    except RuntimeError:
        cnn = None
    if cnn is not None:
        def run_cnn(rgb: np.ndarray) -> list[tuple[Box, float]]:
            return [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), float(d.confidence))
                    for d in cnn(np.ascontiguousarray(rgb), upsample)]
        return f"dlib-mmod:{path}", run_cnn
    try:
        hog = dlib.fhog_object_detector(str(path))
    except RuntimeError:
        raise ValueError(f"--subject-detector {path} is neither a dlib MMOD nor a dlib HOG detector file") from None

    def run_hog(rgb: np.ndarray) -> list[tuple[Box, float]]:
        rects, scores, _ = hog.run(np.ascontiguousarray(rgb), upsample, 0.0)
        return [((r.left(), r.top(), r.right(), r.bottom()), float(s)) for r, s in zip(rects, scores)]
    return f"dlib-hog:{path}", run_hog


def _transformers_detector(path: Path, threshold: float, labels: tuple[str, ...]) -> tuple[str, Detector]:
    import torch
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    what = "--subject-detector"
    processor = load(what, path, lambda: AutoImageProcessor.from_pretrained(str(path), local_files_only=True))
    model = load(what, path, lambda: AutoModelForObjectDetection.from_pretrained(str(path), local_files_only=True).eval())
    names = {int(k): str(v).lower() for k, v in model.config.id2label.items()}
    wanted = {lab.lower() for lab in labels}

    def run(rgb: np.ndarray) -> list[tuple[Box, float]]:
        with torch.inference_mode():
            out = model(**processor(images=rgb, return_tensors="pt"))
        res = processor.post_process_object_detection(out, threshold=threshold, target_sizes=[rgb.shape[:2]])[0]
        return [(tuple(float(v) for v in box), float(s))
                for box, s, lab in zip(res["boxes"].tolist(), res["scores"].tolist(), res["labels"].tolist())
                if not wanted or names.get(int(lab), "") in wanted]
    return f"transformers:{path}", run


def load_subject_detector(path: str | None, upsample: int, threshold: float,
                          labels: tuple[str, ...]) -> tuple[str, Detector]:
    """(name recorded in `subject_detector`, detector). None: dlib HOG frontal faces."""
    if path is None:
        return "dlib-hog-frontal", _dlib_hog(upsample)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--subject-detector {p}: no such file or directory")
    if p.is_dir():
        return _transformers_detector(model_dir(p, "--subject-detector"), threshold, labels)
    return _dlib_file(p, upsample)


# ---------------------------------------------------------------------------------------------
# frame measures

def sharpness(Y: np.ndarray) -> float:
    return float(np.median([laplacian(y).var() for y in Y]))


def exposure(Y: np.ndarray) -> tuple[float, float]:
    """Mean luma and the fraction of clipped pixels (below 2 % or above 98 %)."""
    return float(Y.mean()), float(((Y < 0.02) | (Y > 0.98)).mean())


def blockiness(Y: np.ndarray) -> float:
    """Mean |step| across 8x8 block boundaries / mean |step| inside blocks, both axes ([N, H, W])."""
    ratios = []
    for axis in (1, 2):
        d = np.abs(np.diff(Y, axis=axis))
        d = np.moveaxis(d, axis, -1)
        at = d[..., 7::8]
        inside = np.delete(d, np.s_[7::8], axis=-1)
        ratios.append(float(at.mean() / max(inside.mean(), 1e-4)))
    return float(np.mean(ratios))


def flicker(Y: np.ndarray) -> float:
    """Median |m_t - (m_t-1 + m_t+1) / 2| of per-frame mean luma, relative to the overall mean."""
    m = Y.mean(axis=(1, 2))
    if len(m) < 3:
        return 0.0
    return float(np.median(np.abs(m[1:-1] - (m[:-2] + m[2:]) / 2)) / max(float(m.mean()), 0.05))


def _hann(h: int, w: int) -> np.ndarray:
    import cv2

    return cv2.createHanningWindow((w, h), cv2.CV_32F)  # [h, w] float32


def phase_shift(a: np.ndarray, b: np.ndarray, window: np.ndarray) -> tuple[float, float]:
    """(dy, dx) that moves image a onto image b (b[y, x] ~ a[y - dy, x - dx]), sub-pixel
    (cv2.phaseCorrelate); (0, 0) when the images hold no signal to correlate."""
    import cv2

    (dx, dy), response = cv2.phaseCorrelate(np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32),
                                            window)
    return (float(dy), float(dx)) if response > 0 else (0.0, 0.0)


def background_tiles(shape: tuple[int, int], region: tuple[slice, slice] | None, grid: int = 4) -> list[tuple[slice, slice]]:
    """The cells of a grid x grid tiling that lie mostly outside the subject region (all cells when
    there is no region or nothing is left outside it)."""
    H, W = shape
    mask = np.zeros(shape, bool)
    if region is not None:
        mask[region] = True
    tiles = [(slice(i * H // grid, (i + 1) * H // grid), slice(j * W // grid, (j + 1) * W // grid))
             for i in range(grid) for j in range(grid)]
    outside = [t for t in tiles if mask[t].mean() < 0.5]
    return outside or tiles


def global_motion(Y: np.ndarray, region: tuple[slice, slice] | None = None) -> np.ndarray:
    """[N-1, 2] (dy, dx) pixel shifts between consecutive frames: the median over background
    tiles (textured tiles outside the subject region) of each tile's phase-correlation shift, so a
    moving subject in front of a plain background does not read as camera motion."""
    if len(Y) < 2:
        return np.zeros((0, 2))
    tiles = background_tiles(Y.shape[1:], region)
    texture = np.array([Y[:, ys, xs].std() for ys, xs in tiles])
    tiles = [t for t, s in zip(tiles, texture) if s >= 0.5 * np.median(texture)]
    windows = [_hann(ys.stop - ys.start, xs.stop - xs.start) for ys, xs in tiles]
    out = []
    for a, b in zip(Y, Y[1:]):
        per_tile = [phase_shift(a[t], b[t], w) for t, w in zip(tiles, windows)]  # [tiles, 2]
        out.append(np.median(np.array(per_tile), axis=0))
    return np.array(out)


def motion_measures(shifts: np.ndarray, times: np.ndarray, width: int) -> tuple[float, float]:
    """camera_motion (median speed, frame widths / s) and jitter (RMS high-pass of the path, widths)."""
    if len(shifts) == 0:
        return 0.0, 0.0
    dt = np.maximum(np.diff(times), 1e-3)
    speed = np.hypot(shifts[:, 0], shifts[:, 1]) / width / dt
    path = np.vstack([[0.0, 0.0], np.cumsum(shifts, axis=0)]) / width
    hp = path[1:-1] - (path[:-2] + path[2:]) / 2
    jitter = float(np.sqrt(np.mean(np.sum(hp ** 2, axis=1)))) if len(hp) else 0.0
    return float(np.median(speed)), jitter


def subject_region(face_box: list[float], width: int, height: int) -> tuple[slice, slice]:
    """Face box widened to head and upper body, in pixels."""
    x0, y0, x1, y1 = face_box
    w, h = x1 - x0, y1 - y0
    xa, xb = max(0.0, x0 - 0.5 * w), min(1.0, x1 + 0.5 * w)
    ya, yb = max(0.0, y0 - 0.3 * h), min(1.0, y1 + 1.0 * h)
    return slice(int(ya * height), max(int(ya * height) + 1, int(yb * height))), \
        slice(int(xa * width), max(int(xa * width) + 1, int(xb * width)))


def subject_motion(Y: np.ndarray, shifts: np.ndarray, region: tuple[slice, slice]) -> float:
    """Mean |Y_t+1 - shifted Y_t| inside the region, over consecutive sampled frames."""
    if len(Y) < 2:
        return 0.0
    vals = []
    for a, b, (dy, dx) in zip(Y, Y[1:], shifts):
        moved = np.roll(a, (int(round(dy)), int(round(dx))), axis=(0, 1))
        vals.append(float(np.abs(b[region] - moved[region]).mean()))
    return float(np.mean(vals))


# ---------------------------------------------------------------------------------------------
# static overlays and burned-in text

def gradients(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central differences (gx, gy), [H, W] each (zero on the border)."""
    gx, gy = np.zeros_like(y), np.zeros_like(y)
    gx[:, 1:-1] = (y[:, 2:] - y[:, :-2]) / 2
    gy[1:-1] = (y[2:] - y[:-2]) / 2
    return gx, gy


def overlay_measures(Y: np.ndarray, edge: float = 0.25, persist: float = 0.9, cell: int = 8,
                     density: float = 0.15, min_run: int = 4) -> tuple[float, float]:
    """(static_overlay_ratio, text_score): area fractions of `cell`-px cells dense in strong edges
    fixed in `persist` of the frames, and of horizontal runs of at least `min_run` such cells that
    also hold fixed vertical strokes of constant polarity (a line of characters)."""
    n, H, W = Y.shape
    strong = np.zeros((H, W), np.float32)
    sign = np.zeros((H, W), np.float32)
    for y in Y:
        gx, gy = gradients(y)
        strong += np.hypot(gx, gy) > edge
        sign += np.sign(gx) * (np.abs(gx) > edge)
    fixed = strong >= persist * n
    vfixed = np.abs(sign) >= persist * n  # a vertical stroke edge of constant polarity
    hc, wc = H // cell, W // cell
    cells = fixed[:hc * cell, :wc * cell].reshape(hc, cell, wc, cell).mean(axis=(1, 3))
    vs = (vfixed & fixed)[:hc * cell, :wc * cell].reshape(hc, cell, wc, cell).mean(axis=(1, 3))
    dense = cells >= density
    textish = dense & (vs >= density / 2)
    runs = np.zeros_like(textish)
    for r in range(hc):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], textish[r].astype(np.int8), [0]])))
        for a, b in zip(edges[::2], edges[1::2]):  # [a, b): one run of text-like cells
            runs[r, a:b] = b - a >= min_run
    total = max(hc * wc, 1)
    return float(dense.sum() / total), float(runs.sum() / total)


# ---------------------------------------------------------------------------------------------
# content safety and the omni-model pass (local transformers models)

def unsafe_ids(path: str | Path, unsafe_labels: tuple[str, ...]) -> dict[int, str]:
    """{class index: label} of the safety model's labels listed in `unsafe_labels` (case-insensitive);
    reads only the model's config."""
    from transformers import AutoConfig

    p = model_dir(path, "--safety-model")
    config = load("--safety-model", p, lambda: AutoConfig.from_pretrained(str(p), local_files_only=True))
    labels = {int(k): str(v) for k, v in config.id2label.items()}
    wanted = {u.strip().lower() for u in unsafe_labels if u.strip()}
    found = {k: v for k, v in sorted(labels.items()) if v.lower() in wanted}
    if not found:
        raise ValueError(f"--safety-model {p}: none of its labels ({', '.join(labels.values())}) is among "
                         f"--unsafe-labels ({', '.join(sorted(wanted))})")
    return found


def load_safety_model(path: str, unsafe_labels: tuple[str, ...]) -> Callable[[np.ndarray], tuple[float, str]]:
    """A local image classifier -> f(frames) = (max probability of an unsafe label, that label)."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    ids = unsafe_ids(path, unsafe_labels)
    unsafe, names = list(ids), list(ids.values())
    what = "--safety-model"
    processor = load(what, Path(path), lambda: AutoImageProcessor.from_pretrained(str(path), local_files_only=True))
    model = load(what, Path(path), lambda: AutoModelForImageClassification.from_pretrained(
        str(path), local_files_only=True).eval())

    def score(frames: np.ndarray) -> tuple[float, str]:
        with torch.inference_mode():
            probs = model(**processor(images=list(frames), return_tensors="pt")).logits.softmax(-1)
        sub = probs[:, unsafe]  # [frames, unsafe labels]
        flat = int(torch.argmax(sub))
        return float(sub.flatten()[flat]), names[flat % len(unsafe)]
    return score


def parse_omni(text: str) -> tuple[str, dict[str, str | None]]:
    """(omni_status, {key: label}) from a model's answer: the first JSON object in it (code fences
    and surrounding prose allowed), else `key: value` lines; unparsable when no key is found."""
    found = first_json_object(text) or {}
    if not found:
        for line in text.splitlines():
            kv = re.match(r"^[\s\-*\"']*(\w+)[\"']?\s*[:=]\s*(.+?)[\s,]*$", line)
            if kv:
                found[kv.group(1).lower()] = kv.group(2).strip().strip("\"'")
    labels = {k: as_label(found.get(k)) for k in OMNI_KEYS}
    return ("assessed" if any(v is not None for v in labels.values()) else "unparsable"), labels


# ---------------------------------------------------------------------------------------------
# the stage

def _spread(frames: np.ndarray, k: int) -> np.ndarray:
    """k frames evenly spread over the clip."""
    return frames[np.unique(np.linspace(0, len(frames) - 1, min(k, len(frames))).round().astype(int))]


@dataclass
class Filter(Stage):
    name: ClassVar[str] = "filter"
    kind: ClassVar[str] = "filtered"
    version: ClassVar[str] = "2"
    reads: ClassVar[tuple[str, ...]] = ("id", "video_path", "start_s", "end_s")
    writes: ClassVar[tuple[str, ...]] = tuple(f.name for f in FILTER_COLUMNS)

    sample_fps: float = ranged(4.0, min=0.1)
    max_side: int = ranged(480, min=64)
    face_upsample: int = ranged(1, min=0, max=3)  # dlib pyramid upsampling: 1 finds faces down to ~40 px at max_side
    subject_detector: str | None = None
    detector_threshold: float = ranged(0.5, min=0, max=1)  # transformers detectors: box score threshold
    detector_labels: tuple[str, ...] = ()  # transformers detectors: labels kept (empty: all)
    min_track_ratio: float = ranged(0.25, min=0, max=1)  # a track seen in fewer sampled frames is not a subject
    min_face_area: float = ranged(0.02, min=0, max=1)
    max_face_area: float = ranged(0.6, min=0, max=1)
    min_face_frames: float = ranged(0.8, min=0, max=1)
    max_text_score: float = ranged(0.005, min=0, max=1)
    min_sharpness: float = ranged(2e-4, min=0)
    min_luma: float = ranged(0.12, min=0, max=1)
    max_luma: float = ranged(0.88, min=0, max=1)
    max_clipped: float = ranged(0.25, min=0, max=1)
    max_blockiness: float = ranged(1.5, min=0)
    max_flicker: float = ranged(0.05, min=0)
    max_jitter: float = ranged(0.01, min=0)
    max_camera_motion: float = ranged(0.1, min=0)
    min_subject_motion: float = ranged(0.005, min=0)
    safety_model: str | None = None
    unsafe_labels: tuple[str, ...] = ("nsfw", "porn", "hentai", "sexy", "violence")
    max_unsafe: float = ranged(0.5, min=0, max=1)
    omni_model: str | None = None
    omni_frames: int = ranged(4, min=1)
    omni_max_tokens: int = ranged(256, min=1)

    def __post_init__(self):
        for lo, hi in (("min_face_area", "max_face_area"), ("min_luma", "max_luma")):
            if not getattr(self, lo) < getattr(self, hi):
                raise ValueError(f"--{lo.replace('_', '-')} ({getattr(self, lo):g}) must be below "
                                 f"--{hi.replace('_', '-')} ({getattr(self, hi):g})")

    def check(self) -> None:
        """Fail fast on model paths (cheap: no weights are loaded for transformers directories)."""
        if self.subject_detector and Path(self.subject_detector).is_file():
            _dlib_file(Path(self.subject_detector), self.face_upsample)
        elif self.subject_detector:
            model_dir(self.subject_detector, "--subject-detector")
        if self.safety_model:
            unsafe_ids(self.safety_model, self.unsafe_labels)
        if self.omni_model:
            model_dir(self.omni_model, "--omni-model")

    def setup(self) -> None:
        self._detector = load_subject_detector(self.subject_detector, self.face_upsample, self.detector_threshold,
                                               self.detector_labels)
        self._safety_model = load_safety_model(self.safety_model, self.unsafe_labels) if self.safety_model else None
        self._omni_model = (VisionLanguageModel(self.omni_model, "--omni-model", self.omni_max_tokens)
                            if self.omni_model else None)

    def error_row(self, item: dict, message: str) -> dict:
        return {**base_row("filtered"), **item, "safety_status": "not_assessed", "omni_status": "not_assessed"}

    def process(self, item: dict) -> dict:
        row = {**base_row("filtered"), **item}
        frames, times = clip_frames(item["video_path"], item["start_s"], item["end_s"], self.sample_fps,
                                    self.max_side)
        if len(frames) < 2:
            row.update(status="rejected", reasons=list(item.get("reasons") or []) + ["too_few_frames"],
                       frames_sampled=len(frames), safety_status="not_assessed", omni_status="not_assessed")
            return row
        native = clip_frames(item["video_path"], item["start_s"], item["end_s"],
                             NATIVE_FRAMES / max(item["end_s"] - item["start_s"], 1e-3))[0]
        row.update(self.measure(frames, times, native))
        reasons = self.reasons(row)
        if reasons:
            row.update(status="rejected", reasons=list(item.get("reasons") or []) + reasons)
        return row

    def measure(self, frames: np.ndarray, times: np.ndarray, native: np.ndarray) -> dict:
        name, detect = self._detector
        N, H, W = frames.shape[:3]
        out = {"subject_detector": name, "frames_sampled": N}
        out.update(subject_measures([nms(detect(f)) for f in frames], W, H, self.min_track_ratio))
        Y = luma(frames)
        rows, cols = active_area(Y)
        A = np.ascontiguousarray(Y[:, rows, cols])
        out["sharpness"] = sharpness(A)
        out["luma_mean"], out["clipped_ratio"] = exposure(A)
        Yn = luma(native)
        nr, nc = active_area(Yn)
        out["blockiness"] = blockiness(Yn[:, nr, nc]) if len(Yn) else None
        out["flicker"] = flicker(A)
        region = subject_region(out["face_box"], W, H) if out["face_box"] is not None else None
        shifts = global_motion(Y, region)
        out["camera_motion"], out["jitter"] = motion_measures(shifts, times, A.shape[2])
        out["subject_motion"] = subject_motion(Y, shifts, region) if region and out["subject_count"] else None
        out["static_overlay_ratio"], out["text_score"] = overlay_measures(A)
        out.update(self._safety(frames))
        out.update(self._omni(frames))
        return out

    def _safety(self, frames: np.ndarray) -> dict:
        if self._safety_model is None:
            return {"safety_status": "not_assessed", "safety_score": None, "safety_label": None}
        score, label = self._safety_model(_spread(frames, 4))
        return {"safety_status": "assessed", "safety_score": score, "safety_label": label}

    def _omni(self, frames: np.ndarray) -> dict:
        if self._omni_model is None:
            return {"omni_status": "not_assessed"}
        status, labels = parse_omni(self._omni_model(_spread(frames, self.omni_frames), OMNI_PROMPT))
        return {"omni_status": status, **{f"omni_{k}": v for k, v in labels.items()}}

    def reasons(self, m: dict) -> list[str]:
        """Reason codes for the measures in `m` (empty: the clip is kept)."""
        r = []
        if m["subject_count"] == 0:
            r.append("no_subject")
        elif m["subject_count"] > 1:
            r.append("multiple_subjects")
        if m["face_area_ratio"] is not None and m["face_area_ratio"] < self.min_face_area:
            r.append("face_too_small")
        if m["face_area_ratio"] is not None and m["face_area_ratio"] > self.max_face_area:
            r.append("face_too_large")
        if m["subject_count"] >= 1 and m["face_frame_ratio"] < self.min_face_frames:
            r.append("face_missing_frames")
        if m["text_score"] > self.max_text_score:
            r.append("burned_in_text")
        if m["sharpness"] < self.min_sharpness:
            r.append("blurry")
        if not self.min_luma <= m["luma_mean"] <= self.max_luma or m["clipped_ratio"] > self.max_clipped:
            r.append("bad_exposure")
        if m["blockiness"] is not None and m["blockiness"] > self.max_blockiness:
            r.append("blocky")
        if m["flicker"] > self.max_flicker:
            r.append("flicker")
        if m["jitter"] > self.max_jitter:
            r.append("shaky")
        if m["camera_motion"] > self.max_camera_motion:
            r.append("camera_motion")
        if m["subject_motion"] is not None and m["subject_motion"] < self.min_subject_motion:
            r.append("static_subject")
        if m["safety_score"] is not None and m["safety_score"] >= self.max_unsafe:
            r.append("unsafe")
        return r
