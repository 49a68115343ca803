"""Score one generated video against its reference image: identity, lip sync, quality proxies, drift
and instruction following (protocols in stages/eval/metrics/*).

    from stages.eval.video import EvalOptions, score_video, score_frames
    score_video(Path("gen.mp4"), Path("ref.png"))                       # audio: the video's own track
    score_frames(frames, 25.0, wave, ref_rgb, options=EvalOptions())    # decoded frames, 16 kHz wave

The video is put on a 25 fps grid (the SyncNet protocol's rate; other rates take the latest frame
shown at each grid time), scaled so the longer side is at most `max_side` for analysis. Up to
`max_frames` grid frames are all scored; a longer video is scored in runs of CHUNK (5 s) frames
spread evenly over it, so the drift segments cover all of it. The main face is tracked per run
(stages/sense/mouth.py); identity on every `identity_every`-th grid frame, lip sync per run (rho
curves averaged; with --syncnet, SyncNet's distance curves on face crops of the larger frames),
quality and motion on every scored frame (changes within runs only).
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
from stages.eval.metrics import syncnet as syncnet_m
from stages.sense.mouth import FACE_FPS, track_face
from stages.sense.speech import SAMPLE_RATE

NATIVE_FRAMES = 6  # frames kept at native size for blockiness
CHUNK = 125  # grid frames (5 s) per scored run when a video is longer than max_frames


@dataclass
class EvalOptions:
    arcface: str | None = None  # local ArcFace ONNX folder; None: dlib's 128-d ResNet
    syncnet: str | None = None  # local SyncNet weights (syncnet_v2.model); None: the lip-sync proxy
    dover: str | None = None  # DOVER's ONNX export (convert_to_onnx.py), a file or its folder; needs onnxruntime
    judge: str | None = None  # local vision-language model folder judging instructions on real video
    drift_segments: int = 4
    max_frames: int = 1500  # grid frames scored (60 s); a longer video: runs of CHUNK spread over it
    max_side: int = 320  # analysis size (longer side, px); sharpness depends on it
    identity_every: int = 5  # identity on every 5th frame of the grid (5 per second)
    latency_s: float = 1.0  # an instructed action must start within this after its onset
    device: str = "cpu"  # accepted for callers; every model here (dlib, onnxruntime CPU, the judge) runs on CPU

    def check(self) -> None:
        """Fail fast on options that cannot be honoured (one line each)."""
        if self.syncnet:
            sync_m.check_syncnet(self.syncnet)
        if self.dover:
            from stages.eval.metrics.dover import load_model

            load_model(self.dover)  # a missing or foreign model fails before decoding
        if self.judge:
            from models.hf import model_dir

            try:
                model_dir(self.judge, "--judge")
            except (FileNotFoundError, ValueError) as e:
                raise EvalError(str(e)) from None
        if self.drift_segments < 1 or self.max_frames < 2 or self.max_side < 64 or self.identity_every < 1:
            raise EvalError("drift segments >= 1, max frames >= 2, max side >= 64, identity every >= 1")


def read_image(path: str | Path) -> np.ndarray:
    """An RGB uint8 reference: an image file (stages.sense.image: EXIF, 16-bit, palette, alpha, size
    limit), or else a video's first frame through PyAV."""
    from stages.sense.image import ImageError, NotAnImage, read_image as read_still
    from stages.sense.media import MediaError, open_container

    try:
        return read_still(path)
    except NotAnImage:
        pass  # perhaps a video: its first frame below
    except ImageError as e:
        raise EvalError(str(e)) from None
    try:
        with open_container(path) as c:
            if not c.streams.video:
                raise EvalError(f"{path}: no image in it")
            for frame in c.decode(c.streams.video[0]):
                return frame.to_ndarray(format="rgb24")
    except MediaError as e:
        raise EvalError(f"{path}: {e}") from None
    raise EvalError(f"{path}: no decodable frame")


