"""`vidu eval --bench | --compare | --ab`: the benchmark side of `vidu eval` (vidu_cli/eval.py parses the
options and calls these)."""
from __future__ import annotations

import time
from pathlib import Path

from manifests.io import workspace
from manifests.pipe import emit
from vidu_cli.report import err, fail


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def bench(name: str, data: Path | None, ckpt: str | None, preset: str, limit: int | None, workers: int,
          seconds: float | None, size: int, device: str, steps: int | None, chunk_frames: int | None,
          window: int | None, decoder_weights: Path | None, text_encoder_path: Path | None, arcface: Path | None,
          seed: int, report: Path | None, workdir: Path | None, quiet: bool, drift_segments: int = 4,
          judge: Path | None = None, sampler: str | None = None, guidance: float | None = None,
          guide: str | None = None, recache: bool | None = None, kernels: bool | None = None,
          attention: str = "sdpa") -> None:
    """Run one benchmark for one system; the results manifest path on stdout, the table on stderr."""
    from stages.eval.bench import run_bench
    from stages.eval.report import load_runs, summary_table, write_report
    root = workspace(workdir)
    s, e = run_bench(name, root, data=str(data) if data else None, ckpt=ckpt, preset=preset, limit=limit,
                     workers=workers, quiet=quiet, seconds=seconds, size=size, device=_device(device), steps=steps,
                     chunk_frames=chunk_frames, window=window,
                     decoder_weights=str(decoder_weights) if decoder_weights else None,
                     text_encoder_path=str(text_encoder_path) if text_encoder_path else None,
                     arcface=str(arcface) if arcface else None, judge=str(judge) if judge else None, seed=seed,
                     drift_segments=drift_segments, sampler=sampler, guidance=guidance, guide=guide,
                     recache=recache, kernels=kernels, attention=attention)
    runs = load_runs(root, [str(e.path)])
    if not quiet:
        skipped = s.counts.get("rejected", 0) + s.counts.get("error", 0)
        if skipped:
            err.print(f"{skipped} of the {name} samples were not usable: see `vidu show {s.run_id} --status rejected`",
                      highlight=False)
        err.print(summary_table(runs))
    if report:
        path = write_report(runs, report)
        err.print(f"report: {path}", highlight=False)
    emit(e.path)


def compare(refs: list[str], report: Path | None, workdir: Path | None) -> None:
    """Runs side by side: the table on stdout, and the HTML report with --report."""
    from rich.console import Console
    from stages.eval.report import load_runs, summary_table, write_report
    root = workspace(workdir)
    runs = load_runs(root, refs)
    Console().print(summary_table(runs))
    if report:
        err.print(f"report: {write_report(runs, report)}", highlight=False)


def ab(run_a: str, run_b: str, host: str, port: int, seed: int | None, workdir: Path | None) -> None:
    """Serve the blinded A/B page until Ctrl-C, then print the preference rates."""
    from rich.console import Console
    from rich.table import Table
    from stages.eval.ab import ABServer, ABSession
    from stages.eval.report import load_runs
    root = workspace(workdir)
    a, b = load_runs(root, [run_a, run_b])
    session = ABSession(root, a, b, seed=seed)
    with ABServer(session, host, port) as server:
        err.print(f"A/B page on {server.url} ({len(session.pairs)} pairs); Ctrl-C to stop", highlight=False)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    res = session.results()
    t = Table(title=f"A = {a.run_id}, B = {b.run_id}: {res['votes']} votes", title_justify="left")
    for col in ("criterion", "A", "B", "tie", "A preferred", "95% CI (Wilson)"):
        t.add_column(col, justify="right")
    for c, r in res["criteria"].items():
        ci = "-" if r["ci_low"] is None else f"{r['ci_low']:.2f}-{r['ci_high']:.2f}"
        t.add_row(c, str(r["a"]), str(r["b"]), str(r["tie"]), "-" if r["rate_a"] is None else f"{r['rate_a']:.1%}", ci)
    Console().print(t)


def check_modes(video: bool, bench_name: str | None, compare_runs: list[str] | None, ab_runs: list[str] | None) -> None:
    modes = [m for m, on in (("--video", video), ("--bench", bench_name), ("--compare", compare_runs),
                              ("--ab", ab_runs)) if on]
    if len(modes) > 1:
        fail(f"{' and '.join(modes)} cannot be combined: give one of --video, --bench, --compare, --ab")
    if ab_runs is not None and len(ab_runs) != 2:
        fail("--ab takes two runs: --ab RUN_A RUN_B")
