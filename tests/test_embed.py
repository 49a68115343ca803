"""`vidu embed` on real talking-head clips (retalking_1 at 22.1 fps, retalking_4 at 30 fps, both
resampled to 25 fps): exact shapes and dtypes, a shard frame against an independent decode + crop +
resize, the face-centred crop, too-short clips, VAE / TAEHV latents and umT5 text from tiny random
models in the distributed layouts, atomic re-writes, and training on the samples manifest. Per-chunk
text with onsets: `vidu caption`'s speech-chunk captions of a real clip and `vidu synth`'s timed
instructions land on the latent frame the onset rule names (an independent arithmetic oracle), and
moving an onset by one latent frame moves the text by one frame."""
from __future__ import annotations

import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from manifests.io import read_manifest, to_table, workspace, write_table
from stages.sense import faces
from stages.embed import Embed, crop_window, sample_config, window_starts
from stages.samples import read_sample
from stages.run import base_row, run_stage
from tests.conftest import cli

CAPTION = "a woman speaks to the camera"
ZOOM = 1.5


def source_frame(path: Path, t: float) -> np.ndarray:
    """Oracle: the frame on screen at `t` (the last with pts <= t), decoded from the file's start."""
    shown = None
    with av.open(str(path)) as c:
        for f in c.decode(c.streams.video[0]):
            if shown is not None and float(f.time) > t + 1e-6:
                break
            shown = f.to_ndarray(format="rgb24")
    return shown


def face_box(path: Path, t: float) -> list[float]:
    rgb = source_frame(path, t)
    H, W = rgb.shape[:2]
    x0, y0, x1, y1 = faces.detect(rgb)[0].box
    return [x0 / W, y0 / H, x1 / W, y1 / H]


@pytest.fixture(scope="module")
def rows(shared_media) -> list[dict]:
    talk = shared_media / "talking"
    r1, r4, r2 = (str(talk / f"retalking_{i}.mp4") for i in (1, 4, 2))
    common = dict(clip_index=0, shot_index=0, start_frame=0, end_frame=1, fps=25.0, duration_s=1.0)
    return [
        base_row("captioned", id="r1_0000", video_path=r1, start_s=0.5, end_s=3.0, **common,
                 face_box=face_box(talk / "retalking_1.mp4", 1.0), caption=CAPTION, caption_source="measured",
                 speech_segments=[{"start": 0.2, "end": 1.0}]),
        base_row("captioned", id="r4_0000", video_path=r4, start_s=0.0, end_s=2.1, **common),
        base_row("captioned", id="r2_0000", video_path=r2, start_s=1.0, end_s=1.5, **common),
    ]


