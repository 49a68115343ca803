"""`vidu eval --bench synth|streambench|hdtf`: benchmark runners.

    from stages.eval.bench import run_bench
    samples, results = run_bench("synth", root, limit=2, seconds=1.0)          # random tiny weights
    samples, results = run_bench("synth", root, ckpt="oracle", limit=2)         # the ground truth itself
    samples, results = run_bench("hdtf", root, data="hdtf/", ckpt="causal.safetensors")

Two stage runs, both resumable and in the catalog: `bench_samples` writes the samples (cases.py), `eval`
streams and scores each one for one system (runner.py) into a results manifest of kind "eval".
Reports and comparisons: stages/eval/report.py; blinded A/B votes: stages/eval/ab.py.
"""
from __future__ import annotations

import os
from pathlib import Path

from manifests.io import ok_rows, read_manifest
from stages.eval.bench.cases import BENCHES, SYNTH_BENCHES, BenchError, BenchSamples, bench_items, fingerprint
from stages.eval.bench.runner import ORACLE, EvalBench, system_name
from stages.run import RunResult

__all__ = ["BENCHES", "BenchError", "DEFAULT_CASES", "ORACLE", "run_bench"]

DEFAULT_CASES = {**dict.fromkeys(SYNTH_BENCHES, 20), "streambench": 8}  # generated samples when --limit is not given


def _file_stat(path: str | None) -> list:
    if not path or path == ORACLE:
        return []
    try:
        st = os.stat(path)
    except OSError:
        raise BenchError(f"--ckpt {path}: no such file") from None
    from models.checkpoint import checkpoint_config
    try:
        checkpoint_config(path)  # reads the header: a file that is no checkpoint fails here, not per sample
    except Exception as e:  # CheckpointError, or what safetensors raises for another format
        raise BenchError(f"--ckpt {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def run_bench(bench: str, root: Path, data: str | None = None, ckpt: str | None = None, preset: str = "tiny",
              limit: int | None = None, workers: int = 1, quiet: bool = True, seconds: float | None = None,
              size: int = 256, device: str = "cpu", steps: int | None = None, chunk_frames: int | None = None,
              window: int | None = None, decoder_weights: str | None = None, text_encoder_path: str | None = None,
              arcface: str | None = None, judge: str | None = None, seed: int = 0,
              drift_segments: int = 4, sampler: str | None = None,
              guidance: float | None = None, guide: str | None = None,
              recache: bool | None = None, kernels: bool | None = None,
              attention: str = "sdpa") -> tuple[RunResult, RunResult]:
    """Index the benchmark's samples, then stream and score them; (samples run, eval run).
    `seconds`: generated clip length (default 4 s), or the most audio used per folder sample (default all)."""
    from stages.run import run_stage                  # the runner (DuckDB) only here: the bench's cases and
    from stages.run.runner import run_id_for          # scoring import on a machine without it (the GPU image)
    if limit is not None and limit < 1:
        raise BenchError(f"--limit must be at least 1, not {limit}")
    if seconds is not None and seconds <= 0:
        raise BenchError(f"--seconds must be > 0, not {seconds:g}")
    ckpt_stat = _file_stat(ckpt)
    items = bench_items(bench, limit or DEFAULT_CASES.get(bench, 0), data)
    items = items[:limit] if limit else items
    generated = bench in SYNTH_BENCHES or (bench == "streambench" and not data)
    samples = BenchSamples(bench=bench, size=size, seconds=seconds if seconds is not None else (4.0 if generated else 0.0))
    samples.out_dir = str(root / "bench" / run_id_for(samples, fingerprint(items)))
    s_res = run_stage(samples, items, fingerprint(items), [str(Path(data).resolve()) if data else f"builtin:{bench}"],
                      root, workers=workers, quiet=quiet)
    table, _ = read_manifest(s_res.path)
    rows = ok_rows(table)
    if not rows:
        raise BenchError(f"no usable samples in the {bench} benchmark ({s_res.path})")
    stage = EvalBench(bench=bench, system=system_name(ckpt, preset), preset=preset, steps=steps,
                      chunk_frames=chunk_frames, window=window, decoder_weights=decoder_weights,
                      text_encoder_path=text_encoder_path, seed=seed, device=device, arcface=arcface,
                      judge=judge, drift_segments=drift_segments, sampler=sampler, guidance=guidance,
                      guide=guide, recache=recache, kernels=kernels, attention=attention)
    fp = [s_res.run_id, ckpt_stat]
    stage.out_dir = str(root / "eval" / run_id_for(stage, fp))
    e_res = run_stage(stage, rows, fp, [str(s_res.path)], root, workers=workers, quiet=quiet)
    return s_res, e_res
