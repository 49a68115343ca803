"""`vidu eval --bench | --compare | --ab` end to end on the tiny preset: the synth, built-in streambench
and hdtf runners (real stream sessions, real scoring), the ground truth against itself and against
random weights, resume after an interrupted run, the HTML report in headless Chromium, and A/B votes
through the page's HTTP API checked against hand-computed Wilson intervals."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from manifests import catalog
from manifests.io import read_manifest, workspace
from stages.eval.ab import ABServer, ABSession, preference, wilson
from stages.eval.bench import BenchError, run_bench
from stages.eval.bench.cases import BenchSamples, folder_items
from stages.eval.bench.runner import EvalBench
from stages.eval.report import load_runs, summary_table, table_rows, write_report
from tests.conftest import vidu
from tests.browser import browser  # noqa: F401  (the project's headless Chromium fixture)

SECONDS = 1.0  # 25 frames: 7 chunks of the tiny preset
TALKING = ("retalking_1.mp4", "retalking_3.mp4")


def rows(result) -> list[dict]:
    table, _ = read_manifest(result.path)
    return table.to_pylist()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return workspace(tmp_path_factory.mktemp("evalbench"))


@pytest.fixture(scope="module")
def synth_oracle(root):
    return run_bench("synth", root, ckpt="oracle", limit=2, seconds=SECONDS)


@pytest.fixture(scope="module")
def synth_model(root):
    return run_bench("synth", root, limit=2, seconds=SECONDS)


@pytest.fixture(scope="module")
def streambench_oracle(root):
    return run_bench("streambench", root, ckpt="oracle", limit=2, seconds=1.28)


# ---------------------------------------------------------------------------------------------
# synth: the ground truth scores itself high, random weights do not

def test_synth_oracle_matches_ground_truth(synth_oracle):
    samples, results = synth_oracle
    assert samples.counts == {"ok": 2} and results.counts == {"ok": 2}
    srows = rows(samples)
    assert [r["seed"] for r in srows] == [2 ** 62, 2 ** 62 + 1]  # held-out seeds, disjoint from training's
    for r in rows(results):
        assert r["system"] == "oracle" and r["frames"] == 25 and (r["width"], r["height"]) == (256, 256)
        assert r["mouth_r"] > 0.95  # the render's mouth is the audio's mouth track
        assert r["face_found"] == 1.0 and json.loads(r["scores"])["face_found"] <= 1.0   # the world's finder; dlib's kept
        assert abs(r["mouth_r_control"]) < r["mouth_r"] - 0.3  # another case's speech does not explain it
        assert r["identity_error"] < 20  # RGB distance of skin/shirt/hair to the case's identity
        truth = json.loads(Path(next(c for c in srows if c["id"] == r["sample_id"])["truth"]).read_text())
        assert r["style"] == truth["identity"]["style"]    # the character's kind, for the per-style breakdown
        assert r["stream_fps"] is None and r["chunk_ms"] is None  # no stream: no speed numbers
        assert Path(r["video_path"]).is_file()


def test_synth_idle_is_the_synth_cases_untold(root, synth_oracle):
    """synth-idle: the synth cases with their instructions taken out (the same seed, character and speech),
    the instruction-free streams whose detected actions are all unprompted; the ground truth acts on
    none."""
    from stages.eval.bench.cases import synth_case
    told, untold = synth_case(1, 64, 2.0), synth_case(1, 64, 2.0, idle=True)
    assert told.actions and not untold.actions   # case 1 is told "turn right" in its 2 s; untold, nothing
    assert np.array_equal(told.audio, untold.audio) and told.identity == untold.identity
    assert np.array_equal(told.tracks["mouth"], untold.tracks["mouth"])
    samples, results = run_bench("synth-idle", root, ckpt="oracle", limit=2, seconds=2.0)
    srows = rows(samples)
    assert [r["seed"] for r in srows] == [r["seed"] for r in rows(synth_oracle[0])]   # the synth bench's cases
    assert [r["events"] for r in srows] == ["[]", "[]"] and {r["instruction"] for r in srows} == {""}
    for r in rows(results):
        assert r["bench"] == "synth-idle" and r["instr_events"] == 0 and r["spurious_per_min"] == 0.0
        assert r["mouth_r"] > 0.95


def test_synth_random_weights_stream_and_score_badly(synth_model, synth_oracle):
    samples, results = synth_model
    assert samples.run_id == synth_oracle[0].run_id  # the same samples, indexed once
    assert results.counts == {"ok": 2}
    oracle = {r["sample_id"]: r for r in rows(synth_oracle[1])}
    for r in rows(results):
        assert r["system"] == "random:tiny"
        assert any("random weights" in n for n in r["notes"])
        assert r["frames"] == 25 and (r["width"], r["height"]) == (64, 64)
        assert Path(r["video_path"]).is_file() and Path(r["video_path"]).parent.name == results.run_id
        assert len(r["chunk_ms"]) == 7 and r["stream_fps"] > 0 and r["first_frame_s"] > 0  # 1 + 6 chunks
        assert r["chunk_ms_p50"] <= r["chunk_ms_p90"] <= r["chunk_ms_p99"]
        assert r["mouth_r"] is not None and abs(r["mouth_r"]) < 0.5 < oracle[r["sample_id"]]["mouth_r"]
        assert json.loads(r["scores"])["frames"] == 25


def test_a_bidirectional_teacher_is_sampled_whole_not_streamed(root, synth_oracle, tmp_path_factory):
    """A stage-1 checkpoint cannot stream: the bench samples each case whole (stages/train/sample.py
    `sample_clips`, windows past its clip length) with the case's timed instructions and speech, writes the
    mp4 and scores it as a stream's; `vidu stream` of it says it was never trained to stream."""
    from stages.stream.session import load_parts
    from stages.train.loop import TrainSettings, train
    from stages.train.sample import sample_clips
    out = tmp_path_factory.mktemp("bidirectional")
    train(TrainSettings(stage="bidirectional", preset="tiny", steps=2, batch=2, samples=4, save_every=2, warmup=1), out)
    ckpt = out / "step-000002" / "ema.safetensors"
    _, results = run_bench("synth", root, ckpt=str(ckpt), limit=2, seconds=SECONDS)
    assert results.counts == {"ok": 2}
    oracle = {r["sample_id"]: r for r in rows(synth_oracle[1])}
    samples = {r["id"]: r for r in rows(synth_oracle[0])}
    for r in rows(results):
        assert any("sampled whole" in n for n in r["notes"]) and r.get("stream_fps") is None
        assert r["frames"] == 25 > 4 * 5                  # past the tiny model's 5-latent-frame clip: windows
        with av.open(r["video_path"]) as f:
            assert sum(1 for _ in f.decode(video=0)) == 25
        assert r["mouth_r"] is not None and abs(r["mouth_r"]) < 0.5 < oracle[r["sample_id"]]["mouth_r"]
    # the frames are sample_clips' for that case (the bench's seed), decoded as the mp4's source
    item = samples[rows(results)[0]["sample_id"]]
    parts = load_parts(item["image"], str(ckpt))
    assert any("bidirectional teacher" in n for n in parts.notes)
    from stages.sense.image import read_image
    from stages.sense.media import load_audio
    wave = load_audio(item["audio"], 16000)
    timed = [tuple(e) for e in json.loads(item["events"] or "[]")]
    (frames,) = sample_clips(parts.engine.model, parts.cfg, parts.decoder, parts.encode_text, [read_image(item["image"])],
                             [wave], [timed], 25, 2, parts.trained["shift"], parts.trained["guidance"],
                             parts.trained["guide"])
    bench = EvalBench(bench="synth", system=str(ckpt), steps=2)
    bench.setup()
    again, _, info = bench._stream(item, wave, root / "again.mp4")
    assert np.array_equal(again, frames) and frames.shape == (25, 64, 64, 3)


