"""`vidu eval --dover PATH` (stages/eval/metrics/dover.py) without DOVER's weights: a stand-in ONNX model
with the inputs and outputs of DOVER's convert_to_onnx.py export (aes_view [1, 3, 32, 224, 224],
tech_view [4, 3, 32, 224, 224]; two outputs, one score per clip) whose scores are known functions of
the views: aesthetic = the mean of the view, technical = its mean |horizontal step| inside the 32 x 32
patches (blur lowers it).
The views are built from a real talking head (../shared/media/talking) and from constant frames."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from stages.eval.metrics import EvalError
from stages.eval.metrics import dover as dover_m
from stages.sense.media import clip_frames, write_video
from stages.eval.video import load_wave
from tests.conftest import cli

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")  # torch.onnx.export writes through it

CLIP = "retalking_5.mp4"  # 524 x 524, 25 fps, 122 frames
PIECE = 50  # frames of the clip scored end to end (2 s)


def stand_in(path, names=("aes_view", "tech_view"), tech=(4, 3, 32, 224, 224)):
    import torch

    class StandIn(torch.nn.Module):
        def forward(self, aes_view, tech_view):
            tiles = tech_view.reshape(*tech_view.shape[:-1], 7, -1)  # steps inside the 32-px patches only
            step = (tiles[..., 1:] - tiles[..., :-1]).abs()
            return [aes_view.mean((1, 2, 3, 4)), step.mean((1, 2, 3, 4))]

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(StandIn(), (torch.zeros(1, 3, 32, 224, 224), torch.zeros(*tech)), str(path),
                      input_names=list(names), dynamo=False)
    return path


def expected(views: dover_m.Views) -> tuple[float, float]:
    """The stand-in's two scores, computed here from the views."""
    x = views.tensors()
    tiles = x["tech_view"].astype(np.float64).reshape(-1, 3, 32, 224, 7, 32)
    return float(x["aes_view"].astype(np.float64).mean()), float(np.abs(np.diff(tiles, axis=-1)).mean())


