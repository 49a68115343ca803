"""Faces with dlib (weights ship in the face_recognition_models package; no download).

HOG frontal-face detection, 68-point landmarks, 128-d identity embeddings, and the measures built on
them (mouth opening). The model files are found through `importlib.util.find_spec`, without
importing the package (its `__init__` needs pkg_resources).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

# 68-point layout (iBUG 300-W): inner lip corners 60/64, inner upper lip 61-63, inner lower lip 65-67
INNER_UPPER = (61, 62, 63)
INNER_LOWER = (67, 66, 65)
MOUTH_CORNERS = (60, 64)


class FaceModelError(RuntimeError):
    """dlib or its model files are not installed."""


def model_file(name: str) -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelError("face_recognition_models is not installed (pip install face_recognition_models)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise FaceModelError(f"missing dlib model file {path}")
    return path


@lru_cache(maxsize=None)
def _models():
    try:
        import dlib
    except ImportError as e:
        raise FaceModelError(f"dlib is not importable ({e}); pip install dlib-bin") from None
    return (dlib.get_frontal_face_detector(),
            dlib.shape_predictor(str(model_file("shape_predictor_68_face_landmarks.dat"))),
            dlib.face_recognition_model_v1(str(model_file("dlib_face_recognition_resnet_model_v1.dat"))))


@dataclass
class Face:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels of the analysed frame
    score: float  # HOG detector confidence
    landmarks: np.ndarray  # [68, 2] float32 pixel coordinates

    @property
    def area(self) -> int:
        return max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1])


def detect(rgb: np.ndarray, upsample: int = 0, min_score: float = 0.0) -> list[Face]:
    """Faces in one RGB uint8 frame, largest first."""
    import dlib

    detector, predictor, _ = _models()
    rects, scores, _ = detector.run(np.ascontiguousarray(rgb), upsample, min_score)
    faces = []
    for r, s in zip(rects, scores):
        shape = predictor(rgb, r)
        pts = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
        faces.append(Face((r.left(), r.top(), r.right(), r.bottom()), float(s), pts))
    del dlib
    return sorted(faces, key=lambda f: -f.area)


def embedding(rgb: np.ndarray, face: Face) -> np.ndarray:
    """128-d identity embedding of a detected face (Euclidean distance < 0.6: same person)."""
    import dlib

    _, predictor, encoder = _models()
    x0, y0, x1, y1 = face.box
    shape = predictor(rgb, dlib.rectangle(x0, y0, x1, y1))
    return np.asarray(encoder.compute_face_descriptor(np.ascontiguousarray(rgb), shape, 1), np.float32)


def mouth_opening(landmarks: np.ndarray) -> float:
    """Inner-lip gap over mouth width (scale-free; ~0 closed, ~0.3+ wide open)."""
    gap = np.linalg.norm(landmarks[list(INNER_UPPER)] - landmarks[list(INNER_LOWER)], axis=1).mean()
    width = np.linalg.norm(landmarks[MOUTH_CORNERS[0]] - landmarks[MOUTH_CORNERS[1]])
    return float(gap / max(width, 1e-6))


@lru_cache(maxsize=None)
def _hog():
    try:
        import dlib
    except ImportError as e:
        raise FaceModelError(f"dlib is not importable ({e}); pip install dlib-bin") from None
    return dlib.get_frontal_face_detector()


def face_boxes(rgb: np.ndarray, upsample: int = 0, min_score: float = 0.0) -> list[tuple[tuple[int, int, int, int], float]]:
    """HOG face boxes (x0, y0, x1, y1) and scores in one RGB uint8 frame (no landmark or embedding
    model is loaded)."""
    rects, scores, _ = _hog().run(np.ascontiguousarray(rgb), upsample, min_score)
    return [((r.left(), r.top(), r.right(), r.bottom()), float(s)) for r, s in zip(rects, scores)]


def landmarks_in_box(rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """68 landmarks [68, 2] of the face inside a known box (x0, y0, x1, y1), without detection."""
    import dlib

    _, predictor, _ = _models()
    shape = predictor(np.ascontiguousarray(rgb), dlib.rectangle(*(int(v) for v in box)))
    return np.array([(p.x, p.y) for p in shape.parts()], np.float32)
