"""Reliability (issue 12): non-UTF-8 file names, workspace faults (not a folder, read-only, disk full,
corrupt catalog, damaged part files and manifests), failed runs recorded as failed, and `vidu sql`
read-only. Every fault ends in one line on stderr naming the path and the fix, and exit 2."""
from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import sys
import time
import shutil
from contextlib import chdir
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from manifests import catalog
from manifests.io import ESC, read_manifest, rows, text_in, text_out, workspace
from stages.run import runner
from stages.synth.media import talking_video
from vidu_cli.app import app
from vidu_cli.chain import chain_items

NAME = b"caf\xe9.mp4"  # Latin-1 bytes: not UTF-8


def run(*args: str, env: dict | None = None, cwd: Path | None = None):
    """`vidu ARGS` in this process; (exit code, stdout, stderr). An uncaught exception fails the test."""
    with chdir(cwd or Path.cwd()):
        res = CliRunner().invoke(app, list(args), env=env, catch_exceptions=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"vidu {' '.join(args)} raised {res.exception!r}") from res.exception
    return res.exit_code, res.stdout, res.stderr


def one_line_error(code: int, stderr: str) -> str:
    """The single `error:` line of a failed command (exit 2)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vid") / "talk.mp4"
    talking_video(path, np.random.default_rng(3), [2.0], size=(160, 96))
    return path


@pytest.fixture
def src(video, tmp_path) -> Path:
    """A folder with a non-UTF-8 file name, an ordinary video and a few text files."""
    d = tmp_path / "raw"
    d.mkdir()
    shutil.copyfile(video, os.path.join(os.fsencode(d), NAME))
    shutil.copyfile(video, d / "plain.mp4")
    for i in range(4):
        (d / f"note{i}.txt").write_text(f"note {i}\n")
    return d


def manifest_rows(stdout: str) -> list[dict]:
    return rows(read_manifest(stdout.strip())[0])


def state_of(work: Path) -> list[str]:
    return [r["state"] for r in catalog.runs(work)]


# ---------------------------------------------------------------------------------------------
# 1. non-UTF-8 file names

@pytest.mark.parametrize("s", ["plain/ascii.mp4", "caf\udce9.mp4", "\ufffd", "x\ufffdDCE9y", "\ufffdFFFD",
                               "\ufffdabcd", "a\udcff\udc80\ufffd0041", "日本語\udcc3.mp4", ""])
def test_text_escape_round_trips(s):
    stored = text_out(s)
    stored.encode("utf-8")  # valid Unicode: Parquet and DuckDB take it
    assert text_in(stored) == s
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in s) and ESC not in s:
        assert stored == s  # ordinary text is stored unchanged


def test_escape_matches_fsencode():
    name = os.fsdecode(b"/m/caf\xe9 \xff.mp4")
    assert text_out(name) == "/m/caf\ufffdDCE9 \ufffdDCFF.mp4"
    assert os.fsencode(text_in(text_out(name))) == b"/m/caf\xe9 \xff.mp4"


def test_non_utf8_name_in_a_folder(src, tmp_path):
    work = tmp_path / "w"
    code, out, err = run("prefilter", str(src), "--workdir", str(work), "--min-short-side", "64",
                         "--min-duration", "1", "-q")
    assert code == 0, err
    got = {os.fsencode(r["path"]): r for r in manifest_rows(out)}
    raw = os.path.join(os.fsencode(src), NAME)
    assert set(got) == {raw, os.fsencode(src / "plain.mp4")} | {os.fsencode(src / f"note{i}.txt") for i in range(4)}
    row = got[raw]
    # the file was opened and probed like its twin, then de-duplicated against it (same bytes)
    assert row["content_hash"] == got[os.fsencode(src / "plain.mp4")]["content_hash"]
    assert row["frame_count"] == 50 and row["decode_failures"] == 0
    assert sorted(r["status"] for r in got.values()) == ["ok"] + ["rejected"] * 5
    stored = read_manifest(out.strip())[0].column("path").to_pylist()
    assert text_out(os.fsdecode(raw)) in stored  # the documented escape, on disk
    assert state_of(work) == ["done"]
    # the next stage gets a path it can open
    items, _ = chain_items([Path(out.strip())], ("videos",))
    assert all(os.path.isfile(it["path"]) for it in items)


def test_non_utf8_name_given_directly(src, tmp_path):
    work = tmp_path / "w"
    raw = os.fsdecode(os.path.join(os.fsencode(src), NAME))
    code, out, err = run("prefilter", raw, "--workdir", str(work), "--min-short-side", "64", "--min-duration", "1",
                         "-q")
    assert code == 0, err
    (row,) = manifest_rows(out)
    assert os.fsencode(row["path"]) == os.fsencode(raw) and row["status"] == "ok"
    (rec,) = catalog.runs(work)
    assert rec["state"] == "done" and json.loads(rec["inputs"]) == [text_out(raw)]
    code, out, err = run("sql", "SELECT count(*) AS n FROM prefilter WHERE path LIKE '%caf\ufffdDCE9.mp4'",
                         "--workdir", str(work), "--format", "csv")
    assert code == 0 and out.split() == ["n", "1"], err


def test_non_utf8_name_reaches_the_next_stage(video, tmp_path):
    """clip opens the file through OpenCV, which crashed the process on such a name."""
    from stages.clip import detect_shots

    d = tmp_path / "raw"
    d.mkdir()
    raw = os.path.join(os.fsencode(d), NAME)
    shutil.copyfile(video, raw)
    assert detect_shots(os.fsdecode(raw)) == detect_shots(str(video))
    work = tmp_path / "w"
    code, out, err = run("prefilter", str(d), "--workdir", str(work), "--min-short-side", "64", "--min-duration",
                         "1", "-q")
    assert code == 0, err
    code, out, err = run("clip", "--from", out.strip(), "--workdir", str(work), "--min-len", "1", "-q")
    assert code == 0, err
    clips = manifest_rows(out)
    assert len(clips) >= 1 and all(c["status"] == "ok" for c in clips), clips
    assert {os.fsencode(c["video_path"]) for c in clips} == {raw}
    assert state_of(work) == ["done", "done"]


# ---------------------------------------------------------------------------------------------
# 2. workspace faults

def test_workspace_that_is_a_file(tmp_path):
    f = tmp_path / "home[bold]"  # printed as it is, not as rich markup
    f.write_text("not a folder\n")
    line = one_line_error(*run("runs", env={"VIDU_HOME": str(f)})[::2])
    assert str(f) in line and "VIDU_HOME" in line and "is a file" in line
    line = one_line_error(*run("prefilter", str(tmp_path), "--workdir", str(f), "-q")[::2])
    assert str(f) in line and "--workdir" in line
    code, _, err = run("runs", env={"VIDU_HOME": str(tmp_path / "fresh")})  # negative control
    assert code == 0, err


def test_workspace_with_a_non_utf8_name(tmp_path):
    work = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"w\xe9"))
    line = one_line_error(*run("runs", "--workdir", work)[::2])
    assert line == (f"error: workspace {tmp_path}/w\ufffdDCE9 (from --workdir) has a name that is not UTF-8, which "
                    f"the DuckDB catalog cannot open: pass --workdir DIR (or set VIDU_HOME) to a folder with a UTF-8 "
                    f"name")


def test_read_only_workspace_chmod(src, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not block writes (the EROFS case below covers the message)")
    work = tmp_path / "w"
    workspace(work)
    os.chmod(work / "runs", 0o555)
    try:
        line = one_line_error(*run("prefilter", str(src), "--workdir", str(work), "-q")[::2])
    finally:
        os.chmod(work / "runs", 0o755)
    assert str(work) in line and "permission" in line and "--workdir" in line


def test_read_only_file_system(src, tmp_path, monkeypatch):
    work = tmp_path / "w"
    workspace(work)
    real = os.open

    def erofs(path, flags, *a, **kw):  # what a read-only mount answers to a file creation under it
        if flags & os.O_CREAT and os.fsdecode(path).startswith(str(work)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", erofs)
    line = one_line_error(*run("prefilter", str(src), "--workdir", str(work), "-q")[::2])
    assert str(work) in line and "read-only file system" in line and "--workdir" in line
    monkeypatch.undo()
    assert catalog.runs(work) == []  # nothing was started


def test_disk_full_mid_run_then_resume(src, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "FLUSH_ROWS", 1)  # one resume point per item
    clean = tmp_path / "clean"
    code, out, err = run("prefilter", str(src), "--workdir", str(clean), "-q", "--min-short-side", "64")
    assert code == 0, err
    expected = manifest_rows(out)

    work = tmp_path / "w"
    real = os.replace
    calls = []

    def full_after_two(a, b, *x, **kw):
        if os.fsdecode(b).startswith(str(work / "runs")):
            calls.append(b)
            if len(calls) > 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(a, b, *x, **kw)

    monkeypatch.setattr(os, "replace", full_after_two)
    line = one_line_error(*run("prefilter", str(src), "--workdir", str(work), "-q", "--min-short-side", "64")[::2])
    assert "no space left" in line and str(work / "runs") in line and "part-000002.parquet" in line
    assert "free some space" in line
    assert state_of(work) == ["failed"]  # recorded, not left running
    (run_dir,) = (work / "runs").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]

    monkeypatch.setattr(os, "replace", real)  # space freed
    code, out, err = run("prefilter", str(src), "--workdir", str(work), "-q", "--min-short-side", "64")
    assert code == 0, err
    assert manifest_rows(out) == expected
    (rec,) = catalog.runs(work)
    assert rec["state"] == "done" and rec["rows_reused"] == 2 and rec["attempts"] == 2


def test_corrupt_catalog_is_named_at_once(tmp_path, monkeypatch):
    work = tmp_path / "w"
    workspace(work)
    (work / "catalog.duckdb").write_bytes(b"\x00garbage" * 4096)
    waits, sleep = [], time.sleep

    def pause(seconds):  # the catalog's lock-retry loop pauses through time.sleep; others pass through
        if sys._getframe(1).f_globals.get("__name__") == catalog.__name__:
            waits.append(seconds)
        sleep(seconds)

    monkeypatch.setattr(time, "sleep", pause)
    for args in (["runs"], ["sql", "SELECT 1"], ["prefilter", str(tmp_path / "nothing"), "-q"]):
        line = one_line_error(*run(*args, "--workdir", str(work))[::2])
        assert waits == [], args  # not retried as if it were locked
        assert "corrupt" in line and str(work / "catalog.duckdb") in line and "mv " in line, line
        assert "locked" not in line


def test_locked_catalog_is_still_waited_for():
    import duckdb
    lock = duckdb.IOException('IO Error: Could not set lock on file "/w/catalog.duckdb": Conflicting lock is held '
                              'in /usr/bin/python3 (PID 1)')
    assert catalog._open_error(Path("/w/catalog.duckdb"), lock) is None
    bad = duckdb.IOException('IO Error: The file "/w/catalog.duckdb" exists, but it is not a valid DuckDB file!')
    assert "corrupt" in str(catalog._open_error(Path("/w/catalog.duckdb"), bad))


def _interrupt_after(monkeypatch, n: int) -> None:
    """Stop the run (as Ctrl-C does) after `n` items have finished."""
    real = runner.execute

    def stopping(*a, **kw):
        for i, out in enumerate(real(*a, **kw)):
            if i == n:
                raise KeyboardInterrupt
            yield out

    monkeypatch.setattr(runner, "execute", stopping)


def test_damaged_part_file_is_set_aside_and_recomputed(src, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "FLUSH_ROWS", 1)
    clean = tmp_path / "clean"
    code, out, err = run("prefilter", str(src), "--workdir", str(clean), "-q")
    assert code == 0, err
    expected = manifest_rows(out)

    work = tmp_path / "w"
    with monkeypatch.context() as m:
        _interrupt_after(m, 4)
        code, _, err = run("prefilter", str(src), "--workdir", str(work), "-q")
    assert code == 130 and state_of(work) == ["interrupted"], err
    (run_dir,) = (work / "runs").iterdir()
    parts = sorted(run_dir.glob("part-*.parquet"))
    assert len(parts) == 4
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])  # a write torn by a crash of the disk or the machine

    code, out, err = run("prefilter", str(src), "--workdir", str(work))
    assert code == 0, err
    assert manifest_rows(out) == expected
    (rec,) = catalog.runs(work)
    assert rec["state"] == "done" and rec["rows_reused"] == 3  # the damaged part's row was done again
    aside = work / "corrupt" / f"{run_dir.name}-part-000001.parquet"
    assert aside.read_bytes() == data[: len(data) // 2]
    warning = [ln for ln in err.splitlines() if "damaged" in ln]
    assert len(warning) == 1 and str(parts[1]) in warning[0] and str(aside) in warning[0]


def test_damaged_manifest_is_set_aside_and_recomputed(src, tmp_path):
    work = tmp_path / "w"
    code, out, err = run("prefilter", str(src), "--workdir", str(work), "-q")
    assert code == 0, err
    expected = manifest_rows(out)
    manifest = Path(out.strip())
    manifest.write_bytes(manifest.read_bytes()[:100])
    code, out2, err = run("prefilter", str(src), "--workdir", str(work))
    assert code == 0, err
    assert out2 == out and manifest_rows(out2) == expected
    assert (work / "corrupt" / manifest.name).stat().st_size == 100
    assert "not a readable Parquet manifest" in err and str(manifest) in err


def test_failing_stage_is_recorded_failed_and_one_line(src, tmp_path, monkeypatch):
    from stages.prefilter import Prefilter

    def broken_setup(self):
        raise RuntimeError("model folder vanished")

    monkeypatch.setattr(Prefilter, "setup", broken_setup)
    work = tmp_path / "w"
    line = one_line_error(*run("prefilter", str(src), "--workdir", str(work), "-q")[::2])
    assert line == ("error: unexpected RuntimeError: model folder vanished (a bug; VIDU_DEBUG=1 shows the "
                    "traceback)")
    assert state_of(work) == ["failed"]


# ---------------------------------------------------------------------------------------------
# 3. vidu sql is read-only; --version

@pytest.fixture
def filled(src, tmp_path) -> Path:
    work = tmp_path / "w"
    code, _, err = run("prefilter", str(src), "--workdir", str(work), "-q")
    assert code == 0, err
    return work


def test_sql_refuses_changes_and_file_writes(filled, tmp_path):
    w = ["--workdir", str(filled), "--format", "csv"]
    code, out, err = run("sql", "SELECT count(*) AS n FROM prefilter", *w)  # negative control
    assert code == 0 and out.split() == ["n", "6"], err
    line = one_line_error(*run("sql", "DROP VIEW prefilter", *w)[::2])
    assert "DROP statements are refused" in line and "read-only" in line
    for q in ("CREATE TABLE t AS SELECT 1", "SET threads = 1", "ATTACH 'x.db'", "SELECT 1; DROP TABLE runs"):
        assert "refused" in one_line_error(*run("sql", q, *w)[::2]), q
    target = tmp_path / "out.csv"
    for q in (f"COPY (SELECT id FROM prefilter) TO '{target}'", f"EXPLAIN ANALYZE COPY runs TO '{target}'",
              f"EXPORT DATABASE '{tmp_path / 'dump'}'"):
        line = one_line_error(*run("sql", q, *w)[::2])
        assert "--allow-write-files" in line, q
    assert not target.exists() and not (tmp_path / "dump").exists()
    code, _, err = run("sql", f"COPY (SELECT id FROM prefilter ORDER BY id) TO '{target}'", "--allow-write-files",
                       *w)
    assert code == 0, err
    assert len(target.read_text().split()) == 7  # header + 6 rows
    code, out, err = run("sql", "SELECT count(*) AS n FROM prefilter", *w)  # the views are still there
    assert code == 0 and out.split() == ["n", "6"], err


@pytest.mark.parametrize("q", ["", "   ", "/* nothing */", ";"])
def test_sql_empty_query_is_a_usage_error(q, tmp_path):
    line = one_line_error(*run("sql", q, "--workdir", str(tmp_path / "w"))[::2])
    assert line == 'error: empty query: give a SQL statement, e.g. vidu sql "SELECT * FROM runs"'


def test_version():
    code, out, err = run("--version")
    assert code == 0 and out == f"vidu {importlib.metadata.version('vidu')}\n", err


def test_part_with_a_wrong_item_list_is_not_trusted(tmp_path):
    from manifests.io import to_table, write_table
    from stages.run.contract import base_row

    run_dir = tmp_path / "runs" / "prefilter-x"
    good = [base_row("videos", id="a", path="/a"), base_row("videos", id="b", path="/b")]
    write_table(to_table(good, "videos"), run_dir / "part-000000.parquet", {"items": [["a", 1], ["b", 1]]})
    for i, items in enumerate([[["c", 5]], None, [["c"]], "junk"], start=1):
        write_table(to_table(good, "videos"), run_dir / f"part-{i:06d}.parquet", {"items": items})
    said = []
    done, next_index = runner._read_parts(run_dir, "videos", tmp_path, said.append)
    assert sorted(done) == ["a", "b"] and done["b"] == [good[1]]
    assert next_index == 5 and len(said) == 4
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == [
        f"prefilter-x-part-{i:06d}.parquet" for i in range(1, 5)]
