"""Benchmark reports: per-run summaries of "eval" manifests, a terminal table (rich) and an HTML
report with matplotlib plots (metric per sample, drift curves, latency histogram) as PNG files next
to it. Several runs go side by side (`vidu eval --compare RUN...`).

    runs = load_runs(root, ["eval-1a2b", "eval-3c4d"])    # run id prefixes or manifest paths
    console.print(summary_table(runs)); write_report(runs, Path("report/"))

Aggregates over a run's ok rows: means of per-sample scores; medians of the synth drift ratios (a
ratio to a near-zero first part is unstable), and the instruction drift pooled over events with its 95 %
interval (synthscore.instruction_drift); instruction success pooled over events (successes /
events), the relaxed instr_hit likewise; latency percentiles pooled over events and over chunks.
Synth rows with a character style also get these per style (`by_style`: synthscore.style_breakdown).
Scores of different identity embedders or sync methods are never put in one row: each gets its own.
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

import numpy as np

from manifests import catalog
from manifests.io import ManifestError, read_manifest
from stages.eval.bench.synthscore import instruction_drift, pooled, style_breakdown

SIZE_IN, DPI = (6.4, 3.4), 100
BLUE = (0.12, 0.31, 0.78)


@dataclass
class Run:
    run_id: str
    bench: str
    system: str
    rows: list[dict]  # every row of the manifest
    path: Path

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "ok"]

    @property
    def label(self) -> str:
        system = self.system if len(self.system) <= 28 else "..." + self.system[-25:]
        return f"{self.run_id} ({self.bench}, {system})"


def load_run(root: Path, ref: str) -> Run:
    """An eval run by run id (or unique prefix) in the catalog, or by manifest path."""
    path = Path(ref)
    if not path.is_file():
        found = catalog.find_run(root, ref)
        if found is None:
            raise ManifestError(f"no run {ref!r} in the catalog {root / 'catalog.duckdb'} (see `vidu runs`)")
        if found["kind"] != "eval":
            raise ManifestError(f"run {found['run_id']} is a {found['kind']} run, not an eval run")
        if found["state"] != "done":
            raise ManifestError(f"run {found['run_id']} is {found['state']}, not done: run it again to finish it")
        path = Path(found["output"])
    table, meta = read_manifest(path)
    if meta.get("kind") != "eval":
        raise ManifestError(f"{path} is a {meta.get('kind')} manifest, not an eval results manifest")
    rows = table.to_pylist()
    params = meta.get("params") or {}
    return Run(meta.get("run_id") or path.stem, params.get("bench", "?"), params.get("system", "?"), rows, path)


def load_runs(root: Path, refs: list[str]) -> list[Run]:
    runs = [load_run(root, r) for r in refs]
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise ManifestError(f"a run is named twice: {' '.join(ids)}")
    return runs


# ---------------------------------------------------------------------------------------------
# aggregates

def _mean(values) -> float | None:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def _pct(values, q: float) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.percentile(v, q)) if v else None


def summarize(run: Run) -> dict:
    """{metric: value} for one run (None where nothing was measured)."""
    ok = run.ok
    events = sum(r["instr_events"] or 0 for r in ok if r["instr_success"] is not None)
    lat = [x for r in ok for x in (r["instr_latency_s"] or [])]
    chunks = [x for r in ok for x in (r["chunk_ms"] or [])]
    out = {"samples": len(run.rows), "ok": len(ok), "failed": len(run.rows) - len(ok)}
    for k in ("identity", "sync_confidence", "sync_distance", "sync_offset_frames", "sharpness", "flicker",
              "face_found", "drift_identity", "drift_sharpness", "drift_motion", "mouth_r", "mouth_r_control",
              "identity_error", "spurious_per_min", "spurious_idle_per_min", "stream_fps", "first_frame_s",
              "action_sharpness_ratio", "action_identity_error"):
        out[k] = _mean(r.get(k) for r in ok)     # .get: runs scored before a column existed
    ratios = [json.loads(r["drift_ratios"] or "{}") for r in ok]
    for k in ("identity_error", "sharpness", "motion", "sync_r", "instructions"):  # ratios: median over samples
        out[f"ratio_{k}"] = _pct([d.get(k) for d in ratios], 50)
    drift = instruction_drift(ok)                  # the instruction ratio pooled over events, with its interval
    out.update(ratio_instructions_pooled=drift["ratio"], ratio_instructions_low=drift["low"],
               ratio_instructions_high=drift["high"])
    out["mouth_r_control_abs"] = _mean(abs(r["mouth_r_control"]) for r in ok if r["mouth_r_control"] is not None)
    out.update(instr_events=events, instr_success=pooled(ok), instr_hit=pooled(ok, "instr_hit"),
               instr_hit_chance=pooled(ok, "instr_hit_chance", counts=False),
               instr_latency_p50=_pct(lat, 50), instr_latency_p90=_pct(lat, 90),
               chunk_ms_p50=_pct(chunks, 50), chunk_ms_p90=_pct(chunks, 90), chunk_ms_p99=_pct(chunks, 99))
    out["identity_embedder"] = sorted({r["identity_embedder"] for r in ok if r["identity_embedder"]})
    out["sync_method"] = sorted({r["sync_method"] for r in ok if r["sync_method"]})
    out["by_style"] = style_breakdown(ok)
    return out


def confusion(run: Run) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for r in run.ok:
        for name, row in json.loads(r["confusion"] or "{}").items():
            for k, n in row.items():
                total.setdefault(name, {})[k] = total.setdefault(name, {}).get(k, 0) + n
    return total


# (key, label, format); rows whose values are all None are left out
METRICS = [
    ("ok", "samples scored", "{:.0f}"), ("failed", "samples failed", "{:.0f}"),
    ("identity", "identity (cosine) [{embedder}]", "{:.3f}"),
    ("face_found", "face found (share of frames)", "{:.2f}"),
    ("sync_confidence", "sync confidence [{sync}]", "{:.3f}"), ("sync_distance", "sync distance [{sync}]", "{:.3f}"),
    ("sync_offset_frames", "sync offset (frames) [{sync}]", "{:+.1f}"),
    ("mouth_r", "mouth r vs ground truth", "{:.3f}"), ("mouth_r_control_abs", "|mouth r| mismatched audio", "{:.3f}"),
    ("instr_success", "instruction success", "{:.1%}"), ("instr_events", "instruction events", "{:.0f}"),
    ("instr_hit", "... told class fired in 0-1 s, others allowed", "{:.1%}"),
    ("instr_hit_chance", "... the same by chance (that class in a 1-s window at random)", "{:.1%}"),
    ("instr_latency_p50", "instruction latency p50 (s)", "{:.2f}"),
    ("instr_latency_p90", "instruction latency p90 (s)", "{:.2f}"),
    ("spurious_per_min", "spurious actions / min", "{:.1f}"),
    ("spurious_idle_per_min", "... of them with no instruction in force", "{:.1f}"),
    ("identity_error", "identity error (RGB, synth)", "{:.1f}"),
    ("action_identity_error", "... on the frames of told actions", "{:.1f}"),
    ("action_sharpness_ratio", "sharpness during told actions / idle (synth)", "{:.2f}"),
    ("sharpness", "sharpness", "{:.4f}"), ("flicker", "flicker", "{:.4f}"),
    ("drift_identity", "drift: identity", "{:+.1%}"), ("drift_sharpness", "drift: sharpness", "{:+.1%}"),
    ("drift_motion", "drift: motion", "{:+.1%}"),
    ("ratio_identity_error", "synth drift (median), last/first 10 %: identity error", "{:.2f}"),
    ("ratio_sharpness", "synth drift (median), last/first 10 %: sharpness", "{:.2f}"),
    ("ratio_motion", "synth drift (median), last/first 10 %: motion", "{:.2f}"),
    ("ratio_sync_r", "synth drift (median), last/first 10 %: lip-sync r", "{:.2f}"),
    ("ratio_instructions", "synth drift (median), last/first 10 %: instructions", "{:.2f}"),
    ("ratio_instructions_pooled", "synth drift (pooled over events), last/first 10 %: instructions", "{:.2f}"),
    ("ratio_instructions_low", "... its 95 % interval, low", "{:.2f}"),
    ("ratio_instructions_high", "... its 95 % interval, high", "{:.2f}"),
    ("stream_fps", "stream fps", "{:.1f}"), ("first_frame_s", "first-frame latency (s)", "{:.2f}"),
    ("chunk_ms_p50", "chunk latency p50 (ms)", "{:.0f}"), ("chunk_ms_p90", "chunk latency p90 (ms)", "{:.0f}"),
    ("chunk_ms_p99", "chunk latency p99 (ms)", "{:.0f}"),
]
_BY_METHOD = {"identity": ("identity_embedder", "embedder"), "sync_confidence": ("sync_method", "sync"),
              "sync_distance": ("sync_method", "sync"), "sync_offset_frames": ("sync_method", "sync")}


# per character style (synth rows): (key of style_breakdown, label, format)
STYLE_METRICS = [
    ("clips", "samples", "{:.0f}"), ("instr_events", "instruction events", "{:.0f}"),
    ("instr_success", "instruction success", "{:.1%}"), ("instr_hit", "... others allowed", "{:.1%}"),
    ("mouth_r", "mouth r", "{:.3f}"), ("spurious_per_min", "spurious / min", "{:.1f}"),
    ("identity_error", "identity error", "{:.1f}"), ("action_sharpness_ratio", "sharpness told / idle", "{:.2f}"),
]


def table_rows(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """(label, one formatted cell per run): the comparison table, shared by the terminal and HTML."""
    sums = [summarize(r) for r in runs]
    out = []
    for key, label, fmt in METRICS:
        if key in _BY_METHOD:  # one row per embedder / method, never mixed
            field, slot = _BY_METHOD[key]
            methods = sorted({m for s in sums for m in s[field]})
            for m in methods:
                cells = [fmt.format(s[key]) if s[key] is not None and s[field] == [m] else "-" for s in sums]
                out.append((label.format(**{slot: m}), cells))
            continue
        vals = [s[key] for s in sums]
        if all(v is None for v in vals):
            continue
        out.append((label, [fmt.format(v) if v is not None else "-" for v in vals]))
    for style in sorted({k for s in sums for k in s["by_style"]}):
        for key, label, fmt in STYLE_METRICS:
            vals = [(s["by_style"].get(style) or {}).get(key) for s in sums]
            if any(v is not None for v in vals):
                out.append((f"{style}: {label}", [fmt.format(v) if v is not None else "-" for v in vals]))
    return out


def summary_table(runs: list[Run]):
    from rich.markup import escape
    from rich.table import Table
    t = Table(title="vidu eval" + (" (compare)" if len(runs) > 1 else ""), title_justify="left")
    t.add_column("metric")
    for r in runs:
        t.add_column(escape(r.label), justify="right", overflow="fold")
    for label, cells in table_rows(runs):
        t.add_row(escape(label), *cells)
    return t


# ---------------------------------------------------------------------------------------------
# plots

def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=SIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


PER_SAMPLE = [("mouth_r", "mouth r vs ground truth"), ("instr_success", "instruction success"),
              ("sync_confidence", "sync confidence"), ("identity", "identity (cosine)"), ("sharpness", "sharpness")]


def plot_per_sample(runs: list[Run], key: str, title: str, path: Path) -> Path | None:
    samples = sorted({r["sample_id"] for run in runs for r in run.ok if r[key] is not None})
    if not samples:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    x = np.arange(len(samples))
    for i, run in enumerate(runs):
        by = {r["sample_id"]: r[key] for r in run.ok}
        ys = [by.get(s) if by.get(s) is not None else np.nan for s in samples]
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, ys, width, label=run.run_id, color=f"C{i % 10}")
    ax.set_xticks(x, samples, rotation=30, ha="right", fontsize=7)
    ax.set_title(f"{title} per sample")
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_drift(runs: list[Run], path: Path) -> Path | None:
    """Mean per-segment curve of identity, sharpness and motion, each relative to its first segment."""
    from matplotlib.lines import Line2D
    fig = _figure()
    axes = fig.subplots(1, 3)
    drawn: set[int] = set()
    for ax, metric in zip(axes, ("identity", "sharpness", "motion")):
        for i, run in enumerate(runs):
            curves = [json.loads(r["curves"] or "{}").get(metric) for r in run.ok]
            curves = [np.array([np.nan if v is None else v for v in c], np.float64) for c in curves if c]
            rel = [c / c[0] for c in curves if len(c) and np.isfinite(c[0]) and abs(c[0]) > 1e-12]
            if not rel:
                continue
            n = min(len(c) for c in rel)
            mean = np.nanmean(np.stack([c[:n] for c in rel]), axis=0)
            ax.plot(np.arange(1, n + 1), mean, marker="o", color=f"C{i % 10}")
            drawn.add(i)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("segment", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("relative to segment 1", fontsize=8)
    if not drawn:
        return None
    fig.legend([Line2D([], [], color=f"C{i % 10}", marker="o") for i in sorted(drawn)],
               [runs[i].run_id for i in sorted(drawn)], loc="lower center", ncol=len(drawn), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def plot_latency(runs: list[Run], path: Path) -> Path | None:
    data = [(run.run_id, [x for r in run.ok for x in (r["chunk_ms"] or [])]) for run in runs]
    data = [(k, v) for k, v in data if v]
    if not data:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    hi = max(max(v) for _, v in data)
    bins = np.linspace(0, hi * 1.05, 30)
    for i, run in enumerate(runs):
        v = [x for r in run.ok for x in (r["chunk_ms"] or [])]
        if v:
            ax.hist(v, bins=bins, alpha=0.6, label=f"{run.run_id} ({len(v)} chunks)", color=f"C{i % 10}")
    ax.set_xlabel("chunk latency (ms)")
    ax.set_ylabel("chunks")
    ax.set_title("per-chunk latency")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# HTML

def _table_html(header: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _sample_rows(run: Run) -> list[list[str]]:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)
    return [[r["sample_id"], r["status"], ", ".join(r["reasons"]) or r["error"] or "", f(r["identity"]),
             f(r["sync_confidence"]), f(r["mouth_r"]), f(r["mouth_r_control"]), f(r["instr_success"], "{:.0%}"),
             f(r["sharpness"], "{:.4f}"), f(r["stream_fps"], "{:.1f}"), "; ".join(r["notes"] or [])]
            for r in run.rows]


def write_report(runs: list[Run], out: Path, title: str | None = None) -> Path:
    """Write out/index.html and its PNG plots; returns the HTML path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for key, label in PER_SAMPLE:
        p = plot_per_sample(runs, key, label, out / f"per-sample-{key}.png")
        if p:
            figures.append((p.name, f"{label} per sample"))
    for fn, name, alt in ((plot_drift, "drift.png", "drift curves (identity, sharpness, motion per segment)"),
                          (plot_latency, "latency.png", "per-chunk latency histogram")):
        p = fn(runs, out / name)
        if p:
            figures.append((p.name, alt))
    figs = "\n".join(f'<figure><img class="plot" src="{html.escape(n)}" alt="{html.escape(a)}">'
                     f"<figcaption>{html.escape(a)}</figcaption></figure>" for n, a in figures)
    summary = _table_html(["metric"] + [r.label for r in runs], [[k, *c] for k, c in table_rows(runs)])
    details = []
    for run in runs:
        details.append(f"<h3>{html.escape(run.label)}</h3>")
        details.append(_table_html(["sample", "status", "reasons / error", "identity", "sync conf.", "mouth r",
                                    "mouth r (control)", "instructions", "sharpness", "fps", "notes"],
                                   _sample_rows(run)))
        conf = confusion(run)
        if conf:
            cols = sorted({k for row in conf.values() for k in row})
            details.append("<p>instruction confusion (instructed \u2192 first detected)</p>")
            details.append(_table_html(["instructed"] + cols, [[n] + [str(conf[n].get(c, 0)) for c in cols]
                                                                for n in sorted(conf)]))
    page = Template(resources.files("stages.eval").joinpath("templates/report.html").read_text(encoding="utf-8"))
    text = page.substitute(title=html.escape(title or "vidu eval: " + ", ".join(r.run_id for r in runs)),
                           runs=html.escape(", ".join(f"{r.run_id} = {r.path}" for r in runs)),
                           summary=summary, figures=figs or "<p>no plots: nothing was measured</p>",
                           details="\n".join(details))
    path = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
