"""Identity (CSIM): cosine similarity of face embeddings, reference image vs every scored frame.

Protocol: the reference's largest face (dlib HOG, upsampled once if none is found at full size) and,
in each scored frame, the main face of the clip's face track (stages/sense/mouth.py) are embedded;
`identity` is the mean cosine similarity over the frames where a face is found (frames without a face
are counted by `face_found`, not scored). One embedder per result, named in `identity_embedder`:

- default: dlib's 128-d ResNet (`dlib_face_recognition_resnet_model_v1.dat` from
  face_recognition_models; dlib aligns the 150 x 150 chip from the 68 landmarks). Same person
  typically > 0.9, different people < 0.85; not comparable to ArcFace numbers.
- `--arcface DIR`: an insightface-style ArcFace recognition model (`*.onnx` with a 1 x 3 x 112 x 112
  input) run with onnxruntime, the paper's protocol: the face is aligned by a similarity transform
  of five points (eye centres, nose tip, mouth corners, from the 68 landmarks) onto the standard
  112 x 112 ArcFace template, RGB scaled to (x - 127.5) / 127.5.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from stages.eval.metrics import EvalError

DLIB_NAME = "dlib_resnet_v1_128d"
# insightface's 112 x 112 ArcFace template: left eye, right eye, nose tip, left and right mouth corner
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """[68, 2] dlib landmarks -> [5, 2]: eye centres (image left first), nose tip, mouth corners."""
    return np.stack([landmarks[36:42].mean(0), landmarks[42:48].mean(0), landmarks[30], landmarks[48],
                     landmarks[54]]).astype(np.float32)


def arcface_chip(rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The 112 x 112 RGB face chip: similarity transform of the five points onto ARCFACE_TEMPLATE."""
    import cv2

    M, _ = cv2.estimateAffinePartial2D(five_points(landmarks), ARCFACE_TEMPLATE, method=cv2.LMEDS)
    return cv2.warpAffine(np.ascontiguousarray(rgb), M, (112, 112), borderValue=0.0)


class DlibEmbedder:
    name = DLIB_NAME

    def __call__(self, rgb: np.ndarray, box, landmarks: np.ndarray) -> np.ndarray:
        from stages.sense import faces

        return faces.embedding(rgb, faces.Face(tuple(int(v) for v in box), 0.0, landmarks))


class ArcFaceEmbedder:
    """An ArcFace ONNX model from a local folder (see the module doc)."""

    def __init__(self, folder: str | Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise EvalError(f"--arcface {folder}: onnxruntime is not installed (pip install onnxruntime)") from None
        p = Path(folder)
        files = sorted(p.glob("*.onnx")) if p.is_dir() else [p] if p.suffix == ".onnx" and p.is_file() else []
        if not files:
            raise EvalError(f"--arcface {folder}: no .onnx model file there")
        for f in files:
            try:
                sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
            except Exception as e:  # a broken or foreign file: try the next, then say what failed
                last = f"{f.name}: {type(e).__name__}"
                continue
            shape = sess.get_inputs()[0].shape
            if len(shape) == 4 and list(shape[1:]) == [3, 112, 112]:
                self.session, self.input = sess, sess.get_inputs()[0].name
                self.name = f"arcface_onnx({f.name})"
                return
            last = f"{f.name}: input {shape}, not [N, 3, 112, 112]"
        raise EvalError(f"--arcface {folder}: no ArcFace recognition model ({last})")

    def __call__(self, rgb: np.ndarray, box, landmarks: np.ndarray) -> np.ndarray:
        x = ((arcface_chip(rgb, landmarks).astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        return np.asarray(self.session.run(None, {self.input: x})[0][0], np.float32)


@lru_cache(maxsize=4)
def load_embedder(arcface: str | None):
    return ArcFaceEmbedder(arcface) if arcface else DlibEmbedder()


class NoReferenceFace(EvalError):
    """The reference image shows no face dlib can find."""


def reference_face(rgb: np.ndarray):
    """The largest face of the reference image (box, landmarks); EvalError when there is none."""
    from stages.sense import faces

    for upsample in (0, 1):
        found = faces.detect(rgb, upsample=upsample)
        if found:
            return found[0].box, found[0].landmarks
    raise NoReferenceFace("no face found in the reference image")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def identity_curve(frames: np.ndarray, landmarks: np.ndarray, boxes: list, index: np.ndarray, embedder,
                   reference: np.ndarray) -> np.ndarray:
    """Cosine similarity to the reference embedding at the frames `index` (nan where no face)."""
    out = np.full(len(index), np.nan)
    for j, i in enumerate(index):
        if boxes[i] is not None and not np.isnan(landmarks[i]).any():
            out[j] = cosine(embedder(frames[i], boxes[i], landmarks[i]), reference)
    return out
