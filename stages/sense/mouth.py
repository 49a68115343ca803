"""The subject's mouth over time: dlib 68 landmarks of the main face on a 25 fps grid, and the speech
level in the same frame bins. Shared by active-speaker detection (stages/diarize.py) and the lip-sync
metric of `vidu eval` (stages/eval/metrics/sync.py).

The face is detected (HOG) every `REDETECT` frames; landmarks are fitted in every frame inside the
last detected box.

Small faces (issue 20). Frames are analysed with the longer side scaled to `FACE_MAX_SIDE` (480 px),
and dlib's HOG finds no face under ~80 px without upsampling: any face narrower than about 1/6 of
the frame's longer side was never found. A 1080x1920 portrait of a seated person (face ~20 % of the
1080 px width, 216 px) becomes 270x480 with a 54 px face; the same holds for a face under ~320 px
in 1080p. `vidu filter` still finds such faces (it upsamples once), but here every frame had none,
so diarize's sync confidence was None and all speech was called `offscreen`. Now, when the
analysis-size frames show a face in under half of the detections or one under `MIN_FACE_PX`
wide (a coarse mouth), `locate_face` searches a few
frames at up to `LOCATE_MAX_SIDE` and the clip is tracked again in a crop around that face
(`CROP_MARGIN` face widths on each side, covering head motion), where the face is large again. mediapipe's face mesh is not used: its PyPI wheel (1.2.3, checked with
`pip download mediapipe`, again on 2026-12-04: no .tflite or .task file among its 165 files) ships no
face-landmarker model file, and nothing is downloaded at run time.

Head motion (issue 20, 2026-12-04). `locate_face` looks at the first and the last frame of the clip
and evenly between (before: LOCATE_FRAMES frames from the start, so a face that moved late in the
clip left the crop), and diarize's tracks (`mouth_landmarks`) fit the landmarks in a box that
follows the face between detections (`track_face(follow=True)`: the detected box shifted by how far
the previous frame's nose and eye landmarks moved since the detection); `vidu eval` keeps the plain
box. On a ~100 px face panning 400 px across a portrait over 6 s while it bobs and rolls
(tests/test_diarize_motion.py) the plain box read the A/V offset of its own audio at confidence 0.21
and of +0.5 s late audio at 0.15 (so a desync passed); following the face, 0.62 and 0.52
(av_desync), speaker z 1.93 -> 3.17. Following all 68 points instead (the jaw and lips move with
speech) read 0.63 / 0.53 there but 0.43 instead of 0.50 on a pan alone, and retalking_5's z fell to 1.31.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.sense.media import clip_frames, frames_at, grid_times
from stages.sense.speech import SAMPLE_RATE

FACE_FPS = 25.0  # mouth sampling: syllables come at 4-6 Hz; the SyncNet protocol's video rate
REDETECT = 5  # frames between face detections (landmarks every frame)
FACE_MAX_SIDE = 480
LOCATE_FRAMES = 3  # frames searched at full size when the analysis-size frames show no face
LOCATE_MAX_SIDE = 1920  # HOG at 1080x1920: ~0.45 s a frame, faces from ~80 px
CROP_MARGIN = 1.0  # face widths kept on each side of the located face (head motion)
MIN_FACE_PX = 120  # a face narrower than this at analysis size is tracked again in a crop (mouth ~40 px)
RMS_FLOOR = 1e-4  # about -80 dBFS
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)  # 68-point layout (iBUG 300-W)
RIGID = slice(27, 48)  # nose and eyes: points that move with the head, not with the jaw or the lips

Box = tuple[int, int, int, int]


@dataclass
class FaceTrack:
    """Landmarks of the main face per frame of a clip."""

    landmarks: np.ndarray  # [T, 68, 2] float32 pixels; nan where no face
    detected: np.ndarray  # [T] bool: a detection ran at this frame
    found: np.ndarray  # [T] bool: that detection found a face (False where none ran)
    boxes: list[Box | None]  # [T] box the landmarks were fitted in


def pick_face(boxes: list, face_box: list[float] | None, w: int, h: int):
    """The largest box, or (given a relative `face_box` x0, y0, x1, y1) the one overlapping it most;
    None when none overlaps it."""
    if not face_box:
        return max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    import torch
    from torchvision.ops import box_iou

    ref = torch.tensor([[face_box[0] * w, face_box[1] * h, face_box[2] * w, face_box[3] * h]], dtype=torch.float64)
    overlap = torch.nan_to_num(box_iou(torch.tensor(boxes, dtype=torch.float64), ref)[:, 0])  # [boxes]
    best = int(overlap.argmax())
    return boxes[best] if overlap[best] > 0 else None


def track_face(frames: np.ndarray, face_box: list[float] | None = None, redetect: int = REDETECT,
               small_faces: bool = False, follow: bool = False) -> FaceTrack:
    """Landmarks of the main face in every frame of [T, H, W, 3] uint8 RGB (detected every `redetect`).
    `small_faces`: where the detector finds none, look again on the frame upsampled 2x (HOG finds faces
    down to ~40 px instead of ~80 px, at ~4x the cost of that detection). `follow`: between detections
    the box moves with the face (shifted by how far the previous frame's nose and eye landmarks moved
    since the detection) instead of staying where the face was detected."""
    from stages.sense import faces

    T = len(frames)
    lm = np.full((T, 68, 2), np.nan, np.float32)
    detected, found = np.zeros(T, bool), np.zeros(T, bool)
    boxes: list[Box | None] = [None] * T
    box = anchor = None
    for i, rgb in enumerate(frames):
        if i % redetect == 0:
            cands = [b for b, _ in faces.face_boxes(rgb)]
            if not cands and small_faces:
                cands = [b for b, _ in faces.face_boxes(rgb, upsample=1)]
            box = pick_face(cands, face_box, rgb.shape[1], rgb.shape[0]) if cands else None
            detected[i], found[i] = True, box is not None
            anchor = None
        if box is None:
            continue
        use = box
        if follow and anchor is not None:
            dx, dy = np.round(lm[i - 1, RIGID].mean(0) - anchor).astype(int)
            use = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
        lm[i] = faces.landmarks_in_box(rgb, use)
        boxes[i] = use
        if follow and anchor is None:
            anchor = lm[i, RIGID].mean(0)
    return FaceTrack(lm, detected, found, boxes)


def opening_by_width(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap over mouth width per frame ([T, 68, 2] -> [T]; nan without a face)."""
    from stages.sense.faces import INNER_LOWER, INNER_UPPER, MOUTH_CORNERS

    gap = np.linalg.norm(landmarks[:, list(INNER_UPPER)] - landmarks[:, list(INNER_LOWER)], axis=-1).mean(-1)
    width = np.linalg.norm(landmarks[:, MOUTH_CORNERS[0]] - landmarks[:, MOUTH_CORNERS[1]], axis=-1)
    return gap / np.maximum(width, 1e-6)


