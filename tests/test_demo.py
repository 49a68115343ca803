"""`vidu demo` end to end: each generated file gets the decision its facts call for."""
import json
from pathlib import Path

from manifests.io import read_manifest, workspace
from stages.demo import DEMO_CLIP_MAX_LEN, run_demo
from tests.conftest import vidu


def test_demo_decisions(tmp_path):
    root = workspace(tmp_path)
    pre, clip = run_demo(root, quiet=True)
    videos = {Path(r["path"]).name: r for r in read_manifest(pre.path)[0].to_pylist()}
    assert {k: v["reasons"] for k, v in videos.items()} == {
        "interview with cuts.mp4": [], "monologue.mp4": [], "monologue_480.mp4": ["near_duplicate"],
        "интервью копия.mp4": ["duplicate"], "b-roll without audio.mp4": ["no_audio"], "truncated.mp4": ["corrupt"],
        "notes.txt": ["not_media"]}
    facts = json.loads((root / "demo-media.json").read_text())
    clips = read_manifest(clip.path)[0].to_pylist()
    by_video = {}
    for c in clips:
        by_video.setdefault(Path(c["video_path"]).name, []).append(c)
    cuts = [round(c["start_s"], 2) for c in by_video["interview with cuts.mp4"][1:]]
    assert cuts == [round(t, 2) for t in facts["interview with cuts.mp4"]["cut_times"]]
    mono = by_video["monologue.mp4"]
    assert len(mono) == 3 and all(c["duration_s"] <= DEMO_CLIP_MAX_LEN and c["status"] == "ok" for c in mono)
    true_speech = facts["monologue.mp4"]["speech"]
    for c in mono[1:]:
        assert c["cut_reasons"][0] == "silence"
        assert not any(s < c["start_s"] < e for s, e in true_speech)  # never inside the true utterances


def test_avatar_demo_streams_the_starter_and_scores_it(tmp_path):
    """`vidu demo` (what `make demo` runs): the starter model streams a 1-s script of the synthetic
    world to an mp4 with its audio, and the scores, the files and the live-page command are printed."""
    import av
    res = vidu("demo", "--seconds", "1", "--workdir", str(tmp_path), "--device", "cpu")
    lines = dict(ln.split(":", 1) for ln in res.stdout.splitlines() if ln[:1].isalpha() and ":" in ln)
    video = Path(lines["video"].strip())
    with av.open(str(video)) as f:
        assert {s.type for s in f.streams} == {"video", "audio"}
        assert (f.streams.video[0].width, f.streams.video[0].height) == (256, 256)
        assert sum(1 for _ in f.decode(video=0)) == 25
    assert "lip-sync r" in lines["scores"] and "--serve 127.0.0.1:8000" in lines["live"]
    assert Path(lines["character"].strip()).is_file()
    assert "running" not in res.stdout                 # the model is announced on stderr, results on stdout


def test_curation_demo_is_a_subcommand(tmp_path):
    res = vidu("demo", "curation", "--help")
    assert "prefilter | clip" in res.stdout
