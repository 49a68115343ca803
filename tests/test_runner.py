"""Resumability: a run killed (SIGKILL) or interrupted (Ctrl-C) and re-run gives the same
manifest as an uninterrupted run; workers give the same rows as one process. The stopped run is a
real process (it gets the signal); the resumed and the uninterrupted runs are in process."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from manifests import catalog
from manifests.io import read_manifest, workspace
from stages.prefilter import Prefilter, discover, fingerprint
from stages.run import run_stage
from tests.conftest import cli


@pytest.fixture(scope="module")
def many(gen_media, tmp_path_factory) -> Path:
    """3,000 small non-media files and a few real videos: a run that takes a few seconds."""
    d = tmp_path_factory.mktemp("many")
    for i in range(3000):
        (d / f"n{i:04d}.txt").write_text(f"row {i}\n" * (i % 5))
    for name in ("talk with cuts.mp4", "talk_small.mp4", "silent.mp4", "damaged.mp4"):
        shutil.copyfile(gen_media["dir"] / name, d / name)
    return d


def _start(src: Path, work: Path) -> subprocess.Popen:
    env = dict(os.environ, VIDU_FLUSH_SECONDS="0.05")
    return subprocess.Popen([sys.executable, "-m", "vidu_cli", "prefilter", str(src), "--workdir", str(work),
                             "--min-short-side", "100", "-q"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True,
                            preexec_fn=_as_in_a_terminal)


def _as_in_a_terminal() -> None:
    """A shell's background job starts with SIGINT ignored (and a runner may block it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _wait_for_parts(work: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while len(list(work.glob("runs/*/part-*.parquet"))) < n:
        assert proc.poll() is None, "the run finished before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted(many, tmp_path_factory) -> list[dict]:
    """The rows of one run over `many` that nothing stopped (shared by the stop-and-resume tests)."""
    return _uninterrupted(many, tmp_path_factory.mktemp("clean"))


def _uninterrupted(src: Path, work: Path) -> list[dict]:
    proc = cli("prefilter", str(src), "--workdir", str(work), "--min-short-side", "100", "-q")
    return read_manifest(proc.stdout.strip())[0].to_pylist()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_stop_and_resume_equals_uninterrupted(many, uninterrupted, tmp_path, sig):
    work = tmp_path / "stopped"
    proc = _start(many, work)
    _wait_for_parts(work, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "run the same command again to resume" in err
        assert catalog.runs(work)[0]["state"] == "interrupted"
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not list(work.glob("manifests/*.parquet"))  # no half-written manifest
    resumed = _uninterrupted(many, work)
    (run,) = catalog.runs(work)
    assert run["state"] == "done" and run["attempts"] == 2 and 0 < run["rows_reused"] < len(resumed)
    assert resumed == uninterrupted
    assert len({r["id"] for r in resumed}) == len(resumed) == 3004
    assert not list(work.glob("runs/*"))  # resume points are removed once the manifest is written


def test_workers_give_the_same_rows(gen_media, tmp_path):
    items = discover([str(gen_media["dir"])])
    one = run_stage(Prefilter(min_short_side=100), items, fingerprint(items), ["g"], workspace(tmp_path / "a"),
                    workers=1, quiet=True)
    two = run_stage(Prefilter(min_short_side=100), items, fingerprint(items), ["g"], workspace(tmp_path / "b"),
                    workers=2, quiet=True)
    assert read_manifest(one.path)[0].to_pylist() == read_manifest(two.path)[0].to_pylist()


def test_sigterm_stops_like_ctrl_c_and_resumes(many, uninterrupted, tmp_path):
    """docker stop / systemd send SIGTERM: rows so far are saved, the run is recorded as interrupted
    (not left "running"), exit 143, and the re-run equals an uninterrupted one."""
    work = tmp_path / "stopped"
    proc = _start(many, work)
    _wait_for_parts(work, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "run the same command again to resume" in err, err
    assert [r["state"] for r in catalog.runs(work)] == ["interrupted"]
    assert not list(work.glob("manifests/*.parquet"))
    resumed = _uninterrupted(many, work)
    (run,) = catalog.runs(work)
    assert run["state"] == "done" and run["attempts"] == 2 and 0 < run["rows_reused"] < len(resumed)
    assert resumed == uninterrupted


def test_declared_columns_are_checked_before_any_work(tmp_path):
    """A stage's `writes` must be columns of its output kind, and items must carry what it `reads`."""
    import dataclasses
    from typing import ClassVar

    import pytest
    from manifests.schemas import SCHEMAS
    from stages.run import Stage
    from stages.run.contract import check_columns
    from stages.caption import Caption
    from stages.clip import Clip
    from stages.diarize import Diarize
    from stages.embed import Embed
    from stages.filter import Filter
    from stages.prefilter import Prefilter
    from stages.synth import Synth

    for cls in (Prefilter, Clip, Filter, Diarize, Caption, Embed, Synth):
        assert set(cls.writes) <= set(SCHEMAS[cls.kind].names), cls.name
        assert set(cls.reads) <= set(SCHEMAS["clips"].names) | {"path", "seed"}, cls.name
    # the chain stages' writes are exactly the columns their kind adds over the kind before it
    assert set(Filter.writes) == set(SCHEMAS["filtered"].names) - set(SCHEMAS["clips"].names)
    assert set(Diarize.writes) == set(SCHEMAS["diarized"].names) - set(SCHEMAS["filtered"].names)
    assert set(Caption.writes) == set(SCHEMAS["captioned"].names) - set(SCHEMAS["diarized"].names)

    check_columns(Clip(), [{"id": "a", "path": "x.mp4"}])
    with pytest.raises(ValueError, match=r"^clip needs input column\(s\) path; "):
        check_columns(Clip(), [{"id": "a"}])

    @dataclasses.dataclass
    class Wrong(Stage):
        name: ClassVar[str] = "wrong"
        kind: ClassVar[str] = "clips"
        version: ClassVar[str] = "1"
        reads: ClassVar[tuple[str, ...]] = ()
        writes: ClassVar[tuple[str, ...]] = ("start_s", "no_such_column")

    with pytest.raises(ValueError, match="writes no_such_column, not in the clips schema"):
        check_columns(Wrong(), [])
