from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from manifests.io import read_manifest, workspace
from stages.demo import DEMO_CLIP_MAX_LEN, run_demo
from vidu_cli.options import Quiet, Workdir, Workers
from vidu_cli.report import clean_errors


def demo(workers: Workers = 1, workdir: Workdir = None, quiet: Quiet = False) -> None:
    """Generate a small sample set (cuts, speech with pauses, a duplicate, a near-duplicate, a
    video without audio, a truncated file, a text file), run prefilter | clip on it, and print
    what each stage decided.

    Example: vidu demo --workdir /tmp/vidu-demo
    """
    with clean_errors():
        pre, clip = run_demo(workspace(workdir), workers=workers, quiet=quiet)
        out = Console()
        videos, _ = read_manifest(pre.path)
        t = Table(title=f"prefilter ({pre.run_id})", title_justify="left")
        for c in ("file", "status", "reasons", "size", "fps", "seconds", "audio"):
            t.add_column(c)
        for r in videos.to_pylist():
            size = f"{r['width']}x{r['height']}" if r["width"] else ""
            fps = f"{r['avg_fps']:.2f}" if r["avg_fps"] else ""
            secs = f"{r['video_duration_s']:.2f}" if r["video_duration_s"] else ""
            t.add_row(Path(r["path"]).name, r["status"], ", ".join(r["reasons"]), size, fps, secs, r["audio_codec"] or "")
        out.print(t)
        clips, _ = read_manifest(clip.path)
        names = {r["id"]: Path(r["path"]).name for r in videos.to_pylist()}
        t = Table(title=f"clip, max {DEMO_CLIP_MAX_LEN:g} s ({clip.run_id})", title_justify="left")
        for c in ("video", "clip", "status", "start s", "end s", "speech", "cut at start / end"):
            t.add_column(c)
        for r in clips.to_pylist():
            t.add_row(names.get(r["parent_id"], r["parent_id"]), str(r["clip_index"]), r["status"], f"{r['start_s']:.2f}",
                      f"{r['end_s']:.2f}", f"{r['speech_coverage']:.0%}", " / ".join(r["cut_reasons"]))
        out.print(t)
        out.print(f"manifests: {pre.path}\n           {clip.path}\nquery them: vidu sql \"SELECT * FROM clip\"",
                  highlight=False)
