import subprocess

import av
import numpy as np
import pytest
import scenedetect

from manifests.io import read_manifest, workspace
from stages.clip import Clip, detect_shots, plan_cuts, silent_intervals
from stages.sense.media import ffmpeg_exe, load_audio
from stages.run import run_stage
from stages.sense.speech import load_vad, speech_segments
from stages.synth.media import talking_video


def _inside_speech(frame, fps, speech):
    t = frame / fps
    return any(s < t < e for s, e in speech)


# ---- the cut planner, on exact inputs --------------------------------------------------------

def test_short_shot_is_not_cut():
    assert plan_cuts(0, 250, 25.0, [(1.0, 9.0)], max_len=10.0) == []


def test_even_split_in_silence():
    # 100 s at 10 fps, speech everywhere but pauses at 30-31 s and 70-72 s; pieces of at most 40 s.
    # Silent frames (0.1 s margin): [301, 309] and [701, 719]; the most even feasible split is 309 | 701.
    speech = [(0.0, 30.0), (31.0, 70.0), (72.0, 100.0)]
    cuts = plan_cuts(0, 1000, 10.0, speech, max_len=40.0, margin=0.1)
    assert cuts == [(309, "silence"), (701, "silence")]
    assert not any(_inside_speech(c, 10.0, speech) for c, _ in cuts)


def test_fewest_pieces_then_most_even():
    # silence everywhere: 90 s with max 40 s gives 3 pieces of 30 s
    cuts = plan_cuts(0, 900, 10.0, [], max_len=40.0)
    assert cuts == [(300, "silence"), (600, "silence")]


def test_no_silent_split_uses_longest_pause_then_forced():
    # 80 s of speech with two very short pauses (under the margin): cut at the longer one
    speech = [(0.0, 30.0), (30.05, 50.0), (50.12, 80.0)]
    cuts = plan_cuts(0, 800, 10.0, speech, max_len=60.0, margin=0.1)
    assert cuts == [(501, "longest_pause")]
    cuts = plan_cuts(0, 800, 10.0, [(0.0, 80.0)], max_len=60.0)
    assert cuts == [(400, "forced_in_speech")]


def test_silent_intervals_keep_margin():
    assert silent_intervals(0, 100, 10.0, [(2.0, 5.0)], margin=0.5) == [(1, 15), (55, 99)]


# ---- real media ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("big_buck_bunny_0_30.webm", [1.29, 5.79, 11.79, 15.67, 22.96]),
    ("countdown.mp4", [0.83, 1.67, 2.50, 3.47, 4.34, 5.17, 6.01]),  # a cut at every count
])
def test_shot_cuts_match_pyscenedetect(shared_media, name, expected):
    path = str(shared_media / "scenes" / name)
    shots, fps = detect_shots(path)
    ours = [s for s, _ in shots[1:]]
    oracle = [s.frame_num for s, _ in scenedetect.detect(path, scenedetect.AdaptiveDetector())[1:]]
    assert len(ours) == len(oracle) == len(expected)
    assert all(abs(a - b) <= 2 for a, b in zip(ours, oracle))
    assert ours[0] / fps == pytest.approx(expected[0], abs=0.05)
    assert [o / fps for o in ours] == pytest.approx(expected, abs=0.1)


def test_long_shot_never_cut_inside_speech(shared_media, tmp_path):
    """silero_test.wav twice (120 s) under a still image: one shot, cut in silence."""
    wav = shared_media / "speech" / "silero_test.wav"
    still = tmp_path / "still.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "color=c=gray:s=320x240:r=25", "-stream_loop", "1",
                    "-i", str(wav), "-shortest", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac",
                    str(still)], check=True)
    speech = speech_segments(load_vad(), load_audio(still))
    assert sum(e - s for s, e in speech) == pytest.approx(2 * 48.4, rel=0.05)
    for max_len in (60.0, 20.0):
        stage = Clip(max_len=max_len)
        stage.setup()
        rows = stage.process({"id": "still", "path": str(still)})
        assert rows[0]["start_frame"] == 0 and rows[-1]["end_s"] == pytest.approx(120.0, abs=0.1)
        assert all(a["end_frame"] == b["start_frame"] for a, b in zip(rows, rows[1:]))  # contiguous
        assert all(r["duration_s"] <= max_len + 1e-9 for r in rows)
        inner = [r["start_frame"] for r in rows[1:]]
        assert len(inner) >= int(120 // max_len) - (1 if max_len == 60.0 else 0)
        assert all(r["cut_reasons"][0] == "silence" for r in rows[1:])
        assert not any(_inside_speech(f, 25.0, speech) for f in inner)
        assert all(min(abs(f / 25.0 - x) for s, e in speech for x in (s, e)) >= 0.1 - 1e-9 for f in inner)


def test_generated_cuts_speech_and_materialize(gen_media, tmp_path):
    path = gen_media["dir"] / "talk with cuts.mp4"
    items = [{"id": "talk", "path": str(path)}]
    out_dir = tmp_path / "clips"
    res = run_stage(Clip(min_len=2.0, materialize=str(out_dir)), items, ["x"], ["x"], workspace(tmp_path / "w"),
                    quiet=True)
    rows = read_manifest(res.path)[0].to_pylist()
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 100), (100, 200), (200, 300)]
    assert [r["cut_reasons"] for r in rows] == [["video_start", "shot_boundary"], ["shot_boundary", "shot_boundary"],
                                                ["shot_boundary", "video_end"]]
    truth = sum(e - s for s, e in gen_media["facts"]["speech"])
    assert sum(r["speech_s"] for r in rows) == pytest.approx(truth, abs=1.0)
    for r in rows:
        with av.open(r["clip_path"]) as c:
            n = sum(1 for p in c.demux(c.streams.video[0]) if p.size)
            assert c.streams.audio, "the clip keeps its audio"
        assert n == r["end_frame"] - r["start_frame"]
    assert {r["cut_method"] for r in rows} <= {"copy", "reencode"}
    # the re-encoded clip shows the frames of its shot: first frame equals the source frame 100
    with av.open(rows[1]["clip_path"]) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24").astype(float)
    with av.open(str(path)) as c:
        src = [f.to_ndarray(format="rgb24").astype(float) for _, f in zip(range(101), c.decode(video=0))][100]
    assert np.abs(first - src).mean() < 6.0


def test_whole_video_clip_is_stream_copied(tmp_path):
    path = tmp_path / "one shot.mp4"
    talking_video(path, np.random.default_rng(3), [4.0], size=(160, 96))
    stage = Clip(materialize=str(tmp_path / "out"))
    stage.setup()
    (row,) = stage.process({"id": "one", "path": str(path)})
    assert (row["start_frame"], row["end_frame"], row["cut_method"]) == (0, 100, "copy")
    assert (tmp_path / "out" / "one_0000.mp4").read_bytes()[4:8] == b"ftyp"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["one_0000.mp4"]  # no temp file left
