from __future__ import annotations

from pathlib import Path

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from manifests.io import read_manifest, workspace
from stages.demo import AVATAR_SECONDS, DEMO_CLIP_MAX_LEN, run_avatar_demo, run_demo
from vidu_cli.options import Quiet, Workdir, Workers
from vidu_cli.report import clean_errors, err

demo = typer.Typer(help="Demos: the avatar (default: the starter model streams a talking character and "
                        "vidu eval scores it) and the curation chain.\n\nExample: vidu demo --workdir /tmp/vidu-demo\n\n"
                        "Example: vidu demo curation --workdir /tmp/vidu-demo", add_completion=False)


@demo.callback(invoke_without_command=True)
def avatar(ctx: typer.Context,
           seconds: Annotated[float, typer.Option(min=1.0, max=120.0, help="Length of the script.")] = AVATAR_SECONDS,
           device: Annotated[str, typer.Option(help="auto | cpu | cuda (auto: cuda when available).")] = "auto",
           workdir: Workdir = None, quiet: Quiet = False) -> None:
    """The starter model streams a character of the synthetic world that talks (a script spoken by
    espeak-ng) and is told what to do at the script's times; the video goes to an mp4 with its audio and
    `vidu eval` scores it. `vidu demo curation` runs the curation demo.

    Example: vidu demo --workdir /tmp/vidu-demo
    """
    if ctx.invoked_subcommand is not None:
        return
    from vidu_cli.eval_bench import _device
    from stages.eval.report import load_runs, summary_table
    with clean_errors():
        root = workspace(workdir)
        if not quiet:
            err.print(f"streaming {seconds:g} s through the starter model on {_device(device)} "
                      "(10-20 s a second of video on a 2-core CPU)...", highlight=False)
        res = run_avatar_demo(root, seconds, _device(device), quiet=quiet)
        row, case = res["row"], res["case"]
        out = Console()
        out.print(summary_table(load_runs(root, [str(res["eval"].path)])))
        told = ", ".join(f"{text!r} at {a:.1f} s" for a, _, text in json.loads(case["events"] or "[]")) or "nothing"
        events = row.get("instr_events") or 0
        done = round((row.get("instr_success") or 0) * events)
        lines = [("character", case["image"]), ("speech", case["audio"]), ("told", told), ("video", row["video_path"]),
                 ("scores", f"lip-sync r {_num(row.get('mouth_r'))} (against another voice's speech "
                            f"{_num(row.get('mouth_r_control'))}), instructions followed {done} of {events}, "
                            f"identity error {_num(row.get('identity_error'))}"),
                 ("live", f"vidu stream --image '{case['image']}' --serve 127.0.0.1:8000, then open "
                          "http://127.0.0.1:8000 (type instructions, push to talk)")]
        out.print("\n".join(f"{k + ':':<11}{v}" for k, v in lines), highlight=False, soft_wrap=True)


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


@demo.command("curation")
def curation(workers: Workers = 1, workdir: Workdir = None, quiet: Quiet = False) -> None:
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
