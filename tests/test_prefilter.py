import os
import shutil

import pytest

from manifests.io import read_manifest, workspace
from stages.prefilter import Prefilter, discover, fingerprint
from stages.run import run_stage

SMALL = dict(min_short_side=100)  # the generated files are 320x180


def _run(root, paths, **params):
    items = discover([str(p) for p in paths], exclude=root)
    res = run_stage(Prefilter(**params), items, fingerprint(items), [str(p) for p in paths], root, quiet=True)
    table, _ = read_manifest(res.path)
    rows = {os.path.basename(r["path"]): r for r in table.to_pylist()}
    assert len(rows) == table.num_rows  # no file listed twice
    return rows


def test_talking_clips_kept_with_true_properties(shared_media, tmp_path):
    rows = _run(workspace(tmp_path), [shared_media])
    talking = {k: v for k, v in rows.items() if k.startswith("retalking")}
    assert len(talking) == 5 and all(r["status"] == "ok" for r in talking.values()), talking
    r2, r4, r1 = rows["retalking_2.mp4"], rows["retalking_4.mp4"], rows["retalking_1.mp4"]
    assert (r2["width"], r2["height"], r2["real_fps"], r2["frame_count"]) == (844, 844, 25.0, 125)
    assert r2["video_duration_s"] == pytest.approx(5.0, abs=1e-6)
    assert (r4["width"], r4["height"], r4["real_fps"], r4["frame_count"]) == (700, 700, 30.0, 199)
    assert r4["video_duration_s"] == pytest.approx(6.6333, abs=1e-3)
    assert r1["vfr"] is True and r1["real_fps"] == 30.0 and r1["avg_fps"] == pytest.approx(135 / 6.1, abs=1e-3)
    assert all(r["audio_codec"] == "aac" and r["sample_rate"] == 44100 for r in talking.values())
    assert rows["big_buck_bunny_0_30.webm"]["container"] == "matroska,webm"
    assert rows["big_buck_bunny_0_30.webm"]["video_codec"] == "vp8"
    assert rows["countdown.mp4"]["reasons"] == ["low_resolution"]  # 320x240 < 256 short side
    assert rows["silero_test.wav"]["reasons"] == ["no_video"]
    assert rows["SOURCES.md"]["reasons"] == ["not_media"]


def test_generated_edge_cases(gen_media, tmp_path):
    d = tmp_path / "in put ü"  # spaces and non-ASCII
    shutil.copytree(gen_media["dir"], d)
    (d / "loop").symlink_to(d / "loop")
    (d / "sub").mkdir()
    (d / "sub" / "back").symlink_to(d, target_is_directory=True)  # a folder loop
    (d / "sub" / "inner.txt").write_text("x")
    shutil.copyfile(d / "talk with cuts.mp4", d / "копия.mp4")
    rows = _run(workspace(tmp_path / "w"), [d, tmp_path / "does-not-exist"], **SMALL)
    reasons = {k: v["reasons"] for k, v in rows.items()}
    assert rows["talk with cuts.mp4"]["status"] == "ok"
    assert reasons["talk_small.mp4"] == ["near_duplicate"]
    assert rows["talk_small.mp4"]["duplicate_of"] == rows["talk with cuts.mp4"]["id"]
    assert reasons["копия.mp4"] == ["duplicate"]
    assert reasons["silent.mp4"] == ["no_audio"]
    assert reasons["damaged.mp4"] == ["corrupt"]
    assert "truncated" in reasons["truncated.mp4"]
    assert reasons["empty.mp4"] == ["zero_bytes"]
    assert reasons["notes.txt"] == ["not_media"]
    assert reasons["loop"] == ["symlink_loop"]
    assert reasons["does-not-exist"] == ["not_found"]
    assert len(rows) == 11  # 7 generated + loop + inner.txt + copy + missing: the folder loop is walked once
    assert all(r["status"] in ("ok", "rejected") for r in rows.values())
    ok = rows["talk with cuts.mp4"]
    assert (ok["width"], ok["height"], ok["frame_count"], ok["decode_failures"]) == (320, 180, 300, 0)
    assert ok["av_mismatch_s"] < 0.1 and len(ok["phash"]) == 8


def test_thresholds_name_their_reasons(gen_media, tmp_path):
    rows = _run(workspace(tmp_path), [gen_media["dir"] / "talk with cuts.mp4"], min_short_side=200, min_fps=30,
                min_duration=20, require_audio=True)
    assert rows["talk with cuts.mp4"]["reasons"] == ["low_fps", "low_resolution", "too_short"]


def test_ten_thousand_files(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(10_000):
        (d / f"f{i:05d}.bin").write_bytes(b"x" * (i % 7))
    rows = _run(workspace(tmp_path / "w"), [d])
    assert len(rows) == 10_000
    codes = {tuple(r["reasons"]) for r in rows.values()}
    assert codes <= {("zero_bytes",), ("not_media",), ("not_media", "duplicate")}
    assert sum(r["reasons"] == ["zero_bytes"] for r in rows.values()) == len(range(0, 10_000, 7))