def decode_video(path: str | Path, max_frames: int, max_side: int | None = None,
                 start: int = 0) -> tuple[np.ndarray, float]:
    """Frames on the 25 fps grid of the file's timeline (t = 0: the audio's origin) from grid frame
    `start`: the frame shown at each grid time (stages.sense.media.frames_at: the latest frame
    started by then, the first frame before it starts), at most `max_frames`, the longer side scaled
    to at most `max_side`; and the end of the last frame (s: its start plus the median interval)."""
    from stages.sense.media import MediaError, frames_at, video_index

    try:
        index = video_index(path)
        if len(index) < 2:
            raise EvalError(f"{path}: fewer than 2 video frames")
        end = float((index.pts[-1] + np.median(np.diff(index.pts))) * index.time_base)
        grid = (start + np.arange(max(0, min(max_frames, int(np.floor(end * FACE_FPS + 1e-6)) - start)))) / FACE_FPS
        frames, _ = frames_at(path, grid, max_side=max_side)
    except MediaError as e:
        raise EvalError(f"{path}: {e}") from None
    if len(frames) < len(grid):
        raise EvalError(f"{path}: no decodable video frames")
    return frames, end


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
    spec = load_instructions(instructions)
    wave = load_wave(audio if audio is not None else video)
    seconds = video_seconds(video)
    n_grid = int(np.floor(seconds * FACE_FPS + 1e-6))
    sel = scored_index(n_grid, options.max_frames)
    if len(sel) == n_grid:
        frames, seconds = decode_video(video, n_grid, options.max_side)
        n_grid = len(frames)
        sel = np.arange(n_grid)
    else:
        chunks = [decode_video(video, CHUNK, options.max_side, start=int(a))[0] for a in sel[::CHUNK]]
        sel = np.concatenate([a + np.arange(len(c)) for a, c in zip(sel[::CHUNK], chunks)])
        frames = np.concatenate(chunks)
    native = native_luma(video, seconds)
    grid = (lambda: decode_video(video, n_grid)[0]) if spec is not None else None
    def full(p: int, n: int) -> np.ndarray:  # grid frames sel[p .. p + n - 1] (contiguous) for SyncNet's crops
        return decode_video(video, n, syncnet_m.FRAME_SIDE, start=int(sel[p]))[0]

    out = _score(frames, sel, n_grid, wave, ref, spec, grid, options, native, full)
    if options.dover:  # DOVER samples the file's own frames at native size (metrics/dover.py)
        from stages.eval.metrics.dover import score_file

        out.update(score_file(video, options.dover))
    out.update(video=str(video), frames=n_grid, seconds=float(seconds))
    if len(native):
        out.update(height=int(native.shape[1]), width=int(native.shape[2]))
    return out


def video_seconds(path: str | Path) -> float:
    """End of the video stream on the file's timeline (s), from the demuxed packets."""
    from stages.sense.media import MediaError, open_container

    try:
        with open_container(path) as c:
            if not c.streams.video:
                raise EvalError(f"{path}: no video stream")
            v = c.streams.video[0]
            ends = [float((p.pts + (p.duration or 0)) * v.time_base) for p in c.demux(v) if p.pts is not None]
    except MediaError as e:
        raise EvalError(f"{path}: {e}") from None
    if not ends:
        raise EvalError(f"{path}: no video frames")
    return max(ends)


