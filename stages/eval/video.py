"""Score one generated video against its reference image: identity, lip sync, quality proxies, drift
and instruction following (protocols in stages/eval/metrics/*).

    from stages.eval.video import EvalOptions, score_video, score_frames
    score_video(Path("gen.mp4"), Path("ref.png"))                       # audio: the video's own track
    score_frames(frames, 25.0, wave, ref_rgb, options=EvalOptions())    # decoded frames, 16 kHz wave

The video is decoded on a 25 fps grid (the SyncNet protocol's rate; frames of other rates are
resampled to it by nearest preceding frame), at most `max_frames` of them from the start, scaled so
the longer side is at most `max_side` for analysis. The main face is tracked (stages/sense/mouth.py);
identity is scored every `identity_every` frames, the mouth and quality on every frame.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.eval.metrics import NOT_ASSESSED, EvalError
from stages.eval.metrics import drift as drift_m
from stages.eval.metrics import identity as identity_m
from stages.eval.metrics import instructions as instructions_m
from stages.eval.metrics import quality as quality_m
from stages.eval.metrics import sync as sync_m
from stages.sense.mouth import FACE_FPS, track_face
from stages.sense.speech import SAMPLE_RATE

NATIVE_FRAMES = 6  # frames kept at native size for blockiness


@dataclass
class EvalOptions:
    arcface: str | None = None  # local ArcFace ONNX folder; None: dlib's 128-d ResNet
    syncnet: str | None = None  # local SyncNet weights (not supported: EvalError)
    dover: str | None = None  # local DOVER folder (not supported: EvalError)
    judge: str | None = None  # local vision-language model folder judging instructions on real video
    drift_segments: int = 4
    max_frames: int = 1500  # frames of the 25 fps grid scored (60 s)
    max_side: int = 320  # analysis size (longer side, px); sharpness depends on it
    identity_every: int = 5  # identity on every 5th frame of the grid (5 per second)
    latency_s: float = 1.0  # an instructed action must start within this after its onset
    device: str = "cpu"

    def check(self) -> None:
        """Fail fast on options that cannot be honoured (one line each)."""
        if self.syncnet:
            sync_m.check_syncnet(self.syncnet)
        if self.dover:
            raise EvalError(f"--dover {self.dover}: DOVER is not supported by this build (its Swin-T and "
                            "ConvNeXt-3D branches are not reimplemented); quality is scored with named proxies")
        if self.judge:
            from models.hf import model_dir

            try:
                model_dir(self.judge, "--judge")
            except (FileNotFoundError, ValueError) as e:
                raise EvalError(str(e)) from None
        if self.drift_segments < 1 or self.max_frames < 2 or self.max_side < 64 or self.identity_every < 1:
            raise EvalError("drift segments >= 1, max frames >= 2, max side >= 64, identity every >= 1")


def read_image(path: str | Path) -> np.ndarray:
    """An RGB uint8 image (or a video's first frame) through PyAV."""
    from stages.sense.media import MediaError, open_container

    try:
        with open_container(path) as c:
            if not c.streams.video:
                raise EvalError(f"{path}: no image in it")
            for frame in c.decode(c.streams.video[0]):
                return frame.to_ndarray(format="rgb24")
    except MediaError as e:
        raise EvalError(f"{path}: {e}") from None
    raise EvalError(f"{path}: no decodable frame")


def decode_video(path: str | Path, max_frames: int, max_side: int | None = None) -> tuple[np.ndarray, float]:
    """Frames on the 25 fps grid from t = 0 of the file's timeline (the audio's origin): at each grid
    time the latest frame shown by then (the first frame before it starts), at most `max_frames`,
    the longer side scaled to at most `max_side`; and the video's duration (s)."""
    from stages.sense.media import MediaError, clip_frames

    try:
        frames, times = clip_frames(path, 0.0, max_frames / FACE_FPS + 1.0, max_side=max_side)
    except MediaError as e:
        raise EvalError(f"{path}: {e}") from None
    if len(frames) < 2:
        raise EvalError(f"{path}: fewer than 2 decodable video frames")
    end = float(times[-1] + np.median(np.diff(times)))
    grid = np.arange(min(max_frames, int(np.floor(end * FACE_FPS + 1e-6)))) / FACE_FPS
    idx = np.maximum(np.searchsorted(times, grid + 1e-6, side="right") - 1, 0)
    return frames[idx], end


def native_luma(path: str | Path, seconds: float, n: int = NATIVE_FRAMES) -> np.ndarray:
    """Luma of `n` frames spread over [0, seconds) at native size (for blockiness)."""
    from stages.sense.media import clip_frames

    out = []
    for t in np.linspace(0, seconds, n, endpoint=False):
        fr, _ = clip_frames(path, float(t), float(t) + 0.5)
        if len(fr):
            out.append(quality_m.luma(fr[:1])[0])
    return np.stack(out) if out else np.zeros((0, 8, 8), np.float32)


def load_wave(path: str | Path) -> np.ndarray:
    from stages.sense.media import MediaError, load_audio

    try:
        return load_audio(path, SAMPLE_RATE)
    except MediaError as e:
        raise EvalError(f"{path}: {e}") from None


def load_instructions(instructions: str | Path | list | dict | None):
    if instructions is None or isinstance(instructions, (list, dict)):
        return instructions
    try:
        return json.loads(Path(instructions).read_text())
    except (OSError, ValueError) as e:
        raise EvalError(f"--instructions {instructions}: not a readable JSON file ({type(e).__name__})") from None


def score_video(video: Path, reference: Path | np.ndarray, audio: Path | None = None,
                instructions: Path | list | None = None, options: EvalOptions = EvalOptions()) -> dict:
    """Score a video file (see score_frames for the keys). `reference`: an image (or a video whose
    first frame is used) or an RGB uint8 array; `audio`: a file whose first audio track is the speech
    (default: the video's own); `instructions`: a JSON file or list of {"t": s, "action"|"text": ...}
    events, or a synthetic sample's truth JSON (with "identity" and "actions")."""
    options.check()
    identity_m.load_embedder(options.arcface)  # a model folder that cannot be used fails before decoding
    ref = reference if isinstance(reference, np.ndarray) else read_image(reference)
    frames, _ = decode_video(video, options.max_frames, options.max_side)
    wave = load_wave(audio if audio is not None else video)
    native = native_luma(video, len(frames) / FACE_FPS)
    out = score_frames(frames, FACE_FPS, wave, ref, load_instructions(instructions), options, native=native)
    out["video"] = str(video)
    if len(native):
        out.update(height=int(native.shape[1]), width=int(native.shape[2]))
    return out


def resample_25(frames: np.ndarray, fps: float) -> np.ndarray:
    """Frames of rate `fps` on the 25 fps grid (the latest frame at or before each grid time)."""
    if abs(fps - FACE_FPS) < 1e-6:
        return frames
    n = int(np.floor(len(frames) / fps * FACE_FPS + 1e-6))
    idx = np.minimum(np.floor(np.arange(n) / FACE_FPS * fps + 1e-6).astype(int), len(frames) - 1)
    return frames[idx]


def analysis_size(frames: np.ndarray, max_side: int) -> np.ndarray:
    import cv2

    H, W = frames.shape[1:3]
    s = min(1.0, max_side / max(H, W))
    if s >= 1.0:
        return frames
    size = (max(2, round(W * s)), max(2, round(H * s)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


def score_frames(frames: np.ndarray, fps: float, wave: np.ndarray | None, reference: np.ndarray,
                 instructions: list | dict | None = None, options: EvalOptions = EvalOptions(),
                 native: np.ndarray | None = None) -> dict:
    """Score decoded frames [T, H, W, 3] uint8 at `fps` with their speech `wave` (16 kHz mono
    float32, starting with the first frame; None or empty: no audio) against the RGB `reference`.

    Returns one flat JSON-able dict: identity, identity_embedder, face_found, sync_method,
    sync_offset_frames, sync_confidence, sync_distance, sharpness, face_sharpness, noise,
    blockiness, flicker, luma_flicker, exposure, clipped, dover, drift {segments, curves, identity,
    sharpness, motion}, instructions (a dict, or "not_assessed"), frames, seconds, fps (25, the
    grid), width, height. Scores that cannot be measured are None (e.g. no face) or "not_assessed"
    (a model we do not have). `native`: luma [K, H, W] of a few frames at the video's native size
    for blockiness (default: taken from `frames`)."""
    options.check()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) < 2:
        raise EvalError("frames must be [T >= 2, H, W, 3] uint8 RGB")
    seconds = len(frames) / fps
    grid = resample_25(frames, fps)[: options.max_frames]
    if native is None:
        native = quality_m.luma(grid[np.linspace(0, len(grid) - 1, min(NATIVE_FRAMES, len(grid))).astype(int)])
    small = analysis_size(grid, options.max_side)
    T = len(small)
    track = track_face(small)
    ref = analysis_size(reference[None], max(options.max_side, 2 * options.max_side))[0]

    embedder = identity_m.load_embedder(options.arcface)
    id_idx = np.arange(0, T, options.identity_every)
    ref_found = True
    try:
        ref_box, ref_lm = identity_m.reference_face(ref)
        ref_vec = embedder(ref, ref_box, ref_lm)
        ident = identity_m.identity_curve(small, track.landmarks, track.boxes, id_idx, embedder, ref_vec)
    except identity_m.NoReferenceFace:  # e.g. the synthetic world's cartoon faces: identity unknown
        ident, ref_found = np.full(len(id_idx), np.nan), False

    Y = quality_m.luma(small)
    out = {"identity": float(np.nanmean(ident)) if (~np.isnan(ident)).any() else None,
           "identity_embedder": embedder.name, "reference_face": ref_found,
           "face_found": float(track.found[track.detected].mean())}
    out.update(sync_m.score_sync(track.landmarks, wave, options.syncnet))
    out.update(quality_m.quality(Y, native, track.boxes))
    out["dover"] = NOT_ASSESSED
    motion = quality_m.frame_change(Y)
    out["drift"] = drift_m.drift({"identity": (ident, id_idx),
                                  "sharpness": (quality_m.frame_sharpness(Y), np.arange(T)),
                                  "motion": (motion, np.arange(1, T))}, T, options.drift_segments)
    out["instructions"] = instructions_m.score_instructions(instructions, grid, FACE_FPS, options.latency_s,
                                                            options.judge)
    out.update(frames=int(len(frames)), seconds=float(seconds), fps=FACE_FPS, scored_frames=T,
               width=int(frames.shape[2]), height=int(frames.shape[1]))
    return out
