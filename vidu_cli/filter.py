from __future__ import annotations

from typing import Annotated, Optional

import typer

from stages.filter import Filter
from vidu_cli.chain import run_chain
from vidu_cli.options import Executor, From, Quiet, RayAddress, Strict, Workdir, Workers
from vidu_cli.report import clean_errors

_D = Filter()  # defaults live on the stage


def _labels(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def filter(
    from_: From = None,
    sample_fps: Annotated[float, typer.Option(min=0.1, help="Frames sampled per second of clip.")] = _D.sample_fps,
    max_side: Annotated[int, typer.Option(min=64, help="Longer side of the analysed frames (px).")] = _D.max_side,
    face_upsample: Annotated[int, typer.Option(min=0, max=3, help="dlib pyramid upsampling (1: faces down to ~40 px).")] = _D.face_upsample,
    subject_detector: Annotated[Optional[str], typer.Option(help="Local subject detector: a dlib MMOD/HOG .dat/.svm file or a transformers object-detection folder (default: dlib HOG frontal faces).", show_default=False)] = None,
    detector_threshold: Annotated[float, typer.Option(help="Box score threshold of a transformers detector.")] = _D.detector_threshold,
    detector_labels: Annotated[str, typer.Option(help="Comma-separated labels a transformers detector keeps (default: all).")] = "",
    min_track_ratio: Annotated[float, typer.Option(help="A face track seen in fewer sampled frames is not a subject.")] = _D.min_track_ratio,
    min_face_area: Annotated[float, typer.Option(help="Smallest face box area / frame area.")] = _D.min_face_area,
    max_face_area: Annotated[float, typer.Option(help="Largest face box area / frame area.")] = _D.max_face_area,
    min_face_frames: Annotated[float, typer.Option(help="Smallest fraction of frames showing the subject's face.")] = _D.min_face_frames,
    max_text_score: Annotated[float, typer.Option(help="Largest area fraction of fixed text-like strokes.")] = _D.max_text_score,
    min_sharpness: Annotated[float, typer.Option(help="Smallest median variance of the luma Laplacian.")] = _D.min_sharpness,
    min_luma: Annotated[float, typer.Option(help="Darkest mean luma (0-1).")] = _D.min_luma,
    max_luma: Annotated[float, typer.Option(help="Brightest mean luma (0-1).")] = _D.max_luma,
    max_clipped: Annotated[float, typer.Option(help="Largest fraction of clipped (black or white) pixels.")] = _D.max_clipped,
    max_blockiness: Annotated[float, typer.Option(help="Largest 8x8 block-edge / interior luma step ratio.")] = _D.max_blockiness,
    max_flicker: Annotated[float, typer.Option(help="Largest relative frame-to-frame luminance jump.")] = _D.max_flicker,
    max_jitter: Annotated[float, typer.Option(help="Largest camera shake (RMS high-pass path, frame widths).")] = _D.max_jitter,
    max_camera_motion: Annotated[float, typer.Option(help="Largest global motion (frame widths per second).")] = _D.max_camera_motion,
    min_subject_motion: Annotated[float, typer.Option(help="Smallest motion energy in the subject region (luma).")] = _D.min_subject_motion,
    safety_model: Annotated[Optional[str], typer.Option(help="Local transformers image-classification folder for content safety (default: not assessed).", show_default=False)] = None,
    unsafe_labels: Annotated[str, typer.Option(help="Comma-separated labels of the safety model that count as unsafe.")] = ",".join(_D.unsafe_labels),
    max_unsafe: Annotated[float, typer.Option(help="Reject at or above this unsafe probability.")] = _D.max_unsafe,
    omni_model: Annotated[Optional[str], typer.Option(help="Local vision-language model folder (e.g. Qwen2.5-VL) for JSON labels (default: not assessed).", show_default=False)] = None,
    omni_frames: Annotated[int, typer.Option(min=1, help="Frames shown to the omni model.")] = _D.omni_frames,
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