# ---------------------------------------------------------------------------------------------
# streambench: built-in samples with one instruction each; a user's folder

def test_streambench_builtin_instructions(streambench_oracle):
    samples, results = streambench_oracle
    srows = rows(samples)
    assert [r["instruction"] for r in srows] == ["blink", "nod"]  # action i mod 8 from 0.3 s
    assert [json.loads(r["events"])[0][:2] for r in srows] == [[0.3, 0.875], [0.3, 1.3]]
    for r in rows(results):
        assert r["instr_events"] == 1 and r["instr_success"] == 1.0
        assert 0 <= r["instr_latency_s"][0] <= 1.0 and r["spurious_per_min"] == r["spurious_idle_per_min"] == 0.0
    conf = [json.loads(r["confusion"]) for r in rows(results)]
    assert conf == [{"blink": {"blink": 1}}, {"nod": {"nod": 1}}]
    assert [(r["instr_hit"], json.loads(r["instr_classes"])) for r in rows(results)] == \
        [(1.0, {"blink": {"told": 1, "success": 1, "hit": 1}}), (1.0, {"nod": {"told": 1, "success": 1, "hit": 1}})]


def test_instruction_negative_control(streambench_oracle):
    """The blink clip scored against the nod sample's instruction: the event fails, and the blink that
    does happen is confused for it (a scorer that passes everything would say 1.0)."""
    from stages.eval.bench.synthscore import synth_scores
    from stages.sense.media import clip_frames
    blink, nod = rows(streambench_oracle[0])
    frames, _ = clip_frames(blink["video"], 0, 10)
    truth = json.loads(Path(blink["truth"]).read_text())
    truth["actions"] = json.loads(nod["events"])
    s = synth_scores(frames, 25.0, truth, None)
    assert s["instr_events"] == 1 and s["instr_success"] == 0.0
    assert s["confusion"] == {"nod": {"blink": 1}}
    assert s["instr_hit"] == 0.0 and s["instr_classes"] == {"nod": {"told": 1, "success": 0, "hit": 0}}  # no nod at all
    # the blink is spurious, fired while the nod was asked for: not an unprompted action
    assert s["spurious_per_min"] > 0 and s["spurious_idle_per_min"] == 0.0
    # told nothing, the same blink is unprompted
    truth["actions"] = []
    s = synth_scores(frames, 25.0, truth, None)
    assert s["spurious_idle_per_min"] == s["spurious_per_min"] > 0