@pytest.fixture(scope="module")
def captioned(rows, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("in") / "captioned.parquet"
    return write_table(to_table(rows, "captioned"), path, {"kind": "captioned"})


@pytest.fixture(scope="module")
def embedded(captioned, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    work = tmp_path_factory.mktemp("work")
    res = cli("embed", "--from", str(captioned), "--preset", "tiny", "--zoom", str(ZOOM), "--max-windows", "2",
              "--workdir", str(work), "-q")
    manifest = Path(res.stdout.strip().splitlines()[-1])
    table, meta = read_manifest(manifest)
    assert meta["kind"] == "samples"
    return manifest, {r["id"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def umt5(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel
    from models.encoders import minilm_path
    d = tmp_path_factory.mktemp("umt5")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                relative_attention_num_buckets=8)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_windows_fit_the_clip():
    assert window_starts(0.5, 3.0, 17, 25.0) == pytest.approx([0.5, 1.18, 1.86])  # 62.5 frames -> 3 x 17
    assert window_starts(0.0, 0.68, 17, 25.0) == [0.0] and window_starts(0.0, 0.67, 17, 25.0) == []
    assert len(window_starts(0.0, 60.0, 81, 25.0, max_windows=4)) == 4


def test_geometry_overrides():
    cfg = sample_config("tiny", height=128, width=224, frames=33, fps=30)
    assert (cfg.video_frames, cfg.latent_frames, cfg.height, cfg.width, cfg.audio.fps) == (33, 9, 128, 224, 30)
    assert cfg.dit == sample_config("tiny").dit
    for bad, message in ((dict(frames=18), "1 \\+ 4k"), (dict(height=100), "multiple of 16"), (dict(fps=0), "whole")):
        with pytest.raises(ValueError, match=message):
            sample_config("tiny", **bad)


def test_crop_window_arithmetic():
    # square 700 px source, square output, zoom 1.5: a 467 px window centred on the face, clamped
    assert crop_window(700, 700, 64, 64, [0.4, 0.25, 0.7, 0.5], 1.5) == (152, 29, 619, 496)
    assert crop_window(700, 700, 64, 64, [0.8, 0.0, 1.0, 0.1], 1.5) == (233, 0, 700, 467)
    assert crop_window(700, 700, 64, 64, None, 1.5) == (117, 117, 584, 584)
    # 16:9 source to 832x480: full height, 832 * 1080 / 480 = 1872 px wide, centred
    assert crop_window(1920, 1080, 832, 480) == (24, 0, 1896, 1080)


def test_samples_shapes_dtypes_and_columns(embedded, rows):
    _, got = embedded
    from models.config import PRESETS
    ok = {k: r for k, r in got.items() if r["status"] == "ok"}
    assert sorted(ok) == ["r1_0000_s000", "r1_0000_s001", "r4_0000_s000", "r4_0000_s001"]
    before, after = PRESETS["tiny"].dit.audio_context
    A = before + 5 + after                                       # latent frames of speech features with context
    for r in ok.values():
        t = read_sample(r)
        assert t["video"].dtype == torch.uint8 and tuple(t["video"].shape) == (17, 64, 64, 3)
        assert t["audio"].dtype == torch.float32 and tuple(t["audio"].shape) == (A, 16, 80)  # [F+ctx, mel/latent, mels]
        assert t["wave"].dtype == torch.float32 and tuple(t["wave"].shape) == (17 * 640,)
        assert t["text"].dtype == torch.float32 and t["text"].shape[1] == 384
        assert r["latent_kind"] == "frames" and r["latent_shape"] == [17, 64, 64, 3]
        assert r["audio_shape"] == [A, 16, 80] and r["text_shape"] == list(t["text"].shape)
        assert (r["frames"], r["height"], r["width"], r["fps"]) == (17, 64, 64, 25.0)
        assert r["end_s"] - r["start_s"] == pytest.approx(0.68) and r["text_encoder"] == "minilm"
        assert float(t["wave"].abs().max()) > 0.01                                  # speech, not padding
    a, b = ok["r1_0000_s000"], ok["r4_0000_s001"]
    assert a["start_s"] == 0.5 and b["start_s"] == pytest.approx(0.68)
    assert a["text"] == CAPTION and a["text_source"] == "caption" and a["caption_source"] == "measured"
    assert tuple(read_sample(a)["text"].shape) == (8, 384)       # [CLS] a woman speaks to the camera [SEP]
    assert b["text_source"] == "neutral" and b["text"] == "a person talking to the camera"
    assert a["speech_coverage"] == pytest.approx(0.5 / 0.68) and b["speech_coverage"] is None
    assert a["crop_center"] == "face" and b["crop_center"] == "frame"
    assert b["crop_box"] == [117.0, 117.0, 584.0, 584.0]                       # 700 px, centred, zoom 1.5
    # 22.1 fps source repeats frames to reach 25 fps; the 30 fps one drops them
    assert a["source_fps"] == pytest.approx(22.13, abs=0.3) and a["repeated_frames"] >= 2
    assert b["source_fps"] == pytest.approx(30.0, abs=0.05) and b["repeated_frames"] == 0
    wave = read_sample(a)["wave"]
    from stages.sense.media import load_audio
    full = load_audio(rows[0]["video_path"])
    assert torch.equal(wave, torch.from_numpy(full[8000:8000 + 10880]))          # 0.5 s at 16 kHz
    # the features hear the clip's continuation after the window (1.18 s + context < the clip's 3.0 s end)
    from models.audio import audio_features
    want = audio_features(torch.from_numpy(full[8000:]), 5, PRESETS["tiny"].audio, context=(before, after))
    assert torch.allclose(read_sample(a)["audio"], want, atol=1e-6)
    if after:
        cut = audio_features(wave, 5, PRESETS["tiny"].audio, context=(before, after))
        assert not torch.allclose(read_sample(a)["audio"][-after:], cut[-after:], atol=1e-3)


def test_too_short_clip_is_rejected(embedded):
    _, got = embedded
    r = got["r2_0000"]
    assert r["status"] == "rejected" and r["reasons"] == ["too_short"] and r["shard"] is None


def face_crop(row: dict, t: float) -> tuple[torch.Tensor, list]:
    """Oracle: the frame of `row`'s video at `t`, cut around its face box at ZOOM and resized to 64 px
    ([64, 64, 3] float), and the crop box."""
    src = source_frame(Path(row["video_path"]), t)
    H, W = src.shape[:2]
    fb = row["face_box"]
    side = round(W / ZOOM)
    x0 = min(max(math.floor((fb[0] + fb[2]) / 2 * W - side / 2 + 0.5), 0), W - side)
    y0 = min(max(math.floor((fb[1] + fb[3]) / 2 * H - side / 2 + 0.5), 0), H - side)
    crop = torch.from_numpy(src[y0:y0 + side, x0:x0 + side]).permute(2, 0, 1)[None].float()
    want = F.interpolate(crop, size=(64, 64), mode="bicubic", antialias=True, align_corners=False)
    return want.round().clamp(0, 255)[0].permute(1, 2, 0), [x0, y0, x0 + side, y0 + side]


def test_shard_frame_equals_an_independent_crop_and_resize(embedded, rows):
    _, got = embedded
    r = got["r1_0000_s001"]
    k = 9
    want, box = face_crop(rows[0], r["start_s"] + k / 25.0)
    assert r["crop_box"] == box
    frame = read_sample(r)["video"][k].float()
    diff = (frame - want).abs()
    assert float(diff.mean()) < 0.25 and float(diff.max()) <= 2, (float(diff.mean()), float(diff.max()))
    other = read_sample(r)["video"][k - 4].float()
    assert float((other - want).abs().mean()) > 2 * float(diff.mean())        # the oracle tells frames apart


def test_the_reference_is_a_frame_of_the_clip_away_from_its_window(embedded, rows):
    """A window's reference frame is the frame at `reference_time` (the middle of the clip's longer
    stretch outside the window; a clip of one window: its last frame), cut as the window is, never the
    window's first frame; training reads it as the clip's reference."""
    from stages.samples import reference_time
    from stages.train.data import read_sample_clip
    assert reference_time(0.5, 3.0, 0.5, 17, 25.0) == pytest.approx(1.18 + 1.82 / 2)     # after the window
    assert reference_time(0.0, 2.0, 1.0, 17, 25.0) == pytest.approx(0.5)                 # before it: 1.0 > 0.32 s
    assert reference_time(0.0, 0.68, 0.0, 17, 25.0) == pytest.approx(0.64)               # one window: its last frame
    _, got = embedded
    for sid, ref_s in (("r1_0000_s000", 2.09), ("r1_0000_s001", 1.86 + 1.14 / 2)):
        r = got[sid]
        t = read_sample(r)
        assert r["ref_s"] == pytest.approx(ref_s)
        assert t["ref_frame"].dtype == torch.uint8 and tuple(t["ref_frame"].shape) == (64, 64, 3)
        want, box = face_crop(rows[0], ref_s)
        diff = (t["ref_frame"].float() - want).abs()
        assert box == r["crop_box"] and float(diff.mean()) < 0.25 and float(diff.max()) <= 2, sid
        first = (t["video"][0].float() - want).abs()
        assert float(first.mean()) > 4 * float(diff.mean()) + 0.5, sid                  # not the window's first frame
        assert np.array_equal(read_sample_clip(r)["ref"], t["ref_frame"].numpy())


def test_face_centred_crop_holds_the_face(rows, umt5, tmp_path):
    # 2:1 output from a square source: the crop is the full width and half the height, so only
    # centring on the face (retalking_1's face is in the upper half) keeps it whole
    stage = Embed(out=str(tmp_path), preset="tiny", height=192, width=384, max_windows=1, text_encoder="umt5",
                  text_model=str(umt5))
    stage.setup()
    row = rows[0]
    (s,) = stage.process(row)
    W = H = 700
    fb = np.array(row["face_box"]) * [W, H, W, H]
    x0, y0, x1, y1 = s["crop_box"]
    assert x0 <= fb[0] and y0 <= fb[1] and fb[2] <= x1 and fb[3] <= y1 and (x1 - x0, y1 - y0) == (700, 350)
    frame = read_sample(s)["video"][0].numpy()
    found = faces.detect(frame)
    assert found, "no face in the face-centred crop"
    fx0, fy0, fx1, fy1 = found[0].box
    assert abs((fy0 + fy1) / 2 - 96) < 192 * 0.1                                   # vertically centred
    (c,) = stage.process({**row, "id": "centre", "face_box": None})
    assert c["crop_center"] == "frame" and c["crop_box"][1] == 175.0 > fb[1]        # centre crop cuts the face
    assert s["text_encoder"] == f"umt5:{umt5}" and s["text_shape"] == [8, 32]


def _pth(sd: dict, path: Path, half: bool = False) -> Path:
    torch.save({k: v.half() if half else v for k, v in sd.items()}, path)
    return path


def test_vae_and_taehv_latents_and_training_on_them(captioned, embedded, umt5, tmp_path):
    from models.checkpoint import load_taehv, load_vae
    from models.config import PRESETS
    from models.taehv import TAEHV
    from models.wan_vae import WanVAE
    from stages.samples import to_video
    from stages.train.loop import TrainSettings, train
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    vae_path = _pth(WanVAE(cfg.vae).state_dict(), tmp_path / "Wan2.1_VAE.pth")
    tae_path = _pth(TAEHV().state_dict(), tmp_path / "taew2_1.pth", half=True)     # fp16, as distributed
    frames_row = embedded[1]["r1_0000_s000"]
    frames, ref = (read_sample(frames_row)[k].numpy() for k in ("video", "ref_frame"))
    table, _ = read_manifest(captioned)
    items = [r for r in table.to_pylist() if r["id"] == "r1_0000"]
    root = workspace(tmp_path / "work")
    vae, tae = load_vae(vae_path, cfg.vae), load_taehv(tae_path)
    for kind, stage in (("wan_vae", Embed(out=str(tmp_path / "vae"), zoom=ZOOM, max_windows=2, vae=str(vae_path))),
                        ("taehv", Embed(out=str(tmp_path / "tae"), zoom=ZOOM, max_windows=2, taehv=str(tae_path),
                                        text_encoder="umt5", text_model=str(umt5)))):
        result = run_stage(stage, items, [kind], ["test"], root)
        rows = {r["id"]: r for r in read_manifest(result.path)[0].to_pylist()}
        r = rows["r1_0000_s000"]
        t = read_sample(r)
        assert r["latent_kind"] == kind and r["latent_shape"] == [16, 5, 8, 8] == list(t["video"].shape)
        assert tuple(t["ref"].shape) == (16, 1, 8, 8) and t["video"].dtype == torch.float32
        with torch.no_grad():
            if kind == "wan_vae":
                want, want_ref = vae.encode(to_video(frames))[0], vae.encode(to_video(ref[None]))[0]
            else:
                want, want_ref = (tae.encode_video(torch.from_numpy(x).permute(0, 3, 1, 2)[None].float() / 255)[0]
                                  .permute(1, 0, 2, 3) for x in (frames, ref[None]))
        assert torch.allclose(t["video"], want, atol=1e-5)                         # latents of the same frames
        assert torch.allclose(t["ref"], want_ref, atol=1e-5)                       # and of the reference frame
        assert float((t["ref"] - t["video"][:, :1]).abs().max()) > 1e-4              # not the first frame's
        if kind == "wan_vae":
            summary = train(TrainSettings(stage="bidirectional", preset="tiny", steps=2, batch=2, save_every=2,
                                          data=str(result.path)), tmp_path / "bi")
            assert summary["final_loss"] == summary["final_loss"] and summary["steps"] == 2
            assert (Path(summary["checkpoint"]) / "model.safetensors").is_file()
            assert not (tmp_path / "bi" / "codec.safetensors").exists()           # latents need no codec
        else:
            with pytest.raises(ValueError, match="32-d text; preset tiny takes .* 384-d text"):
                train(TrainSettings(stage="bidirectional", preset="tiny", steps=1, batch=1, data=str(result.path)),
                      tmp_path / "bad")


def test_rewriting_a_shard_is_atomic_and_identical(rows, umt5, tmp_path):
    stage = Embed(out=str(tmp_path), max_windows=1, text_encoder="umt5", text_model=str(umt5))
    stage.setup()
    from models.checkpoint import read_metadata
    from safetensors.torch import load_file
    (a,) = stage.process(rows[1])
    first, meta = load_file(a["shard"]), read_metadata(a["shard"])
    (tmp_path / ".r4_0000.000.safetensors.dead.tmp").write_bytes(b"killed mid-write")   # an earlier crash
    (b,) = stage.process(rows[1])
    again = load_file(b["shard"])
    assert b["shard"] == a["shard"] and sorted(again) == sorted(first) == [
        "r4_0000_s000/audio", "r4_0000_s000/ref_frame", "r4_0000_s000/text_index", "r4_0000_s000/text_onset_index", "r4_0000_s000/text_onsets",
        "r4_0000_s000/texts", "r4_0000_s000/video", "r4_0000_s000/wave", "text"]
    assert Path(a["shard"]).name == "r4_0000.000.safetensors"
    assert all(torch.equal(first[k], again[k]) for k in first) and read_metadata(b["shard"]) == meta
    assert meta["samples"] == ["r4_0000_s000"] and json.dumps(a) == json.dumps(b)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r4_0000.000.safetensors.dead.tmp", "r4_0000.000.safetensors"]


def test_cli_train_on_samples_and_bad_options(embedded, captioned, tmp_path):
    manifest, _ = embedded
    res = cli("train", "--stage", "bidirectional", "--preset", "tiny", "--data", str(manifest), "--steps", "3",
              "--batch", "2", "--save-every", "3", "--out", str(tmp_path / "bi"), "--workdir", str(tmp_path / "w"),
              "-q")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["final_loss"] == summary["final_loss"] and summary["final_loss"] > 0
    assert (tmp_path / "bi" / "step-000003" / "ema.safetensors").is_file()
    assert (tmp_path / "bi" / "codec.safetensors").is_file()                       # frames: coded by PCA
    from models.config import PRESETS
    from stages.train.data import manifest_rows
    with pytest.raises(ValueError, match="preset small takes 33 frames of 256x256 .*re-run vidu embed --preset small"):
        manifest_rows(manifest, PRESETS["small"])
    bad = cli("embed", "--from", str(captioned), "--frames", "18", "--workdir", str(tmp_path / "w"), check=False)
    assert bad.returncode == 2 and "--frames must be 1 + 4k" in bad.stderr and "Traceback" not in bad.stderr


def test_windows_split_over_shards_decode_the_same_frames(embedded, rows, umt5, tmp_path, monkeypatch):
    import stages.embed
    monkeypatch.setattr(stages.embed, "SHARD_BYTES", 17 * 64 * 64 * 3)              # one window per shard
    stage = Embed(out=str(tmp_path), zoom=ZOOM, max_windows=2, text_encoder="umt5", text_model=str(umt5))
    stage.setup()
    split = stage.process(rows[0])
    assert [Path(r["shard"]).name for r in split] == ["r1_0000.000.safetensors", "r1_0000.001.safetensors"]
    for r in split:                                       # the second shard seeks to 1.18 s and decodes from there
        whole = embedded[1][r["id"]]
        assert torch.equal(read_sample(r)["video"], read_sample(whole)["video"])
        assert torch.equal(read_sample(r)["audio"], read_sample(whole)["audio"])
        assert r["repeated_frames"] == whole["repeated_frames"] and r["crop_box"] == whole["crop_box"]


# ---------------------------------------------------------------------------------------------
# per-chunk text with onsets

LATENT_S = 4 / 25.0                                       # one latent frame at 25 fps


def first_frame_at_or_after(onset: float, fps: float = 25.0) -> int:
    """Oracle of the onset rule: the first latent frame whose first video frame, max(0, 4k - 3),
    is shown at or after `onset` (s from the window start)."""
    k = 0
    while max(0, 4 * k - 3) / fps < onset - 1e-9:
        k += 1
    return k


def test_onset_rule_and_its_negative_control():
    from stages.samples import text_timeline
    # latent frames of a 17-frame window start at video frames 0, 1, 5, 9, 13 = 0, 0.04, 0.2, 0.36, 0.52 s
    for onset, k in ((0.0, 0), (0.03, 1), (0.04, 1), (0.041, 2), (0.2, 2), (0.3, 3), (0.36, 3), (0.5, 4), (0.52, 4)):
        assert first_frame_at_or_after(onset) == k
        tl = text_timeline("base", [(10 + onset, 99.0, "said")], 10.0, 5, 25.0, base_onset=9.0)
        want = [0] * k + [1] * (5 - k) if k else [0] * 5
        assert tl.index == want, (onset, tl)
        assert tl.texts == (["base", "said"] if k else ["said"])
        assert tl.onsets == (pytest.approx([-1.0, onset]) if k else pytest.approx([onset]))
    assert text_timeline("base", [(10.53, 99.0, "said")], 10.0, 5, 25.0).texts == ["base"]   # inside the last frame
    # negative control: one latent frame later, one frame later
    a = text_timeline("base", [(10.21, 99.0, "said")], 10.0, 5, 25.0).index
    b = text_timeline("base", [(10.21 + LATENT_S, 99.0, "said")], 10.0, 5, 25.0).index
    assert a == [0, 0, 0, 1, 1] and b == [0, 0, 0, 0, 1]
    # a chunk ends: the base prompt comes back, same table row, a new onset; the later of two overlapping wins
    tl = text_timeline("base", [(0.1, 0.3, "A"), (0.25, 0.5, "B")], 0.0, 5, 25.0)
    assert (tl.texts, tl.index, tl.onset_index) == (["base", "A", "B"], [0, 0, 1, 2, 0], [0, 1, 2, 0])
    assert tl.onsets == pytest.approx([0.0, 0.1, 0.25, 0.5])


@pytest.fixture(scope="module")
def chunked(rows, tmp_path_factory) -> dict:
    """retalking_1 [0.5, 3.0) through the real `vidu caption` stage with one speech chunk [0.9, 1.6),
    then embedded; and the same with the chunk starting one latent frame earlier."""
    from stages.caption import Caption
    cap = Caption()
    cap.setup()
    row = cap.process({**rows[0], "speech_segments": [{"start": 0.9, "end": 1.6}]})
    stage = Embed(out=str(tmp_path_factory.mktemp("chunks")), zoom=ZOOM, max_windows=3)
    stage.setup()
    earlier = [{**c, "start": c["start"] - LATENT_S} if c["category"] != "silence" else c for c in row["chunk_captions"]]
    return {"captioned": row, "samples": stage.process(row),
            "earlier": stage.process({**row, "id": "earlier", "chunk_captions": earlier}), "stage": stage}


def test_speech_chunk_caption_lands_on_its_latent_frame(chunked):
    row, (s0, s1, s2) = chunked["captioned"], chunked["samples"]
    speech = [c for c in row["chunk_captions"] if c["category"] != "silence"]
    assert [(c["start"], c["end"]) for c in speech] == [(0.9, 1.6)] and row["caption"]
    said, base = speech[0]["text"], row["caption"]
    assert said.startswith("speech (voice activity") and "0.70 s" in said
    # window 0 starts at 0.5 s: the chunk's onset 0.4 s falls inside latent frame 3 (0.36-0.52 s) -> frame 4
    k = first_frame_at_or_after(0.9 - 0.5)
    assert k == 4 and s0["texts_source"] == "chunk_captions"
    assert s0["texts"] == [base, said] and s0["text_index"] == [0] * k + [1] * (5 - k)
    assert s0["text_onsets"] == pytest.approx([0.0, 0.4]) and s0["text_onset_index"] == [0, 1]
    # window 1 starts at 1.18 s inside the chunk; it ends at 1.6 s = 0.42 s in, inside frame 3 -> base from 4
    assert s1["texts"] == [said, base] and s1["text_index"] == [0, 0, 0, 0, 1]
    assert first_frame_at_or_after(1.6 - 1.18) == 4
    assert s1["text_onsets"] == pytest.approx([0.9 - 1.18, 1.6 - 1.18]) and s1["text_onset_index"] == [0, 1]
    # window 2 (1.86 s): silence chunk only -> the clip caption, back in force since the chunk's end
    assert s2["texts"] == [base] and s2["text_index"] == [0] * 5 and s2["text_onsets"] == pytest.approx([1.6 - 1.86])
    assert s0["text"] == base and s0["text_source"] == "caption"


def test_chunk_texts_round_trip_through_the_shard(chunked):
    stage = chunked["stage"]
    for r in chunked["samples"]:
        t = read_sample(r)
        N = len(r["texts"])
        assert t["texts"].dtype == torch.float32 and list(t["texts"].shape) == r["texts_shape"]
        assert t["texts"].shape[0] == N and t["texts"].shape[2] == 384
        assert t["text_index"].dtype == torch.int64 and t["text_index"].tolist() == r["text_index"]
        assert t["text_onsets"].dtype == torch.float64 and t["text_onsets"].tolist() == pytest.approx(r["text_onsets"])
        assert t["text_onset_index"].tolist() == r["text_onset_index"]
        for j, text in enumerate(r["texts"]):                        # each row is that text's MiniLM features
            want = stage._text([text])[0]
            L = want.shape[0]
            assert torch.allclose(t["texts"][j, :L], want, atol=1e-6) and not t["texts"][j, L:].any()
        assert torch.equal(t["text"], stage._text([r["text"]])[0])   # "text" stays the clip-level text
    a, b = (read_sample(r)["texts"] for r in chunked["samples"][:2])
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])       # the same text, the same features


def test_moving_a_chunk_by_one_latent_frame_moves_its_text_by_one(chunked):
    (s0, s1, _), (m0, m1, _) = chunked["samples"], chunked["earlier"]
    assert first_frame_at_or_after(0.9 - LATENT_S - 0.5) == 3
    assert s0["text_index"] == [0, 0, 0, 0, 1] and m0["text_index"] == [0, 0, 0, 1, 1]
    assert m0["texts"] == s0["texts"] and m0["text_onsets"] == pytest.approx([0.0, 0.4 - LATENT_S])
    assert (m1["texts"], m1["text_index"]) == (s1["texts"], s1["text_index"])           # the end did not move


def test_a_clip_without_speech_chunks_has_one_text_on_every_frame(embedded):
    _, got = embedded
    for sid, clip_start in (("r1_0000_s000", 0.5), ("r1_0000_s001", 0.5), ("r4_0000_s001", 0.0)):
        r = got[sid]
        t = read_sample(r)
        assert r["texts"] == [r["text"]] and r["text_index"] == [0] * 5 and r["texts_source"] is None
        assert r["text_onsets"] == pytest.approx([clip_start - r["start_s"]]) and r["text_onset_index"] == [0]
        assert t["texts"].shape[0] == 1 and torch.equal(t["texts"][0], t["text"])


def _synth_window(tl_events, start: float, fps: float = 25.0) -> list[str]:
    """Oracle: the instruction in force at each latent frame's first video frame of the window."""
    out = []
    for k in range(5):
        t = start + max(0, 4 * k - 3) / fps
        live = [text for on, end, text in tl_events if on <= t + 1e-9 < end]
        out.append(live[-1] if live else "")
    return out


def test_synthetic_instruction_lands_at_its_onset_frame():
    from models.config import NEUTRAL_TEXT
    from stages.samples import synth_events, synth_timeline
    from stages.synth import make_sample
    from stages.synth.dataset import sample_seed
    s = make_sample(sample_seed(4, 0), width=64, height=64, seconds=2.0)
    events, source = synth_events(s)
    assert events and source in ("events", "actions")
    onset, end, name = events[0]
    k = first_frame_at_or_after(onset)
    assert 0 < k < 5, "pick a seed whose first instruction starts inside the first window"
    tl = synth_timeline(s, NEUTRAL_TEXT, frames=17)
    assert tl.texts == [NEUTRAL_TEXT, name] and tl.index == [0] * k + [1] * (5 - k)
    assert tl.onsets == pytest.approx([0.0, onset]) and tl.onset_index == [0, 1]
    full = synth_timeline(s, NEUTRAL_TEXT)                                 # the whole clip
    for kk, j in enumerate(full.index):                                    # agrees with the world's per-frame truth
        assert (s.instructions[max(0, 4 * kk - 3)] or NEUTRAL_TEXT) == full.texts[j]
    # timed events (onset, action start, end, text): the text follows the onset, not the action start
    timed = {"events": [[onset + LATENT_S, onset + LATENT_S + 0.3, end, name]], "actions": [[0.0, end, name]]}
    assert synth_events(timed) == ([(onset + LATENT_S, end, name)], "events")
    from stages.samples import text_timeline
    moved = text_timeline(NEUTRAL_TEXT, synth_events(timed)[0], 0.0, 5, 25.0)
    assert moved.index == ([0] * (k + 1) + [1] * (4 - k))[:5]                # one latent frame later


def test_cli_embeds_a_synth_manifest(tmp_path):
    import json as _json
    from models.config import NEUTRAL_TEXT
    work = str(tmp_path / "w")
    res = cli("synth", "--n", "1", "--seed", "4", "--seconds", "2", "--size", "64x64", "--out", str(tmp_path / "s"),
              "--workdir", work, "-q")
    synth_manifest = res.stdout.strip().splitlines()[-1]
    res = cli("embed", "--from", synth_manifest, "--preset", "tiny", "--workdir", work, "-q")
    table, meta = read_manifest(Path(res.stdout.strip().splitlines()[-1]))
    got = table.to_pylist()
    assert meta["kind"] == "samples" and [r["status"] for r in got] == ["ok", "ok"]
    truth = _json.loads(Path(read_manifest(Path(synth_manifest))[0].to_pylist()[0]["gt_path"]).read_text())
    from stages.samples import synth_events
    events, source = synth_events(truth)
    switched = 0
    for r in got:
        want = [w or NEUTRAL_TEXT for w in _synth_window(events, r["start_s"])]
        assert [r["texts"][j] for j in r["text_index"]] == want and r["texts_source"] == source
        switched += len(set(want)) > 1
        t = read_sample(r)
        assert t["text_index"].tolist() == r["text_index"] and t["texts"].shape[0] == len(r["texts"])
        assert tuple(t["video"].shape) == (17, 64, 64, 3) and r["video_path"].endswith(".mp4")
    assert switched, "no instruction onset inside a window: pick another --seed"
    assert got[0]["text_source"] == "instruction" and got[0]["text"] == events[0][2]


def test_synth_rows_without_a_sidecar_use_their_actions_and_clip_rows_need_times(tmp_path):
    from stages.embed import clip_item, clip_texts
    row = base_row("synth", id="s", path="/x/s.mp4", duration_s=2.0, fps=25.0, frames=49,
                   actions=json.dumps([[0.3, 1.0, "nod"], [1.2, 1.3, "blink"]]), gt_path=str(tmp_path / "gone.json"))
    item = clip_item(row)
    assert (item["video_path"], item["start_s"], item["end_s"]) == ("/x/s.mp4", 0.0, 2.0)
    assert item["synth_events"] == [(0.3, 1.0, "nod"), (1.2, 1.3, "blink")] and item["synth_events_source"] == "actions"
    text, source, events, events_source = clip_texts(item, 25.0)
    assert (text, source, events_source) == ("nod", "instruction", "actions")      # 18 frames of nod, 3 of blink
    assert clip_texts({**item, "synth_events": []}, 25.0)[:2] == ("a person talking to the camera", "neutral")
    with pytest.raises(ValueError, match="has no start_s"):
        clip_item({"id": "c", "video_path": "/x.mp4", "start_s": None, "end_s": 1.0})
    with pytest.raises(ValueError, match="neither a clip"):
        clip_item({"id": "c"})


def test_shards_without_per_frame_texts_still_read(tmp_path):
    from stages.samples import TEXT_KEYS, write_shard
    path = tmp_path / "old.000.safetensors"
    write_shard(path, {"text": torch.zeros(3, 4), "old_s000/video": torch.zeros(17, 8, 8, 3, dtype=torch.uint8),
                       "old_s000/audio": torch.zeros(5, 16, 80), "old_s000/wave": torch.zeros(10880)}, {})
    t = read_sample({"id": "old_s000", "shard": str(path), "key_prefix": "old_s000"})
    assert sorted(t) == ["audio", "text", "video", "wave"] and not set(TEXT_KEYS) & set(t)
