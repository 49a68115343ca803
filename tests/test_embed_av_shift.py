"""`vidu embed` applies `vidu diarize --fix-av-offset`'s `av_shift_s`: a clip whose sound is heard
av_shift_s after its frames has its audio read that much later (the frames stay where they are)."""
from __future__ import annotations

from pathlib import Path

import pytest

VFR = "talking/retalking_1.mp4"


@pytest.fixture(scope="module")
def embed_stage(tmp_path_factory):
    from stages.embed import Embed

    stage = Embed(out=str(tmp_path_factory.mktemp("shards")), preset="tiny")
    stage.setup()
    return stage


def _embed(stage, path: Path, name: str, start: float, end: float, shift: float | None = None) -> list[dict]:
    from stages.samples import read_sample

    rows = stage.process({"id": name, "video_path": str(path), "start_s": start, "end_s": end, "av_shift_s": shift})
    assert all(r["status"] == "ok" for r in rows), rows
    return [read_sample(r) for r in rows]


def test_embed_reads_the_audio_av_shift_s_later(shared_media, embed_stage):
    """A clip marked av_shift_s = 0.5 (its sound is heard 0.5 s after its frames) gets the audio the
    same clip has 0.5 s later: wave and features equal, window by window; the frames are its own."""
    import torch

    path = shared_media / VFR
    shifted = _embed(embed_stage, path, "shifted", 0.5, 3.0, 0.5)
    later = _embed(embed_stage, path, "later", 1.0, 3.5)
    plain = _embed(embed_stage, path, "plain", 0.5, 3.0)
    assert len(shifted) == len(later) == len(plain) == 3                  # 2.5 s: three 0.68 s windows
    for s, l, p in zip(shifted, later, plain):
        assert torch.equal(s["wave"], l["wave"]) and torch.equal(s["audio"], l["audio"])
        assert torch.equal(s["video"], p["video"])                       # the frames do not move
        assert not torch.equal(s["wave"], p["wave"])                      # control: the shift did


def test_a_negative_shift_before_the_file_start_reads_silence(shared_media, embed_stage):
    """av_shift_s < 0 (sound early): the first window of a clip at 0 s reads 0.2 s of silence, then the
    file's audio from its start."""
    import torch
    from stages.sense.media import load_audio

    path = shared_media / VFR
    (s,) = _embed(embed_stage, path, "early", 0.0, 0.7, -0.2)
    full = torch.from_numpy(load_audio(path))
    assert torch.equal(s["wave"][:3200], torch.zeros(3200)) and torch.equal(s["wave"][3200:], full[:len(s["wave"]) - 3200])
