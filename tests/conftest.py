"""Shared fixtures: ../shared/media when present, generated media with known facts, and a
helper that runs the real `vidu` command."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages.media import ffmpeg_exe
from stages.synthmedia import talking_video, transcode

SHARED_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


@pytest.fixture(scope="session")
def shared_media() -> Path:
    if not SHARED_MEDIA.is_dir():
        pytest.skip("../shared/media is not present")
    return SHARED_MEDIA


@pytest.fixture(scope="session")
def gen_media(tmp_path_factory) -> dict:
    """Small generated files: a talking video with two hard cuts, its re-encode at another size,
    one without audio, a damaged one, a truncated faststart one, an empty file, a text file."""
    d = tmp_path_factory.mktemp("gen")
    rng = np.random.default_rng(7)
    facts = talking_video(d / "talk with cuts.mp4", rng, [4.0, 4.0, 4.0], size=(320, 180))
    transcode(d / "talk with cuts.mp4", d / "talk_small.mp4", 256, 144)
    talking_video(d / "silent.mp4", rng, [4.0], size=(320, 180), with_audio=False)
    data = (d / "talk with cuts.mp4").read_bytes()
    (d / "damaged.mp4").write_bytes(data[: len(data) // 2])  # moov atom is at the end: cut off
    faststart = d.parent / "faststart.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(d / "talk with cuts.mp4"), "-c", "copy", "-movflags",
                    "+faststart", str(faststart)], check=True)
    fs = faststart.read_bytes()
    (d / "truncated.mp4").write_bytes(fs[: len(fs) // 2])
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.txt").write_text("hello\n")
    return {"dir": d, "facts": facts}


def vidu(*args: str, cwd: Path | None = None, input: str | None = None, check: bool = True,
         timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (stdin closed unless `input` is given)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "vidu_cli", *args], cwd=cwd, input=input, capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"vidu {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def vidu_bin() -> str:
    exe = shutil.which("vidu", path=str(Path(sys.executable).parent))
    assert exe, "the vidu console script is not installed next to this python"
    return exe