def test_frozen_stream_fails_drift(synth_oracle):
    """The oracle clip against itself keeps its motion and sync; the same clip frozen from its middle
    on has motion and lip-sync ratios of 0 (last 10 % vs first 10 %)."""
    from stages.eval.bench.synthscore import synth_scores
    from stages.sense.media import clip_frames
    case = rows(synth_oracle[0])[1]
    frames, _ = clip_frames(case["video"], 0, 10)
    truth = json.loads(Path(case["truth"]).read_text())
    live = synth_scores(frames, 25.0, truth, None)["drift_ratios"]
    frozen = frames.copy()
    frozen[12:] = frozen[12]
    stuck = synth_scores(frozen, 25.0, truth, None, workers=2)["drift_ratios"]
    assert synth_scores(frames, 25.0, truth, None, workers=2)["drift_ratios"] == live   # measured in 2 processes: the same
    # a living clip moves at its end too (this one: 0.42 of its first 10 %'s motion: its speech and actions
    # differ), a frozen one not at all
    assert live["motion"] > 0.2 and live["sync_r"] > 0.9 and 0.8 < live["sharpness"] < 1.25
    assert stuck["motion"] == 0.0 and stuck["sync_r"] == 0.0 and 0.8 < stuck["sharpness"] < 1.25  # still sharp