def mouth_track(path: str, start_s: float, end_s: float, face_box: list[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Times (s from start_s: the `FACE_FPS` grid k / FACE_FPS) and mouth opening (over mouth width) of
    the frame shown at each (media.frames_at, the one sampling convention; nan: no face); the face
    is the one overlapping the relative `face_box` most when given, else the largest."""
    times, landmarks = mouth_landmarks(path, start_s, end_s, face_box)
    return times, opening_by_width(landmarks).astype(np.float64)


def mouth_landmarks(path: str, start_s: float, end_s: float, face_box: list[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """`mouth_track`'s times (s from start_s) and the main face's 68 landmarks [T, 68, 2] per
    frame (nan: no face; in the pixels of the analysed frames or of the crop around a small face)."""
    frames, times = clip_frames(path, start_s, end_s, fps=FACE_FPS, max_side=FACE_MAX_SIDE)
    track = track_face(frames, face_box, follow=True)
    if _found_share(track) < 0.5 or _face_width(track) < MIN_FACE_PX:
        located = locate_face(path, start_s, end_s, face_box)
        if located is not None:
            region, face = located
            frames, crop_times = clip_frames(path, start_s, end_s, fps=FACE_FPS, max_side=FACE_MAX_SIDE, crop=region)
            crop_track = track_face(frames, _relative_to(face, region), small_faces=True, follow=True)
            if _found_share(crop_track) >= max(0.5, _found_share(track)):
                track, times = crop_track, crop_times
    return np.asarray(times) - start_s, track.landmarks


def _found_share(track: FaceTrack) -> float:
    return float(track.found[track.detected].mean()) if track.detected.any() else 0.0


def _face_width(track: FaceTrack) -> float:
    widths = [b[2] - b[0] for b in track.boxes if b is not None]
    return float(np.median(widths)) if widths else 0.0


def locate_face(path: str, start_s: float, end_s: float, face_box: list[float] | None):
    """The main face in `LOCATE_FRAMES` frames spread over the clip, decoded with the longer side at
    most `LOCATE_MAX_SIDE` (upsampled once more when that is under half of it): (crop region, face
    union box), both relative x0, y0, x1, y1; the region is the union grown by `CROP_MARGIN` face
    widths on each side. None when no frame shows a face."""
    from stages.sense import faces

    grid = grid_times(start_s, end_s, FACE_FPS)
    if not len(grid):
        return None
    # the first and the last grid frame and evenly between: a face that moves through the clip is
    # located at both ends of its path (the crop must hold it in every frame)
    frames, _ = frames_at(path, grid[np.unique(np.round(np.linspace(0, len(grid) - 1, LOCATE_FRAMES)).astype(int))],
                          end_s, LOCATE_MAX_SIDE)
    found = []
    for rgb in frames:
        H, W = rgb.shape[:2]
        cands = [b for b, _ in faces.face_boxes(rgb)]
        if not cands and max(H, W) <= LOCATE_MAX_SIDE // 2:
            cands = [b for b, _ in faces.face_boxes(rgb, upsample=1)]
        box = pick_face(cands, face_box, W, H) if cands else None
        if box is not None:
            found.append((box[0] / W, box[1] / H, box[2] / W, box[3] / H))
    if not found:
        return None
    b = np.asarray(found)
    face = (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
    mx, my = CROP_MARGIN * np.median(b[:, 2] - b[:, 0]), CROP_MARGIN * np.median(b[:, 3] - b[:, 1])
    region = (max(0.0, face[0] - mx), max(0.0, face[1] - my), min(1.0, face[2] + mx), min(1.0, face[3] + my))
    return tuple(float(v) for v in region), tuple(float(v) for v in face)


def _relative_to(box: tuple[float, ...], region: tuple[float, ...]) -> list[float]:
    """A relative box of the frame as a relative box of the crop `region`."""
    w, h = region[2] - region[0], region[3] - region[1]
    return [(box[0] - region[0]) / w, (box[1] - region[1]) / h, (box[2] - region[0]) / w, (box[3] - region[1]) / h]


def frame_level(audio: np.ndarray, times: np.ndarray, fps: float = FACE_FPS) -> np.ndarray:
    """Log RMS of 16 kHz audio in the bins [t, t + 1 / fps) of the frame times (s)."""
    n = int(SAMPLE_RATE / fps)
    out = np.zeros(len(times))
    for i, t in enumerate(times):
        a = int(t * SAMPLE_RATE)
        x = audio[a:a + n] if a >= 0 else np.zeros(0)
        out[i] = np.sqrt(np.mean(x.astype(np.float64) ** 2)) if len(x) else 0.0
    return np.log(np.maximum(out, RMS_FLOOR))
