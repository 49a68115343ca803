"""`vidu filter`: score clips for subject, cleanliness, quality, stability, motion and safety (stages/filter.py)."""
from __future__ import annotations

from typing import Optional

from stages.filter import Filter
from vidu_cli.chain import run_chain
from vidu_cli.options import Executor, From, Quiet, RayAddress, Strict, Workdir, Workers, field_default, option
from vidu_cli.report import clean_errors


def _labels(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def filter(
    from_: From = None,
    sample_fps: float = option(Filter, "sample_fps", "Frames sampled per second of clip."),
    max_side: int = option(Filter, "max_side", "Longer side of the analysed frames (px)."),
    face_upsample: int = option(Filter, "face_upsample", "dlib pyramid upsampling (1: faces down to ~40 px)."),
    subject_detector: Optional[str] = option(Filter, "subject_detector", "Local subject detector: a dlib MMOD/HOG .dat/.svm file or a transformers object-detection folder (default: dlib HOG frontal faces).", show_default=False),
    detector_threshold: float = option(Filter, "detector_threshold", "Box score threshold of a transformers detector."),
    detector_labels: str = option(Filter, "detector_labels", "Comma-separated labels a transformers detector keeps (default: all).", default=",".join(field_default(Filter, "detector_labels"))),
    min_track_ratio: float = option(Filter, "min_track_ratio", "A face track seen in fewer sampled frames is not a subject."),
    min_face_area: float = option(Filter, "min_face_area", "Smallest face box area / frame area, below --max-face-area."),
    max_face_area: float = option(Filter, "max_face_area", "Largest face box area / frame area."),
    min_face_frames: float = option(Filter, "min_face_frames", "Smallest fraction of frames showing the subject's face."),
    max_text_score: float = option(Filter, "max_text_score", "Largest area fraction of fixed text-like strokes."),
    min_sharpness: float = option(Filter, "min_sharpness", "Smallest median variance of the luma Laplacian."),
    min_luma: float = option(Filter, "min_luma", "Darkest mean luma, below --max-luma."),
    max_luma: float = option(Filter, "max_luma", "Brightest mean luma."),
    max_clipped: float = option(Filter, "max_clipped", "Largest fraction of clipped (black or white) pixels."),
    max_blockiness: float = option(Filter, "max_blockiness", "Largest 8x8 block-edge / interior luma step ratio."),
    max_flicker: float = option(Filter, "max_flicker", "Largest relative frame-to-frame luminance jump."),
    max_jitter: float = option(Filter, "max_jitter", "Largest camera shake (RMS high-pass path, frame widths)."),
    max_camera_motion: float = option(Filter, "max_camera_motion", "Largest global motion (frame widths per second)."),
    min_subject_motion: float = option(Filter, "min_subject_motion", "Smallest motion energy in the subject region (luma)."),
    safety_model: Optional[str] = option(Filter, "safety_model", "Local transformers image-classification folder for content safety (default: not assessed).", show_default=False),
    unsafe_labels: str = option(Filter, "unsafe_labels", "Comma-separated labels of the safety model that count as unsafe.", default=",".join(field_default(Filter, "unsafe_labels"))),
    max_unsafe: float = option(Filter, "max_unsafe", "Reject at or above this unsafe probability."),
    omni_model: Optional[str] = option(Filter, "omni_model", "Local vision-language model folder (e.g. Qwen2.5-VL) for JSON labels (default: not assessed).", show_default=False),
    omni_frames: int = option(Filter, "omni_frames", "Frames shown to the omni model."),
    workers: Workers = 1,
    executor: Executor = "local",
    ray_address: RayAddress = None,
    workdir: Workdir = None,
    quiet: Quiet = False,
    strict: Strict = False,
) -> None:
    """Score clips for subject, cleanliness, quality, stability, motion and safety; reject with reasons.

    Example: vidu prefilter raw/ | vidu clip | vidu filter --sample-fps 4 --safety-model models/nsfw-vit
    """
    with clean_errors():
        stage = Filter(
            sample_fps=sample_fps, max_side=max_side, face_upsample=face_upsample, subject_detector=subject_detector,
            detector_threshold=detector_threshold, detector_labels=_labels(detector_labels),
            min_track_ratio=min_track_ratio, min_face_area=min_face_area, max_face_area=max_face_area,
            min_face_frames=min_face_frames, max_text_score=max_text_score, min_sharpness=min_sharpness,
            min_luma=min_luma, max_luma=max_luma, max_clipped=max_clipped, max_blockiness=max_blockiness,
            max_flicker=max_flicker, max_jitter=max_jitter, max_camera_motion=max_camera_motion,
            min_subject_motion=min_subject_motion, safety_model=safety_model, unsafe_labels=_labels(unsafe_labels),
            max_unsafe=max_unsafe, omni_model=omni_model, omni_frames=omni_frames)
        stage.check()
        run_chain(stage, from_, workdir, workers, quiet, strict, executor, ray_address)
