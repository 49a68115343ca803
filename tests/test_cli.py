"""The `vidu` command: pipes through a real shell, catalog commands and one-line errors in process
(typer's CliRunner)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from manifests.io import read_manifest
from tests.conftest import cli


def _pipe(src: Path, work: Path, extra: str = "") -> subprocess.CompletedProcess:
    """The installed console script, twice, joined by a real shell pipe."""
    bin_dir = Path(sys.executable).parent
    cmd = (f"vidu prefilter '{src}' --workdir '{work}' --min-short-side 100 -q | "
           f"vidu clip --workdir '{work}' --min-len 2 --workers 2 {extra}")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env, timeout=600)


def test_pipe_through_a_real_shell(gen_media, tmp_path):
    work = tmp_path / "w"
    proc = _pipe(gen_media["dir"], work)
    assert proc.returncode == 0, proc.stderr
    out = Path(proc.stdout.strip())
    table, meta = read_manifest(out)
    assert meta["kind"] == "clips" and meta["stage"] == "clip"
    rows = table.to_pylist()
    assert [(r["start_frame"], r["end_frame"], r["status"]) for r in rows] == [(0, 100, "ok"), (100, 200, "ok"),
                                                                            (200, 300, "ok")]
    assert {r["video_path"] for r in rows} == {str(gen_media["dir"] / "talk with cuts.mp4")}

    runs = [json.loads(line) for line in cli("runs", "--workdir", str(work), "--format", "jsonl").stdout.splitlines()]
    assert [(r["stage"], r["state"], r["rows_ok"]) for r in runs] == [("prefilter", "done", 1), ("clip", "done", 3)]
    clip_run = runs[1]["run_id"]
    csv = cli("show", clip_run[:10], "--workdir", str(work), "--columns", "clip_index,end_frame", "--format", "csv")
    assert csv.stdout.split() == ["clip_index,end_frame", "0,100", "1,200", "2,300"]
    rej = cli("show", runs[0]["output"], "--reason", "near_duplicate", "--columns", "path", "--format", "jsonl")
    assert [json.loads(x)["path"] for x in rej.stdout.splitlines()] == [str(gen_media["dir"] / "talk_small.mp4")]
    q = cli("sql", "SELECT count(*) AS n, sum(speech_s) > 3 AS talks FROM clip", "--workdir", str(work),
            "--format", "jsonl")
    assert json.loads(q.stdout) == {"n": 3, "talks": True}

    # same inputs and parameters, in process: the finished runs are reused
    videos = cli("prefilter", str(gen_media["dir"]), "--workdir", str(work), "--min-short-side", "100", "-q")
    again = cli("clip", "--workdir", str(work), "--min-len", "2", "--workers", "2", input=videos.stdout)
    assert again.stdout == proc.stdout and "reused" in again.stderr


def test_per_row_errors_are_recorded_and_strict_fails(gen_media, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(gen_media["dir"] / "talk with cuts.mp4", src / "a.mp4")
    work = str(tmp_path / "w")
    manifest = cli("prefilter", str(src), "--workdir", work, "--min-short-side", "100", "-q").stdout.strip()
    (src / "a.mp4").unlink()  # gone before the next stage reads it
    proc = cli("clip", "--from", manifest, "--workdir", work, check=False)
    assert proc.returncode == 0
    (row,) = read_manifest(proc.stdout.strip())[0].to_pylist()
    assert row["status"] == "error" and row["reasons"] == ["exception"] and row["error"]
    strict = cli("clip", "--from", manifest, "--workdir", work, "--strict", check=False)
    assert strict.returncode == 1


@pytest.mark.parametrize("args,message", [
    (["clip"], "no input manifest on stdin"),
    (["clip", "--from", "nope.parquet"], "manifest not found: nope.parquet"),
    (["clip", "--from", "x", "--detector", "bogus"], "unknown detector 'bogus'"),
    (["show", "nothing-like-this"], "neither a manifest file nor a known run id"),
    (["sql", "SELECT * FROM no_such_view"], "no_such_view"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    proc = cli(*args, "--workdir", str(tmp_path), check=False, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def test_wrong_manifest_kind(gen_media, tmp_path):
    work = str(tmp_path / "w")
    videos = cli("prefilter", str(gen_media["dir"] / "talk with cuts.mp4"), "--workdir", work, "--min-short-side",
                 "100", "-q").stdout.strip()
    clips = cli("clip", "--from", videos, "--workdir", work, "--min-len", "2", "-q").stdout.strip()
    assert read_manifest(clips)[1]["kind"] == "clips"
    proc = cli("clip", "--from", clips, "--workdir", work, check=False)
    assert proc.returncode == 2 and "is a 'clips' manifest" in proc.stderr


def test_missing_paths_are_rows_and_strict_exits_nonzero(tmp_path):
    proc = cli("prefilter", str(tmp_path / "missing dir"), "--workdir", str(tmp_path / "w"), check=False)
    assert proc.returncode == 0
    (row,) = read_manifest(proc.stdout.strip())[0].to_pylist()
    assert row["reasons"] == ["not_found"]
    assert cli("prefilter", str(tmp_path / "missing dir"), "--workdir", str(tmp_path / "w"), "--strict",
               check=False).returncode == 1


def test_help_has_examples():
    for cmd in ("prefilter", "clip", "runs", "show", "sql", "demo"):
        assert "Example" in cli(cmd, "--help").stdout, cmd
