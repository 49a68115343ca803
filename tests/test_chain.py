"""The whole curation chain through a real shell pipe on ../shared/media:

    vidu prefilter media/ | vidu clip | vidu filter | vidu diarize | vidu caption | vidu embed

and the decisions it must make there: only the five talking clips come out as samples; the music-only
scenes and the animation stop at filter or diarize with their reasons; every run is in the catalog
with its input being the previous run's output.

The media folder is ../shared/media as links, except the 30 s animation: its first 11 s (stream-copied,
cuts at 1.29 and 5.79 s) give the same decisions (a too-short head, then shots without a person that
filter rejects) on two shots instead of five: prefilter | clip | filter on the animation alone took
27 s of CPU on the 30 s file and 20 s on the 11 s cut (wall times of the whole chain were lost in noise).

filter and diarize, the two stages that do most of the work (dlib faces, mouth tracks, speaker
embeddings), run on two worker processes, as on a real machine: measured on a 2-core VM, the chain
took 114 s in one process a stage and 93 s this way (their decisions do not depend on the workers)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from manifests.io import read_manifest
from stages.sense.media import ffmpeg_exe

pytestmark = pytest.mark.slow
BUNNY = "big_buck_bunny_0_30.webm"


def media_folder(shared_media: Path, dest: Path) -> Path:
    """../shared/media linked file by file, with the animation cut to its first 11 s."""
    for src in sorted(shared_media.rglob("*")):
        if src.is_file():
            out = dest / src.relative_to(shared_media)
            out.parent.mkdir(parents=True, exist_ok=True)
            if src.name == BUNNY:
                subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(src), "-t", "11", "-c", "copy",
                                str(out.with_name("big_buck_bunny_0_11.webm"))], check=True)
            else:
                os.symlink(src, out)
    return dest


@pytest.fixture(scope="module")
def chain(shared_media, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("chain")
    media = media_folder(shared_media, tmp_path_factory.mktemp("media"))
    vidu = f"{shlex.quote(sys.executable)} -m vidu_cli"
    common = f"--workdir {shlex.quote(str(work))} --quiet"
    steps = [f"{vidu} prefilter {shlex.quote(str(media))} {common}",
             f"{vidu} clip {common}", f"{vidu} filter --workers 2 {common}", f"{vidu} diarize --workers 2 {common}",
             f"{vidu} caption {common}", f"{vidu} embed --preset tiny {common}"]
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", " | ".join(steps)], capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    con = duckdb.connect(str(work / "catalog.duckdb"), read_only=True)
    runs = con.execute("SELECT stage, output, inputs, state FROM runs ORDER BY started_at").fetchall()
    con.close()
    return {"work": work, "samples": Path(proc.stdout.strip()), "runs": runs}


def _rows(path) -> list[dict]:
    return read_manifest(path)[0].to_pylist()


def test_chain_runs_every_stage_on_the_previous_output(chain):
    runs = chain["runs"]
    assert [r[0] for r in runs] == ["prefilter", "clip", "filter", "diarize", "caption", "embed"]
    assert all(r[3] == "done" for r in runs)
    for (_, out, _, _), (_, _, inputs, _) in zip(runs, runs[1:]):
        assert json.loads(inputs) == [out]
    assert Path(runs[-1][1]) == chain["samples"]


def test_chain_keeps_exactly_the_talking_clips(chain):
    by_stage = {r[0]: _rows(r[1]) for r in chain["runs"]}
    talking = {f"retalking_{i}" for i in range(1, 6)}

    def name(row: dict) -> str:
        return Path(row["video_path"]).stem

    filtered = by_stage["filter"]
    assert {name(r) for r in filtered if r["status"] == "ok"} >= talking
    assert sum(name(r).startswith("big_buck_bunny") for r in filtered) == 2    # the animation's two shots
    for r in filtered:
        if name(r).startswith("big_buck_bunny"):
            assert r["status"] == "rejected" and "no_subject" in r["reasons"], r["reasons"]
    diarized = by_stage["diarize"]
    assert {name(r) for r in diarized if r["status"] == "ok"} == talking
    for r in diarized:
        if name(r) in talking:
            assert r["speakers"] == 1 and r["onscreen_s"] > 2.5
        else:
            assert r["status"] == "rejected" and "no_speech" in r["reasons"], (name(r), r["reasons"])
    captioned = by_stage["caption"]
    assert {name(r) for r in captioned} == talking
    assert all(r["caption_source"] == "measured" and r["chunk_captions"] for r in captioned)
    samples = _rows(chain["samples"])
    assert {Path(r["video_path"]).stem for r in samples if r["status"] == "ok"} == talking