def test_frame_stats_in_pieces_and_processes(monkeypatch):
    """frame_stats cut in pieces (one frame shared at each seam) and measured in 2 processes equals the whole
    clip measured at once by the formulas themselves; a seam that dropped the shared frame would lose a motion."""
    from stages.eval.bench import synthscore
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (23, 12, 10, 3), dtype=np.uint8)
    y = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255
    lap = 4 * y[:, 1:-1, 1:-1] - y[:, :-2, 1:-1] - y[:, 2:, 1:-1] - y[:, 1:-1, :-2] - y[:, 1:-1, 2:]
    want_sharp = np.array([v.var() for v in lap])
    want_motion = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean((1, 2, 3))
    monkeypatch.setattr(synthscore, "STATS_STEP", 5)          # pieces of 5 + 1 frames: 5 pieces, the last of 3
    for workers in (1, 2):
        sharp, motion = synthscore.frame_stats(frames, workers)
        assert sharp.shape == (23,) and motion.shape == (22,)
        np.testing.assert_array_equal(sharp, want_sharp)
        np.testing.assert_array_equal(motion, want_motion)
    frozen = frames.copy()
    frozen[10:] = frozen[10]                                  # negative control: no motion from frame 10 on
    assert not synthscore.frame_stats(frozen, 2)[1][10:].any() and synthscore.frame_stats(frozen, 2)[1][:10].all()


