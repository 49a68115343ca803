"""vidu filter: exact checks of the building blocks, then the stage on real media (../shared/media)
and on altered copies of a real talking clip (burned-in text, blur, shake, a frozen frame)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from manifests.io import read_manifest, to_table, workspace, write_table
from stages.sense.faces import model_file
from stages.filter import (OMNI_KEYS, OMNI_PROMPT, Filter, blockiness, box_iou, global_motion, nms, parse_omni, phase_shift,
                           subject_measures, _hann)
from stages.sense.media import clip_frames
from stages.run import base_row, run_stage
from stages.sense.media import write_video
from tests.conftest import cli

FPS = 2.0  # sampling rate of the tests (the CLI default is 4)


# ---- building blocks, exact inputs ------------------------------------------------------------

def test_one_spurious_detection_is_not_a_second_subject():
    # 20 frames with one face drifting right; frame 7 also has a box elsewhere (cf. retalking_3)
    dets = [[(100 + 2 * t, 50, 200 + 2 * t, 150)] for t in range(20)]
    dets[7].append((300, 300, 340, 340))
    m = subject_measures(dets, 400, 400, min_track_ratio=0.25)
    assert (m["subject_count"], m["face_tracks"], m["face_frame_ratio"]) == (1, 2, 1.0)
    assert m["face_area_ratio"] == pytest.approx(100 * 100 / 400 ** 2)
    assert m["face_box"] == pytest.approx([119 / 400, 50 / 400, 219 / 400, 150 / 400])
    two = [[(0, 0, 50, 50), (200, 200, 260, 260)] for _ in range(10)]  # two faces in every frame
    assert subject_measures(two, 400, 400, 0.25)["subject_count"] == 2


def test_iou_and_nms_on_exact_boxes():
    a, b, c = (0, 0, 10, 10), (5, 0, 15, 10), (100, 100, 110, 110)
    assert box_iou([a], [b, c, a])[0] == pytest.approx([50 / 150, 0.0, 1.0])
    assert box_iou([], [a]).shape == (0, 1)
    # b overlaps a by 1/3: dropped at max_iou 0.3, kept at 0.5; the best-scored box comes first
    assert nms([(a, 0.5), (b, 0.9), (c, 0.1)], max_iou=0.3) == [b, c]
    assert nms([(a, 0.5), (b, 0.9), (c, 0.1)], max_iou=0.5) == [b, a, c]
    assert nms([]) == []


def test_phase_correlation_recovers_a_translation():
    rng = np.random.default_rng(0)
    a = np.asarray(Image.fromarray((rng.random((96, 128)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1)),
                   np.float32) / 255
    b = np.roll(a, (3, -5), axis=(0, 1))
    assert phase_shift(a, b, _hann(96, 128)) == pytest.approx((3.0, -5.0), abs=0.05)
    assert phase_shift(a, a, _hann(96, 128)) == pytest.approx((0.0, 0.0), abs=0.01)
    flat = np.zeros_like(a)
    assert phase_shift(flat, flat, _hann(96, 128)) == (0.0, 0.0)  # no signal: no shift, not half the tile
    # tiles: a subject region moving on its own does not change the background's zero motion
    c = a.copy()
    c[20:80, 40:90] = np.roll(a, 7, axis=1)[20:80, 40:90]
    assert global_motion(np.stack([a, c]), (slice(20, 80), slice(40, 90)))[0] == pytest.approx((0, 0), abs=0.05)


def test_blockiness_sees_8x8_blocks():
    rng = np.random.default_rng(1)
    smooth = np.asarray(Image.fromarray((rng.random((61, 61)) * 255).astype(np.uint8)).resize((256, 256),
                                                                                              Image.BICUBIC), np.float32) / 255
    blocks = smooth.reshape(32, 8, 32, 8).mean(axis=(1, 3)).repeat(8, 0).repeat(8, 1)
    blocks = blocks + 0.01 * rng.standard_normal(blocks.shape).astype(np.float32)  # detail inside blocks
    assert blockiness(smooth[None]) == pytest.approx(1.0, abs=0.1)
    assert blockiness(blocks[None]) > 3


def test_omni_answers_are_parsed_robustly():
    status, labels = parse_omni('Sure!\n```json\n{"editing": "none", "subject": "one woman", "action": ["talks", '
                                '"nods"], "Emotion": "calm", "shot": "medium close-up, static"}\n```')
    assert status == "assessed"
    assert labels["editing"] == "none" and labels["action"] == "talks, nods" and labels["emotion"] == "calm"
    assert labels["tone"] is None
    status, labels = parse_omni("subject: a man\n- scene: 'studio'\nspeech = yes")
    assert status == "assessed" and (labels["subject"], labels["scene"], labels["speech"]) == ("a man", "studio", "yes")
    assert parse_omni("I cannot tell. {not json")[0] == "unparsable"


# ---- the stage on real media -------------------------------------------------------------------

def _clip_row(path: Path, start: float, end: float) -> dict:
    return base_row("clips", id=f"{path.stem}_{int(start * 100)}", parent_id=path.stem, video_path=str(path),
                    clip_index=0, shot_index=0, start_s=start, end_s=end, start_frame=0, end_frame=0, fps=25.0,
                    duration_s=end - start)


def _duration(path: Path) -> float:
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return float(v.duration * v.time_base)


def _with_text(f: np.ndarray) -> np.ndarray:
    im = Image.fromarray(f)
    d = ImageDraw.Draw(im)
    H, W = f.shape[:2]
    d.rectangle([int(W * .1), int(H * .82), int(W * .9), int(H * .95)], fill=(0, 0, 0))
    d.text((int(W * .13), int(H * .84)), "SUBSCRIBE NOW - breaking news 24/7", fill=(255, 255, 255), font_size=20)
    return np.asarray(im)


@pytest.fixture(scope="module")
def variants(shared_media, tmp_path_factory) -> Path:
    """The first 4 s of retalking_1 (22 fps) at 480 px written at 25 fps (3.5 s), and copies: burned-in text box, Gaussian blur,
    random per-frame shake (crop offset up to 32 px), one frame frozen."""
    d = tmp_path_factory.mktemp("variants")
    frames, _ = clip_frames(shared_media / "talking" / "retalking_1.mp4", 0.0, 4.0, None, 480)
    rng = np.random.default_rng(0)
    H, W, m = frames.shape[1], frames.shape[2], 16
    offsets = rng.integers(0, 2 * m + 1, (len(frames), 2))
    write_video(d / "orig.mp4", frames, 25)
    write_video(d / "text.mp4", (_with_text(f) for f in frames), 25)
    write_video(d / "blur.mp4", (np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(3))) for f in frames), 25)
    write_video(d / "shake.mp4", (np.ascontiguousarray(f[y:y + H - 2 * m, x:x + W - 2 * m])
                                  for f, (y, x) in zip(frames, offsets)), 25)
    write_video(d / "frozen.mp4", (frames[0] for _ in frames), 25)
    return d


@pytest.fixture(scope="module")
def rows(shared_media, variants, tmp_path_factory) -> dict[str, dict]:
    """One run of the stage (through the runner, so the rows pass the pinned schema) over whole
    files, and one shot of big_buck_bunny as `vidu clip` cuts it (1.29-5.79 s)."""
    files = sorted((shared_media / "talking").glob("retalking_*.mp4")) + [shared_media / "scenes" / "chaplin.mp4"]
    files += sorted(variants.glob("*.mp4"))
    items = [_clip_row(p, 0.0, _duration(p)) for p in files]
    items.append(_clip_row(shared_media / "scenes" / "big_buck_bunny_0_30.webm", 1.29, 5.79))
    root = workspace(tmp_path_factory.mktemp("work"))
    result = run_stage(Filter(sample_fps=FPS), items, ["test"], ["test"], root, quiet=True)
    table, meta = read_manifest(result.path)
    assert meta["kind"] == "filtered"
    return {r["id"].rsplit("_", 1)[0]: r for r in table.to_pylist()}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_retalking_clips_have_one_moving_subject(rows, n):
    r = rows[f"retalking_{n}"]
    assert r["status"] == "ok" and r["reasons"] == [], r
    assert (r["subject_count"], r["face_tracks"]) == (1, 1)
    assert r["face_frame_ratio"] >= 0.9 and 0.05 < r["face_area_ratio"] < 0.3
    x0, y0, x1, y1 = r["face_box"]
    assert 0 < x0 < x1 < 1 and 0 < y0 < y1 < 1 and abs((x0 + x1) / 2 - 0.5) < 0.2  # centred talking head
    assert r["subject_motion"] > 2 * Filter.min_subject_motion
    assert r["camera_motion"] < Filter.max_camera_motion and r["jitter"] < Filter.max_jitter
    assert r["text_score"] == 0.0 and r["subject_detector"] == "dlib-hog-frontal"
    assert (r["safety_status"], r["safety_score"], r["omni_status"]) == ("not_assessed", None, "not_assessed")
    assert r["frames_sampled"] == pytest.approx(FPS * r["duration_s"], abs=1)


def test_chaplin_has_no_reliable_subject(rows):
    # a full-body two-shot: the faces are ~30 px at 480 px; dlib sees the tramp's face (facing the
    # camera) in a few frames only, and never the policeman's (turned away, under his helmet)
    r = rows["chaplin"]
    assert r["status"] == "rejected"
    assert r["subject_count"] == 0 and r["face_tracks"] >= 1 and r["face_frame_ratio"] < 0.25
    assert {"no_subject", "face_too_small"} <= set(r["reasons"]) and r["face_area_ratio"] < 0.02
    assert r["subject_motion"] is None and "burned_in_text" not in r["reasons"]


def test_big_buck_bunny_has_no_subject(rows):
    r = rows["big_buck_bunny_0_30"]
    assert r["status"] == "rejected" and r["reasons"] == ["no_subject"]
    assert (r["subject_count"], r["face_tracks"], r["face_box"]) == (0, 0, None)


def test_burned_in_text_is_flagged(rows):
    orig, text = rows["orig"], rows["text"]
    assert orig["status"] == "ok" and orig["text_score"] == 0.0
    assert "burned_in_text" in text["reasons"] and text["text_score"] > 0.01
    assert text["static_overlay_ratio"] > orig["static_overlay_ratio"]
    assert text["subject_count"] == 1


def test_blur_and_shake_score_worse(rows):
    orig, blur, shake = rows["orig"], rows["blur"], rows["shake"]
    assert blur["sharpness"] < 0.5 * orig["sharpness"] and "blurry" in blur["reasons"]
    assert shake["jitter"] > 10 * orig["jitter"] and "shaky" in shake["reasons"]
    assert orig["jitter"] < 0.1 * Filter.max_jitter


def test_frozen_subject_is_static(rows):
    r = rows["frozen"]
    assert r["subject_count"] == 1 and r["subject_motion"] < 0.2 * rows["orig"]["subject_motion"]
    assert r["reasons"] == ["static_subject"]


# ---- local models ------------------------------------------------------------------------------

def _tiny_vit(path: Path, labels: dict[int, str]) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, id2label=labels, label2id={v: k for k, v in labels.items()})
    ViTForImageClassification(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_safety_model_from_a_local_directory(variants, tmp_path):
    vit = _tiny_vit(tmp_path / "vit", {0: "normal", 1: "NSFW", 2: "drawing"})
    stage = Filter(sample_fps=1.0, safety_model=str(vit))
    stage.check()
    stage.setup()
    r = stage.process(_clip_row(variants / "orig.mp4", 0.0, 3.0))
    assert r["safety_status"] == "assessed" and 0 <= r["safety_score"] <= 1 and r["safety_label"] == "NSFW"
    assert ("unsafe" in r["reasons"]) == (r["safety_score"] >= 0.5)
    assert "unsafe" in Filter(max_unsafe=0.0).reasons(r)
    with pytest.raises(ValueError, match="none of its labels"):
        Filter(safety_model=str(vit), unsafe_labels=("violence",)).check()


def test_mmod_subject_detector_file(variants):
    mmod = model_file("mmod_human_face_detector.dat")
    stage = Filter(sample_fps=1.0, face_upsample=0, subject_detector=str(mmod))
    stage.check()
    stage.setup()
    r = stage.process(_clip_row(variants / "orig.mp4", 0.0, 2.0))
    assert r["subject_detector"] == f"dlib-mmod:{mmod}" and r["frames_sampled"] == 2
    assert r["subject_count"] == 1 and r["face_frame_ratio"] == 1.0 and 0.05 < r["face_area_ratio"] < 0.3


def test_transformers_subject_detector_directory(variants, tmp_path):
    import torch
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    torch.manual_seed(0)
    labels = {0: "face", 1: "car"}
    cfg = YolosConfig(image_size=[64, 64], patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, num_detection_tokens=4, id2label=labels,
                      label2id={v: k for k, v in labels.items()})
    YolosForObjectDetection(cfg).save_pretrained(tmp_path / "yolos")
    YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(tmp_path / "yolos")
    item = _clip_row(variants / "orig.mp4", 0.0, 2.0)
    stage = Filter(sample_fps=1.0, subject_detector=str(tmp_path / "yolos"), detector_threshold=0.0)
    stage.check()
    stage.setup()
    r = stage.process(item)
    assert r["subject_detector"] == f"transformers:{tmp_path / 'yolos'}" and r["frames_sampled"] == 2
    assert r["face_tracks"] >= 1 and all(0 <= v <= 1 for v in r["face_box"])  # random boxes, in the frame
    none = Filter(sample_fps=1.0, subject_detector=str(tmp_path / "yolos"), detector_threshold=0.0,
                  detector_labels=("person",))
    none.setup()
    r = none.process(item)
    assert (r["face_tracks"], r["subject_count"]) == (0, 0) and "no_subject" in r["reasons"]


def test_omni_model_from_a_local_directory(variants, tiny_vlm):
    stage = Filter(sample_fps=1.0, omni_model=str(tiny_vlm), omni_frames=2, omni_max_tokens=8)
    stage.check()
    stage.setup()
    answer = stage._omni_model(clip_frames(variants / "orig.mp4", 0.0, 2.0, 1.0, 480)[0], OMNI_PROMPT)
    assert isinstance(answer, str) and answer.strip()  # decoded (random) words
    r = stage.process(_clip_row(variants / "orig.mp4", 0.0, 2.0))
    assert r["omni_status"] == parse_omni(answer)[0] == "unparsable"
    assert all(r[f"omni_{k}"] is None for k in OMNI_KEYS)


@pytest.mark.parametrize("option,path,error,message", [
    ("safety_model", "/nonexistent/model", FileNotFoundError, "no such file or directory"),
    ("omni_model", "/nonexistent/vlm", FileNotFoundError, "no such file or directory"),
    ("subject_detector", "/nonexistent/det.dat", FileNotFoundError, "no such file or directory"),
    ("subject_detector", "NOTES", ValueError, "neither a dlib MMOD nor a dlib HOG detector file"),
    ("omni_model", "DIR", ValueError, "not a transformers model directory"),
])
def test_bad_model_paths_fail_fast(tmp_path, option, path, error, message):
    (tmp_path / "notes.txt").write_text("hello\n")
    path = {"NOTES": str(tmp_path / "notes.txt"), "DIR": str(tmp_path)}.get(path, path)
    with pytest.raises(error, match=message):
        Filter(**{option: path}).check()


# ---- the CLI -----------------------------------------------------------------------------------

def test_cli_filter(variants, tmp_path):
    clips = tmp_path / "clips.parquet"
    items = [_clip_row(variants / f"{name}.mp4", 0.0, 3.0) for name in ("orig", "text")]
    write_table(to_table(items, "clips"), clips, {"kind": "clips"})
    out = cli("filter", "--from", str(clips), "--sample-fps", str(FPS), "--workdir", str(tmp_path / "work"))
    table, meta = read_manifest(out.stdout.strip())
    assert meta["kind"] == "filtered" and "burned_in_text 1" in out.stderr
    got = {r["id"]: r for r in table.to_pylist()}
    assert list(got) == [r["id"] for r in items]  # 1:1, same ids, input order
    orig, text = got[items[0]["id"]], got[items[1]["id"]]
    assert orig["status"] == "ok" and text["reasons"] == ["burned_in_text"]
    assert (orig["safety_status"], orig["omni_status"]) == ("not_assessed", "not_assessed")
    bad = cli("filter", "--from", str(clips), "--omni-model", str(tmp_path / "missing"), check=False, cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "--omni-model" in bad.stderr and "no such file or directory" in bad.stderr
