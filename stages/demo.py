"""`vidu demo`: the avatar demo (the starter model streams a generated character that talks and is
told what to do, scored by `vidu eval`), and `vidu demo curation`: make a small sample set with known
facts and run prefilter then clip on it.

The avatar demo is `vidu eval --bench synth --ckpt <the starter model>` on one held-out case: the
synthetic world draws a character (its reference image), a voice says a script (espeak-ng) and
instructions are typed at the script's times; `vidu stream`'s engine makes the video with its audio
(an mp4), and the bench scores it against the world's ground truth.

The curation set: a talking video with hard cuts (path with spaces), a long single-shot monologue, a
smaller re-encode of it (near-duplicate), an exact copy under a non-ASCII name (duplicate), a
video without audio, a truncated file and a text file.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from manifests.io import file_digest, ok_rows, read_manifest
from stages.clip import Clip
from stages.prefilter import Prefilter, discover, fingerprint
from stages.run import RunResult, run_stage
from stages.synth.media import talking_video, transcode

DEMO_CLIP_MAX_LEN = 12.0  # seconds: short enough that the 30 s monologue is split in silence
AVATAR_SECONDS = 6.0      # the avatar demo's script (~1.5 min to stream on a 2-core CPU)


def run_avatar_demo(root: Path, seconds: float = AVATAR_SECONDS, device: str = "cpu", quiet: bool = False,
                    ckpt: str | Path | None = None) -> dict:
    """Stream held-out synth case 0 for `seconds` through `ckpt` (default: the starter model) and score
    it. Returns {"samples": RunResult, "eval": RunResult, "row": the eval row, "case": the sample row}."""
    from models.starter import starter_checkpoint
    from stages.eval.bench import run_bench
    ckpt = ckpt or starter_checkpoint()
    s_res, e_res = run_bench("synth", root, ckpt=str(ckpt), limit=1, seconds=seconds, device=device, quiet=quiet)
    (row,) = ok_rows(read_manifest(e_res.path)[0])
    (case,) = ok_rows(read_manifest(s_res.path)[0])
    return {"samples": s_res, "eval": e_res, "row": row, "case": case}


def make_sample_set(folder: Path) -> dict:
    """Write the sample set (once; reused when its facts file exists) and return its facts."""
    facts_file = folder.with_suffix(".json")
    if facts_file.is_file():
        return json.loads(facts_file.read_text())
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(2026)
    facts = {
        "interview with cuts.mp4": talking_video(tmp / "interview with cuts.mp4", rng, [7.0, 6.0, 8.0]),
        "monologue.mp4": talking_video(tmp / "monologue.mp4", rng, [30.0]),
        "b-roll without audio.mp4": talking_video(tmp / "b-roll without audio.mp4", rng, [6.0], with_audio=False),
    }
    transcode(tmp / "monologue.mp4", tmp / "monologue_480.mp4", 480, 270)
    shutil.copyfile(tmp / "interview with cuts.mp4", tmp / "интервью копия.mp4")
    data = (tmp / "interview with cuts.mp4").read_bytes()
    (tmp / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (tmp / "notes.txt").write_text("not a video\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    facts_file.write_text(json.dumps(facts, indent=1))
    return facts


def run_demo(root: Path, workers: int = 1, quiet: bool = False) -> tuple[RunResult, RunResult]:
    media = root / "demo-media"
    make_sample_set(media)
    items = discover([str(media)])
    pre = run_stage(Prefilter(), items, fingerprint(items), [str(media)], root, workers=workers, quiet=quiet)
    table, _ = read_manifest(pre.path)
    videos = [{"id": r["id"], "path": r["path"]} for r in ok_rows(table)]
    clip = run_stage(Clip(max_len=DEMO_CLIP_MAX_LEN), videos, [file_digest(pre.path)], [str(pre.path)], root,
                     workers=workers, quiet=quiet)
    return pre, clip