def scored_index(n: int, max_frames: int) -> np.ndarray:
    """Grid frames scored: all of [0, n) when n <= max_frames, else max_frames // CHUNK runs of CHUNK
    frames spread evenly over the video (so drift segments span all of it)."""
    if n <= max_frames:
        return np.arange(n)
    starts = np.linspace(0, n - CHUNK, max(1, max_frames // CHUNK)).round().astype(int)
    return np.concatenate([np.arange(a, a + CHUNK) for a in starts])


def runs(index: np.ndarray) -> list[slice]:
    """Positions of the contiguous runs of a sorted index."""
    cuts = np.flatnonzero(np.diff(index) != 1) + 1
    return [slice(a, b) for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(index)])]


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

    Returns one flat JSON-able dict: identity, identity_embedder, reference_face, face_found,
    sync_method, sync_offset_frames, sync_confidence, sync_distance, sync_curve, sync_pieces,
    sharpness, face_sharpness, noise, blockiness, flicker, luma_flicker, exposure, clipped, dover (with
    --dover also dover_aesthetic, dover_technical, dover_model),
    drift {segments, curves, identity, sharpness, motion}, instructions (a dict, or "not_assessed"),
    frames (input frames), seconds, fps (25, the grid), scored_frames, width, height. Scores that
    cannot be measured are None (e.g. no face) or "not_assessed" (a model we do not have).
    Over `max_frames` grid frames, runs of CHUNK frames spread over the whole video are scored.
    `native`: luma [K, H, W] of a few frames at native size for blockiness (default: from `frames`)."""
    options.check()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) < 2:
        raise EvalError("frames must be [T >= 2, H, W, 3] uint8 RGB")
    n_grid = int(np.floor(len(frames) / fps * FACE_FPS + 1e-6))
    src = np.minimum(np.floor(np.arange(n_grid) / FACE_FPS * fps + 1e-6).astype(int), len(frames) - 1)
    sel = scored_index(n_grid, options.max_frames)
    small = analysis_size(frames[src[sel]], options.max_side)
    if native is None:
        native = quality_m.luma(frames[src[sel[np.linspace(0, len(sel) - 1, min(NATIVE_FRAMES, len(sel))).astype(int)]]])
    grid = (lambda: frames[src]) if instructions is not None else None
    out = _score(small, sel, n_grid, wave, reference, instructions, grid, options, native,
                 lambda p, n: frames[src[sel[p:p + n]]])
    if options.dover:  # DOVER samples the given frames at their size (metrics/dover.py)
        from stages.eval.metrics.dover import score_frames as dover_frames

        out.update(dover_frames(frames, options.dover))
    out.update(frames=int(len(frames)), seconds=float(len(frames) / fps), width=int(frames.shape[2]),
               height=int(frames.shape[1]))
    return out


def _score(small: np.ndarray, sel: np.ndarray, n_grid: int, wave: np.ndarray | None, reference: np.ndarray,
           instructions, grid, options: EvalOptions, native: np.ndarray, full=None) -> dict:
    """Scores of the analysis-size frames `small` at the grid positions `sel` of an n_grid-frame
    video; `grid()` gives all grid frames at native size (instruction scoring only); `full(p, n)` the
    frames at positions p .. p + n - 1 of `sel` (one run) at up to native size (SyncNet's face crops)."""
    pieces = runs(sel)
    tracks = [track_face(small[r], small_faces=True) for r in pieces]
    landmarks = np.concatenate([t.landmarks for t in tracks])
    boxes = [b for t in tracks for b in t.boxes]
    found = np.concatenate([t.found[t.detected] for t in tracks])
    ref = analysis_size(reference[None], 2 * options.max_side)[0]

    embedder = identity_m.load_embedder(options.arcface)
    id_pos = np.flatnonzero(sel % options.identity_every == 0)
    ref_found = True
    try:
        ref_box, ref_lm = identity_m.reference_face(ref)
        ref_vec = embedder(ref, ref_box, ref_lm)
        ident = identity_m.identity_curve(small, landmarks, boxes, id_pos, embedder, ref_vec)
    except identity_m.NoReferenceFace:  # e.g. a face dlib cannot find: identity not scored
        ident, ref_found = np.full(len(id_pos), np.nan), False

    hop = int(SAMPLE_RATE / FACE_FPS)
    if options.syncnet:  # SyncNet on face crops cut from the larger frames, around the analysis-size boxes
        net = syncnet_m.load(options.syncnet)
        curves = [syncnet_m.run_curve(net, t.boxes, small.shape[2], lambda a, n, r=r: full(r.start + a, n),
                                      None if wave is None else wave[sel[r.start] * hop:])
                  for t, r in zip(tracks, pieces)]
        sync_out = syncnet_m.sync_fields(curves)
    else:
        waves = [None if wave is None else wave[sel[r.start] * hop:] for r in pieces]
        sync_out = sync_m.sync_fields([sync_m.sync_curve(landmarks[r], w) for r, w in zip(pieces, waves)])
    Y = quality_m.luma(small)
    motion = [quality_m.frame_change(Y[r]) for r in pieces]
    out = {"identity": float(np.nanmean(ident)) if (~np.isnan(ident)).any() else None,
           "identity_embedder": embedder.name, "reference_face": ref_found,
           "face_found": float(found.mean())}
    out.update(sync_out)
    out.update(quality_m.quality(Y, native, boxes))
    out["flicker"] = float(np.concatenate(motion).mean())  # within pieces only
    out["dover"] = NOT_ASSESSED  # with --dover: set by score_video / score_frames from the native frames
    out["drift"] = drift_m.drift({"identity": (ident, sel[id_pos]),
                                  "sharpness": (quality_m.frame_sharpness(Y), sel),
                                  "motion": (np.concatenate(motion), np.concatenate([sel[r][1:] for r in pieces]))},
                                 n_grid, options.drift_segments)
    out["instructions"] = (instructions_m.score_instructions(instructions, grid(), FACE_FPS, options.latency_s,
                                                             options.judge) if instructions is not None else NOT_ASSESSED)
    out.update(fps=FACE_FPS, scored_frames=int(len(sel)))
    return out