def test_streambench_folder_loader(tmp_path, root, synth_oracle):
    """A user's folder: good lines are indexed (audio to 16 kHz wav, the image as png); each bad line
    is a rejected row with its reason."""
    src = rows(synth_oracle[0])[0]
    d = tmp_path / "sb"
    (d / "media").mkdir(parents=True)
    (d / "media" / "ref.png").write_bytes(Path(src["image"]).read_bytes())
    (d / "media" / "talk.wav").write_bytes(Path(src["audio"]).read_bytes())
    (d / "media" / "bad.png").write_text("not an image")
    lines = [{"id": "good", "image": "media/ref.png", "audio": "media/talk.wav", "instruction": "nod", "at": 0.2},
             {"id": "noaudio", "image": "media/ref.png", "audio": "media/missing.wav", "instruction": "nod"},
             {"id": "badimage", "image": "media/bad.png", "audio": "media/talk.wav", "instruction": "smile"},
             {"id": "noinstr", "image": "media/ref.png", "audio": "media/talk.wav"}]
    (d / "samples.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    from stages.eval.bench.cases import fingerprint
    from stages.run import run_stage
    items = folder_items(d)
    stage = BenchSamples(bench="streambench", out_dir=str(tmp_path / "out"), seconds=0.0)
    res = run_stage(stage, items, fingerprint(items), [str(d)], root, quiet=True)
    got = {r["id"]: r for r in rows(res)}
    assert list(got) == ["streambench-good", "streambench-noaudio", "streambench-badimage", "streambench-noinstr",
                         "streambench-line0005"]
    good = got["streambench-good"]
    assert good["status"] == "ok" and json.loads(good["events"]) == [[0.2, SECONDS, "nod"]]
    assert good["seconds"] == SECONDS and good["video"] is None
    assert [got[k]["reasons"] for k in list(got)[1:]] == [["audio_missing"], ["image_unreadable"],
                                                          ["missing_field"], ["bad_line"]]
    with pytest.raises(BenchError, match="no samples.jsonl"):
        folder_items(tmp_path)


# ---------------------------------------------------------------------------------------------
# hdtf on real talking heads, with a run interrupted after its first sample and resumed

def test_hdtf_oracle_resumes(tmp_path, shared_media, monkeypatch):
    d = tmp_path / "hdtf"
    (d / "sub").mkdir(parents=True)
    (d / "a.mp4").symlink_to(shared_media / "talking" / TALKING[0])
    (d / "sub" / "b.mp4").symlink_to(shared_media / "talking" / TALKING[1])
    (d / "notes.txt").write_text("not a video")
    root = workspace(tmp_path / "work")
    process, calls = EvalBench.process, []

    def interrupted(self, item):
        if calls:
            raise KeyboardInterrupt
        calls.append(item["id"])
        return process(self, item)

    monkeypatch.setattr(EvalBench, "process", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_bench("hdtf", root, data=str(d), ckpt="oracle", seconds=SECONDS)
    run = [r for r in catalog.runs(root) if r["stage"] == "eval"][0]
    assert run["state"] == "interrupted"
    parts = sorted((root / "runs" / run["run_id"]).glob("part-*.parquet"))
    first = [r for p in parts for r in pq.read_table(p).to_pylist()]
    assert [r["id"] for r in first] == ["hdtf-a"]

    calls.clear()
    monkeypatch.setattr(EvalBench, "process", lambda self, item: calls.append(item["id"]) or process(self, item))
    samples, results = run_bench("hdtf", root, data=str(d), ckpt="oracle", seconds=SECONDS)
    assert calls == ["hdtf-sub-b"]  # the finished sample is reused, not scored again
    assert results.reused == 1 and results.counts == {"ok": 2} and results.run_id == run["run_id"]
    got = rows(results)
    assert [r["id"] for r in got] == ["hdtf-a", "hdtf-sub-b"]
    assert {k: v for k, v in got[0].items() if k != "run_id"} == {k: v for k, v in first[0].items() if k != "run_id"}
    for r in got:  # a real clip against its own first frame
        assert r["identity"] > 0.9 and r["face_found"] > 0.9 and r["identity_embedder"]
        assert r["frames"] == 25 and r["mouth_r"] is None  # no synthetic ground truth
    assert [r["source"] for r in rows(samples)] == [str(d / "a.mp4"), str(d / "sub" / "b.mp4")]


# ---------------------------------------------------------------------------------------------
# reports

def test_compare_table_and_report_in_browser(root, synth_oracle, synth_model, tmp_path, browser):
    runs = load_runs(root, [synth_oracle[1].run_id[:10], str(synth_model[1].path)])
    table = dict(table_rows(runs))
    assert table["samples scored"] == ["2", "2"]
    oracle_r = np.mean([r["mouth_r"] for r in rows(synth_oracle[1])])
    assert table["mouth r vs ground truth"][0] == f"{oracle_r:.3f}"
    assert table["stream fps"][0] == "-" and table["stream fps"][1] != "-"
    assert summary_table(runs).row_count == len(table)
    page = write_report(runs, tmp_path / "report")
    names = {p.name for p in (tmp_path / "report").glob("*.png")}
    assert {"per-sample-mouth_r.png", "drift.png", "latency.png"} <= names
    browser.get(page.as_uri())
    imgs = browser.execute_script(
        "return [...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
    assert sorted(src for src, _, _ in imgs) == sorted(names)
    assert all(done and width == 640 for _, done, width in imgs)  # 6.4 in x 100 dpi, decoded
    text = browser.find_element("tag name", "body").text
    assert synth_oracle[1].run_id in text and synth_model[1].run_id in text


def _cli(*args: str):
    """`vidu ARGS` in this process (typer's CliRunner): (exit code, stdout, stderr)."""
    from typer.testing import CliRunner
    from vidu_cli.app import app
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def test_cli_bench_compare_and_bad_input(root, synth_oracle, synth_model, tmp_path):
    out = vidu("eval", "--bench", "synth", "--ckpt", "oracle", "--limit", "2", "--seconds", str(SECONDS),
               "--workdir", str(root), "--report", str(tmp_path / "r"))
    assert out.stdout.strip() == str(synth_oracle[1].path)  # finished before: the same manifest
    assert "mouth r vs ground truth" in out.stderr and (tmp_path / "r" / "index.html").is_file()
    bad_ckpt = tmp_path / "bad.safetensors"
    bad_ckpt.write_text("not a checkpoint")
    code, stdout, _ = _cli("eval", "--compare", synth_oracle[1].run_id, synth_model[1].run_id, "--workdir", str(root))
    assert code == 0 and "random:tiny" in stdout and "oracle" in stdout and "mouth r vs ground truth" in stdout
    for args, message in ((["--bench", "nope"], "unknown benchmark 'nope'"),
                          (["--bench", "hdtf"], "--bench hdtf needs --data DIR"),
                          (["--bench", "synth", "--ckpt", str(tmp_path / "none.safetensors")], "no such file"),
                          (["--bench", "synth", "--ckpt", str(bad_ckpt)], "cannot read checkpoint"),
                          (["--compare", "eval-nothere"], "no run 'eval-nothere'"),
                          (["--compare", synth_oracle[0].run_id], "is a bench_samples run, not an eval run"),
                          (["--ab", synth_oracle[1].run_id], "--ab takes two runs"),
                          (["--bench", "synth", "--ab", "x", "y"], "--bench and --ab cannot be combined"),
                          (["--bench", "synth", "--attention", "flash"], "unknown attention 'flash'")):
        code, _, stderr = _cli("eval", *args, "--workdir", str(root))
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, (args, stderr)


def test_the_bench_streams_with_the_fast_path_it_is_given(tmp_path):
    """EvalBench's kernels / attention (vidu eval --bench --kernels --attention) reach the model it streams; by
    default the stream's own default (fused kernels on a GPU only: off here)."""
    from tests.conftest import write_face
    face = str(write_face(tmp_path / "face.png"))
    for kw, want in (({"attention": "int8", "kernels": True}, {"on": True, "attention": "int8", "keep_context": True}),
                     ({}, {"on": False, "attention": "sdpa", "keep_context": True})):
        bench = EvalBench(bench="synth", system="random:tiny", **kw)
        bench.setup()
        assert bench._parts(face).engine.model.kernel_settings() == want, kw


# ---------------------------------------------------------------------------------------------
# A/B

def test_wilson_hand_computed():
    lo, hi = wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson(0, 0) == (None, None)
    lo, hi = wilson(0, 5)
    assert lo == 0.0 and round(hi, 4) == 0.4345


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_ab_votes_through_the_page_api(root, synth_oracle, synth_model, browser):
    a, b = load_runs(root, [synth_oracle[1].run_id, synth_model[1].run_id])
    session = ABSession(root, a, b, seed=3)
    videos_a = {r["sample_id"]: Path(r["video_path"]).read_bytes() for r in a.ok}
    with ABServer(session) as server:
        browser.get(server.url)  # the page asks for a pair and shows two playable videos
        browser.set_script_timeout(20)
        ready = browser.execute_async_script("""
            const done = arguments[0];
            const check = () => { const v = [...document.querySelectorAll('video')];
              if (v.length == 2 && v.every(x => x.readyState >= 1)) done(v.map(x => x.videoWidth)); else setTimeout(check, 100); };
            check();""")
        assert sorted(ready) == [64, 256]
        plan = []  # per pair: what is voted (left/right), and which run that means
        for choice in ("left", "right"):
            pair = json.loads(_get(server.url + "/api/pair")[2])
            assert pair["total"] == 2 and pair["done"] == len(plan)
            status, ctype, left = _get(server.url + pair["left"])
            assert status == 200 and ctype == "video/mp4"
            a_left = left == videos_a[pair["sample"]]
            votes = {"controllability": choice, "motion": choice, "sync": "tie", "overall": choice}
            assert _post(server.url + "/api/vote", {"token": pair["token"], "votes": votes})["recorded"] == 4
            plan.append("a" if (choice == "left") == a_left else "b")
        assert json.loads(_get(server.url + "/api/pair")[2])["token"] is None  # all judged
        with pytest.raises(urllib.error.HTTPError) as bad:
            _post(server.url + "/api/vote", {"token": pair["token"], "votes": {"beauty": "left"}})
        assert bad.value.code == 400
        with pytest.raises(urllib.error.HTTPError) as bad:
            _post(server.url + "/api/vote", {"token": "forged", "votes": {"overall": "left"}})
        assert bad.value.code == 404
        results = json.loads(_get(server.url + "/api/results")[2])
    stored = catalog.read_votes(root, a.run_id, b.run_id)
    assert len(stored) == 8 and {v["criterion"] for v in stored} == {"controllability", "motion", "sync", "overall"}
    k = plan.count("a")
    for c in ("controllability", "motion", "overall"):
        r = results["criteria"][c]
        assert (r["a"], r["b"], r["tie"]) == (k, 2 - k, 0)
        lo, hi = wilson(k, 2)
        assert r["rate_a"] == k / 2 and (r["ci_low"], r["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert results["criteria"]["sync"] == {"a": 0, "b": 0, "tie": 2, "n": 2, "rate_a": None, "ci_low": None,
                                           "ci_high": None, "tie_share": 1.0}
    assert preference(stored) == results["criteria"]
