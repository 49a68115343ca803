"""Every Triton kernel of vidu_kernels against the PyTorch path it replaces, at the model's real shapes (issue 18).

    python benchmarks/kernel_bench.py                 # GPU: every case of benchmarks/kernel_cases/*.py
    python benchmarks/kernel_bench.py --only adaln    # the cases of one file
    python benchmarks/kernel_bench.py --device cpu    # CPU rehearsal of the plumbing: the launchers fall back to
                                                 # their torch references (TRITON_INTERPRET unset), tiny shapes
    python benchmarks/kernel_bench.py --only sparse_attention --only w8a8   # issue 18's block map and W8A8 linear

Each file in benchmarks/kernel_cases/ has `cases(device) -> list[dict]`: "name", "torch" (today's path) and "ours"
(the kernel's launcher), callables without arguments (inputs drawn at random inside, never zeros), and optionally
"flops" or "bytes" (the work, for TFLOP/s or GB/s) and "err" (a float, or a callable returning one: the error the
case itself defines, e.g. against a float32 reference). Every case is checked before it is timed: the outputs
(a tensor or a tuple of them) must be finite and are compared with the torch path's as relative L2. Timing: the
median of triton.testing.do_bench (CUDA events, after warm-up, 100 ms of calls), each case timed twice for the
spread. On CUDA each case is also captured in a CUDA graph (both paths, after the warm-up, so autotuning is done) and
its replay timed once: "graph ms" is the GPU's time without the host's launch overhead, which eager timing includes
wherever the host takes longer to launch a call's kernels than the GPU to run them (small GEMMs, multi-launch paths);
a case whose capture fails records graph_error. A case that fails records its one-line error and the run goes on. Full results: $OUT/kernel_bench.json (or ./kernel_bench.json);
a table last.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CASES = Path(__file__).resolve().parent / "kernel_cases"


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"kernel_cases_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench(fn, device: str) -> float:
    """Median milliseconds of one call."""
    if device.startswith("cuda"):
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up call on a side stream, as torch.cuda.graphs asks): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_case(case: dict, device: str) -> dict:
    row = {"name": case["name"]}
    try:
        ref, ours = tensors(case["torch"]()), tensors(case["ours"]())
        if len(ref) != len(ours) or any(a.shape != b.shape for a, b in zip(ref, ours)):
            raise ValueError(f"outputs differ in shape: {[tuple(t.shape) for t in ours]} vs {[tuple(t.shape) for t in ref]}")
        if not all(torch.isfinite(t.float()).all() for t in ours):
            raise ValueError("non-finite output")
        row["rel_l2_vs_torch"] = max(rel_l2(a, b) for a, b in zip(ours, ref))
        err = case.get("err")
        if err is not None:
            row["err"] = float(err() if callable(err) else err)
        t_torch = [bench(case["torch"], device) for _ in range(2)]
        t_ours = [bench(case["ours"], device) for _ in range(2)]
        row.update(torch_ms=min(t_torch), ours_ms=min(t_ours), torch_ms_runs=t_torch, ours_ms_runs=t_ours,
                   speedup=min(t_torch) / min(t_ours))
        if case.get("flops"):
            row["ours_tflops"] = case["flops"] / (row["ours_ms"] * 1e-3) / 1e12
            row["torch_tflops"] = case["flops"] / (row["torch_ms"] * 1e-3) / 1e12
        if case.get("bytes"):
            row["ours_gbs"] = case["bytes"] / (row["ours_ms"] * 1e-3) / 1e9
            row["torch_gbs"] = case["bytes"] / (row["torch_ms"] * 1e-3) / 1e9
        if device.startswith("cuda"):
            try:
                g_torch, g_ours = graphed(case["torch"]), graphed(case["ours"])
                row.update(torch_graph_ms=bench(g_torch, device), ours_graph_ms=bench(g_ours, device))
                row["graph_speedup"] = row["torch_graph_ms"] / row["ours_graph_ms"]
                del g_torch, g_ours
            except Exception as e:  # noqa: BLE001
                row["graph_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    except Exception as e:  # noqa: BLE001  -- one case's failure is a row, not the end of the run
        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", action="append", default=[], help="a file of kernel_cases/ (stem); repeatable")
    a = ap.parse_args()
    t0 = time.perf_counter()
    rows, files = [], sorted(p for p in CASES.glob("*.py") if not p.name.startswith("_"))
    for path in files:
        if a.only and path.stem not in a.only:
            continue
        try:
            cases = load(path).cases(a.device)
        except Exception as e:  # noqa: BLE001
            rows.append({"file": path.stem, "name": "(cases)", "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        for case in cases:
            row = {"file": path.stem, **run_case(case, a.device)}
            rows.append(row)
            print(json.dumps(row, default=float), flush=True)
    info = {"device": a.device, "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - t0,
            "rows": rows}
    out = Path(os.environ.get("OUT", ".")) / "kernel_bench.json"
    out.write_text(json.dumps(info, indent=1, default=float))
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    print(f"\n{info['gpu'] or a.device}, torch {torch.__version__}, {info['seconds']:.0f} s")
    print("| file | case | torch ms | ours ms | speed-up | graph: torch ms | ours ms | speed-up | ours TFLOP/s or GB/s "
          "| rel L2 vs torch | err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['file']} | {r['name']} | failed: {r['error'][:120]} | | | | | | | | |")
            continue
        rate = f(r["ours_tflops"], 1) + " TF" if "ours_tflops" in r else f(r.get("ours_gbs"), 0) + " GB/s"
        graph = (f"{f(r.get('torch_graph_ms'))} | {f(r.get('ours_graph_ms'))} | {f(r.get('graph_speedup'), 2)}"
                 if "graph_error" not in r else f"capture failed: {r['graph_error'][:60]} | |")
        print(f"| {r['file']} | {r['name']} | {f(r['torch_ms'])} | {f(r['ours_ms'])} | {f(r['speedup'], 2)} | {graph} | "
              f"{rate} | {r['rel_l2_vs_torch']:.2e} | {f(r.get('err'), 4)} |")


if __name__ == "__main__":
    main()