@pytest.fixture(scope="module")
def media(shared_media, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("dover")
    src = shared_media / "talking" / CLIP
    frames, _ = clip_frames(src, 0, 1e9)  # every frame, native size
    wave = load_wave(src)
    clip = write_video(tmp / "clip.mp4", frames[:PIECE], 25, wave[: PIECE * 640])
    blurred = write_video(tmp / "blurred.mp4", (cv2.GaussianBlur(f, (0, 0), 2.0) for f in frames[:PIECE]), 25)
    ref = tmp / "ref.png"
    cv2.imwrite(str(ref), cv2.cvtColor(frames[0], cv2.COLOR_RGB2BGR))
    return {"src": src, "frames": frames, "clip": clip, "blurred": blurred, "ref": ref, "tmp": tmp,
            "model": stand_in(tmp / "models" / "standin.onnx"),
            "renamed": stand_in(tmp / "renamed.onnx", names=("x", "y")),
            "small": stand_in(tmp / "small.onnx", tech=(4, 3, 32, 112, 112))}


def test_views_of_a_real_clip_have_the_reference_layout(media):
    frames = media["frames"]
    n = len(frames)
    v = dover_m.file_views(media["src"], clips=4)
    assert v.n == n == 122 and v.shape == (524, 524) and v.factor == 1.0
    x = v.tensors()
    assert x["aes_view"].shape == (1, 3, 32, 224, 224) and x["tech_view"].shape == (4, 3, 32, 224, 224)
    assert x["aes_view"].dtype == x["tech_view"].dtype == np.float32
    assert dover_m.file_views(media["src"]).tensors()["tech_view"].shape == (3, 3, 32, 224, 224)  # dover.yml
    # temporal sampling (122 frames): aesthetic one frame from each part of 122 // 32 = 3 frames, at an
    # offset drawn from [0, 3 - 2): the part's first frame
    assert v.aes_index.tolist() == [3 * k for k in range(32)]
    # technical: 4 parts of 30 frames, not longer than 32 * 2, so each clip starts at its part and wraps
    assert v.tech_index.tolist() == [(30 * c + 2 * k) % n for c in range(4) for k in range(32)]
    # fragments: each 32 x 32 tile is a patch of the native frame, copied unresized, inside its grid cell
    cell = 524 // 7
    for k in (5, 96 + 31):  # a frame of clip 0 and the last (wrapped) frame of clip 3
        src, tile = frames[v.tech_index[k]], v.technical[k]
        for i in range(7):
            for j in range(7):
                y, x0 = v.origins[k // 32, i, j]
                assert cell * i <= y < cell * i + cell - 32 and cell * j <= x0 < cell * j + cell - 32
                assert np.array_equal(tile[32 * i:32 * i + 32, 32 * j:32 * j + 32], src[y:y + 32, x0:x0 + 32])
    assert not np.array_equal(v.origins[0], v.origins[1])  # positions drawn per clip
    # the aesthetic view is the whole frame resized (bilinear, no antialiasing: cv2's INTER_LINEAR within 2)
    ref = cv2.resize(frames[v.aes_index[7]], (224, 224), interpolation=cv2.INTER_LINEAR).astype(int)
    assert np.abs(v.aesthetic[7].astype(int) - ref).max() <= 2
    # the same file gives the same views (fixed seed)
    assert np.array_equal(dover_m.file_views(media["src"], clips=4).technical, v.technical)


def test_long_video_offsets_and_seed():
    a, b, c = dover_m.Views(1000, 3), dover_m.Views(1000, 3), dover_m.Views(1000, 3, seed=1)
    assert np.array_equal(a.tech_index, b.tech_index) and not np.array_equal(a.tech_index, c.tech_index)
    starts = a.tech_index[::32]
    assert all(333 * i <= s < 333 * i + 333 - 64 for i, s in enumerate(starts))
    assert (np.diff(a.tech_index.reshape(3, 32), axis=1) == 2).all()
    assert all(31 * i <= s < 31 * i + 29 for i, s in enumerate(a.aes_index))  # 1000 // 32 = 31 per part


def test_constant_colour_normalises_exactly():
    colour = np.array([128, 200, 30], np.uint8)  # R, G, B
    frames = np.broadcast_to(colour, (40, 256, 320, 3)).copy()
    x = dover_m.array_views(frames).tensors()
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    for c in range(3):
        want = np.float32((np.float32(colour[c]) - np.float32(mean[c])) / np.float32(std[c]))
        assert (x["aes_view"][:, c] == want).all() and (x["tech_view"][:, c] == want).all()
    assert x["aes_view"][0, 0, 0, 0, 0] == pytest.approx((128 - 123.675) / 58.395, abs=1e-6)


def test_small_frames_are_upscaled_before_fragments():
    frames = np.random.default_rng(0).integers(0, 256, (40, 160, 200, 3), dtype=np.uint8)
    v = dover_m.array_views(frames, clips=4)
    assert v.factor == pytest.approx(1.4) and v.fragment_shape == (224, 280)
    assert v.tensors()["tech_view"].shape == (4, 3, 32, 224, 224)
    assert (v.origins[..., 0] <= 224 - 32).all() and (v.origins[..., 1] <= 280 - 32).all()


def oracle(a: float, t: float) -> float:
    """fuse_results from the reference constants: technical first, aesthetic second."""
    x = (t - 0.1107) / 0.07355 * 0.6104 + (a + 0.08285) / 0.03774 * 0.3896
    return 1 / (1 + math.exp(-x))


def test_fusion_arithmetic():
    assert dover_m.fuse(-0.08285, 0.1107) == pytest.approx(0.5, abs=1e-12)  # both at their centre
    # a = t = 0: x = -0.1107 / 0.07355 * 0.6104 + 0.08285 / 0.03774 * 0.3896 = -0.918712 + 0.855282
    assert dover_m.fuse(0.0, 0.0) == pytest.approx(1 / (1 + math.exp(0.063430)), abs=1e-6)
    assert dover_m.fuse(0.0, 0.0) == pytest.approx(0.484148, abs=1e-6)
    for a, t in ((0.05, -0.1), (-0.2, 0.3), (0.0, 0.2), (0.2, 0.0)):
        assert dover_m.fuse(a, t) == pytest.approx(oracle(a, t), abs=1e-12)
    assert dover_m.fuse(0.0, 0.2) != pytest.approx(dover_m.fuse(0.2, 0.0))  # the branches are not swapped


def test_cli_end_to_end_and_blurred_copy(media):
    res = cli("eval", "--video", str(media["clip"]), "--reference", str(media["ref"]),
              "--dover", str(media["model"]), "--json")
    s = json.loads(res.stdout)
    a, t = expected(dover_m.file_views(media["clip"], clips=4))
    assert s["dover_model"] == "standin.onnx"
    assert s["dover_aesthetic"] == pytest.approx(a, abs=1e-4) and s["dover_technical"] == pytest.approx(t, abs=1e-4)
    assert s["dover"] == pytest.approx(oracle(s["dover_aesthetic"], s["dover_technical"]), abs=1e-9)
    assert s["sharpness"] > 0 and s["frames"] == PIECE  # the rest of the scores are still there
    # the folder form, and a blurred copy: the same mean, smaller steps inside the fragments
    blur = dover_m.score_file(media["blurred"], str(media["model"].parent))
    assert blur["dover_model"] == "standin.onnx"
    assert blur["dover_technical"] < 0.85 * s["dover_technical"]  # measured 0.70 (sigma 2 px)
    assert blur["dover_aesthetic"] == pytest.approx(s["dover_aesthetic"], abs=0.02)


@pytest.mark.parametrize("which, message", [
    ("missing", "no such file or folder"),
    ("renamed", "renamed.onnx: inputs ['x', 'y'], not ['aes_view', 'tech_view']"),
    ("small", "small.onnx: input tech_view [4, 3, 32, 112, 112]"),
    ("ref", "ref.png: not a loadable ONNX model"),
    ("tmp", "no .onnx file in this folder"),
])
def test_bad_model_is_one_line_and_exit_2(media, which, message):
    (media["tmp"] / "empty").mkdir(exist_ok=True)
    path = {"missing": media["tmp"] / "none.onnx", "tmp": media["tmp"] / "empty"}.get(which, media.get(which))
    res = cli("eval", "--video", str(media["clip"]), "--reference", str(media["ref"]), "--dover", str(path),
              check=False)
    assert res.returncode == 2 and message in res.stderr and f"--dover {path}" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr and res.stdout == ""


def test_without_onnxruntime(media, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    dover_m.load_model.cache_clear()
    with pytest.raises(EvalError, match="onnxruntime is not installed"):
        dover_m.load_model(str(media["model"]))
    dover_m.load_model.cache_clear()
