"""The synth bench's breakdown numbers (stages/eval/bench/synthscore.py): quality on the frames of told
actions against idle frames, the relaxed instruction score beside the strict one, per-class counts, and the
per-character-style breakdown of `vidu eval`'s report (through a written and read-back eval manifest)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from stages.eval.bench.synthscore import (WINDOW_S, in_events, instruction_drift, instruction_scores, style_breakdown,
                                         synth_scores)

FPS = 25.0


@pytest.fixture(scope="module")
def case():
    """Synth bench case 0 for 4 s at the bench's 256 px: an animal told "turn right" at 1.54-3.13 s."""
    from stages.eval.bench.cases import synth_case
    s = synth_case(0, 256, 4.0)
    truth = json.loads(json.dumps(s.truth()))
    events = [(float(a), float(b), n) for a, b, n in truth["actions"]]
    return s.frames, truth, events


def _edit(frames: np.ndarray, mask: np.ndarray, blur: bool = True, tint: bool = False) -> np.ndarray:
    out = frames.copy()
    if blur:
        out[mask] = np.stack([cv2.GaussianBlur(f, (0, 0), 1.5) for f in out[mask]])
    if tint:
        out[mask] = np.clip(out[mask].astype(np.int16) + 40, 0, 255).astype(np.uint8)
    return out


def test_action_frames_quality(case):
    """Blurred and tinted during the told action only: its sharpness ratio collapses and its identity error
    rises; the same edit on the frames between the action's end and end + 1 s (in neither set) leaves both
    exactly the truth's; blurring the idle frames instead sends the ratio the other way."""
    frames, truth, events = case
    assert [n for _, _, n in events] == ["turn right"] and truth["identity"]["style"] == "animal"
    T = len(frames)
    action, near = in_events(T, FPS, events), in_events(T, FPS, events, WINDOW_S)
    a, b = events[0][:2]
    assert action.sum() == np.sum((np.arange(T) / FPS >= a) & (np.arange(T) / FPS <= b)) == 40
    assert (~near).sum() == 39 and (near & ~action).sum() == 22       # idle: 0-1.5 s; between: 3.16-4.0 s
    ref = synth_scores(frames, FPS, truth, None)
    assert ref["style"] == "animal"
    assert 0.9 < ref["action_sharpness_ratio"] < 1.1       # the ground truth: as sharp while it acts
    assert abs(ref["action_identity_error"] - ref["identity_error"]) < 1.0

    bad = synth_scores(_edit(frames, action, tint=True), FPS, truth, None)
    assert bad["action_sharpness_ratio"] < 0.1 * ref["action_sharpness_ratio"]
    assert bad["action_identity_error"] > 3 * ref["action_identity_error"]

    between = synth_scores(_edit(frames, near & ~action, tint=True), FPS, truth, None)
    assert between["action_sharpness_ratio"] == ref["action_sharpness_ratio"]
    assert between["action_identity_error"] == ref["action_identity_error"]
    assert between["identity_error"] > ref["identity_error"] + 3      # the edit is seen by the whole-clip number

    idle = synth_scores(_edit(frames, ~near), FPS, truth, None)
    assert idle["action_sharpness_ratio"] > 10 and idle["action_identity_error"] == ref["action_identity_error"]

    untold = synth_scores(frames, FPS, {**truth, "actions": []}, None)   # no action frames: not measured
    assert untold["action_sharpness_ratio"] is None and untold["action_identity_error"] is None
    assert untold["instr_hit"] is None and untold["instr_classes"] == {}


def _measures(T: int) -> dict[str, np.ndarray]:
    """An analysis (stages.synth.analyze's keys the detectors read) of T idle frames: eyes open, head level."""
    return {"found": np.ones(T, bool), "eyes": np.ones(T), "pitch": np.zeros(T), "yaw": np.zeros(T),
            "smile": np.zeros(T), "hand": np.zeros(T)}


def test_strict_and_relaxed_instruction_scores():
    """Three told events: a nod with a blink read in its window (strict fail, hit), a clean turn left
    (both), a smile that never comes (neither). Confusion says "nod" first for the nod, so the strict
    per-class count is not confusion's diagonal."""
    m = _measures(200)
    m["pitch"][30:45] = 0.8          # nod: fires at 1.2 s (told at 1.0 s)
    m["eyes"][38:41] = 0.1           # blink at 1.52 s, inside the nod's 0-1 s window
    m["yaw"][110:130] = -0.9         # turn left: fires at 4.4 s (told at 4.0 s)
    events = [(1.0, 2.0, "nod"), (4.0, 5.0, "turn left"), (6.0, 7.0, "smile")]
    s = instruction_scores(m, events, FPS)
    assert s["instr_events"] == 3
    assert s["instr_success"] == pytest.approx(1 / 3) and s["instr_hit"] == pytest.approx(2 / 3)
    assert s["confusion"] == {"nod": {"nod": 1}, "turn left": {"turn left": 1}, "smile": {"none": 1}}
    assert s["instr_classes"] == {"nod": {"told": 1, "success": 0, "hit": 1},
                                  "turn left": {"told": 1, "success": 1, "hit": 1},
                                  "smile": {"told": 1, "success": 0, "hit": 0}}
    assert s["instr_hit_chance"] == 0.0          # no class fires outside its own told windows
    assert s["instr_blockers"] == {"nod": {"blink": 1}}     # what the nod's strict fail was lost to
    # negative control: without the blink the nod passes the strict rule too
    m["eyes"][:] = 1.0
    s = instruction_scores(m, events, FPS)
    assert s["instr_success"] == pytest.approx(2 / 3) == s["instr_hit"] and s["instr_blockers"] == {}
    # a fire just past the window is no hit: the nod now starts 1.04 s after it was told
    m["pitch"][:] = 0.0
    m["pitch"][51:60] = 0.8
    assert instruction_scores(m, events, FPS)["instr_classes"]["nod"] == {"told": 1, "success": 0, "hit": 0}


def test_blockers_sum_over_rows_most_first():
    from stages.eval.bench.synthscore import blockers_summed
    rows = [{"instr_blockers": {"nod": {"blink": 1}, "shake head": {"blink": 1, "smile": 1}}},
            {"instr_blockers": json.dumps({"shake head": {"blink": 2, "turn left": 1}})},   # as a manifest row has it
            {"instr_blockers": None}, {}]                                                 # scored before it existed
    assert blockers_summed(rows) == {"nod": {"blink": 1}, "shake head": {"blink": 3, "smile": 1, "turn left": 1}}
    assert list(blockers_summed(rows)["shake head"]) == ["blink", "smile", "turn left"]
    assert blockers_summed(rows[2:]) == {}


def _row(style: str, events: int, success: float, hit: float, **extra) -> dict:
    return {"style": style, "instr_events": events, "instr_success": success, "instr_hit": hit,
            "mouth_r": extra.get("mouth_r"), "spurious_per_min": extra.get("spurious_per_min"),
            "identity_error": extra.get("identity_error"), "action_sharpness_ratio": extra.get("sharp"),
            "instr_classes": extra.get("classes", {})}


def test_style_breakdown_is_event_weighted():
    """Two human clips (3 events, 1 strict success; 1 event, 1 success) pool to 2 / 4, not the clips'
    mean 2 / 3; clips without events or a style stay out of the instruction numbers."""
    rows = [_row("human", 3, 1 / 3, 2 / 3, mouth_r=0.5, sharp=0.8, spurious_per_min=2.0, identity_error=10.0,
                 classes={"nod": {"told": 2, "success": 0, "hit": 1}, "blink": {"told": 1, "success": 1, "hit": 1}}),
            _row("human", 1, 1.0, 1.0, mouth_r=0.7, sharp=None, spurious_per_min=0.0, identity_error=20.0,
                 classes=json.dumps({"nod": {"told": 1, "success": 1, "hit": 1}})),   # as a manifest row has it
            _row("anime", 2, 0.0, 0.5, mouth_r=0.1, sharp=0.4, spurious_per_min=6.0, identity_error=30.0,
                 classes={"turn left": {"told": 2, "success": 0, "hit": 1}}),
            _row("anime", 0, None, None, mouth_r=0.3, sharp=0.6, spurious_per_min=0.0, identity_error=40.0),
            _row(None, 5, 1.0, 1.0, mouth_r=0.9)]
    by = style_breakdown(rows)
    assert list(by) == ["anime", "human"]
    h, a = by["human"], by["anime"]
    assert (h["clips"], h["instr_events"], h["instr_success"], h["instr_hit"]) == (2, 4, 0.5, 0.75)
    assert (h["mouth_r"], h["action_sharpness_ratio"], h["spurious_per_min"], h["identity_error"]) == \
        pytest.approx((0.6, 0.8, 1.0, 15.0))
    assert h["instr_classes"] == {"blink": {"told": 1, "success": 1, "hit": 1}, "nod": {"told": 3, "success": 1, "hit": 2}}
    assert (a["clips"], a["instr_events"], a["instr_success"], a["instr_hit"]) == (2, 2, 0.0, 0.5)
    assert (a["mouth_r"], a["action_sharpness_ratio"], a["identity_error"]) == pytest.approx((0.2, 0.5, 35.0))
    assert style_breakdown([_row(None, 1, 1.0, 1.0)]) == {}


def test_hit_chance_hand_computed_and_against_random_fires():
    """hit_chance: windows of 1 s starting at each frame (25 fps), over those clear of the class's told windows;
    on fires at random (rate 0.5 / s) it is the Poisson chance 1 - exp(-0.5) of a fire in 1 s."""
    from stages.eval.bench.synthscore import hit_chance
    assert hit_chance([2.0], [], 4.0, FPS) == pytest.approx(26 / 76)          # starts 1.00-2.00 of 0.00-3.00
    assert hit_chance([2.0], [(0.0, 0.5)], 4.0, FPS) == pytest.approx(13 / 38)  # starts after 1.5 s only
    assert hit_chance([2.0], [(0.0, 4.0)], 4.0, FPS) is None                  # no clear window
    rng = np.random.default_rng(0)
    fires = np.sort(rng.uniform(0, 600, rng.poisson(0.5 * 600)))
    assert hit_chance(list(fires), [], 600.0, FPS) == pytest.approx(1 - np.exp(-0.5), abs=0.03)
    assert hit_chance(list(fires[::4]), [], 600.0, FPS) < 0.15                # a quarter of the rate: ~0.12


def test_report_by_style_through_a_manifest(tmp_path):
    """Eval rows with the new columns survive the pinned Parquet schema, and `vidu eval`'s summary and
    table show the relaxed score, the action numbers and one block per style."""
    from manifests.io import to_table, write_table
    from manifests.schemas import SCHEMAS
    from stages.eval.report import load_run, summarize, table_rows
    from stages.run import base_row

    def row(i: int, style: str, events: int, success: float, hit: float, sharp: float) -> dict:
        return base_row("eval", id=f"s{i}", parent_id=f"s{i}", bench="synth", system="x", sample_id=f"s{i}",
                        style=style, instr_events=events, instr_success=success, instr_hit=hit,
                        action_sharpness_ratio=sharp, action_identity_error=5.0 * (i + 1), mouth_r=0.5,
                        instr_classes=json.dumps({"nod": {"told": events, "success": round(success * events),
                                                          "hit": round(hit * events)}}),
                        confusion="{}", drift_ratios=json.dumps({"instruction_counts": [[i + 1, 4], [i, 4]]}))
    assert {"style", "instr_hit", "instr_classes", "action_sharpness_ratio", "action_identity_error"} <= set(SCHEMAS["eval"].names)
    rows = [row(0, "human", 3, 1 / 3, 2 / 3, 0.5), row(1, "human", 1, 1.0, 1.0, 0.9), row(2, "animal", 4, 0.25, 1.0, 1.0)]
    for r, chance in zip(rows, (0.2, 0.1, 0.3)):
        r["instr_hit_chance"] = chance
    path = tmp_path / "eval.parquet"
    write_table(to_table(rows, "eval"), path, {"kind": "eval", "run_id": "eval-t", "params": {"bench": "synth", "system": "x"}})
    run = load_run(tmp_path, str(path))
    back = {r["id"]: r for r in run.rows}
    assert back["s2"]["style"] == "animal" and json.loads(back["s0"]["instr_classes"])["nod"] == {"told": 3, "success": 1, "hit": 2}
    s = summarize(run)
    assert (s["instr_events"], s["instr_success"], s["instr_hit"]) == (8, 3 / 8, 7 / 8)
    assert s["instr_hit_chance"] == pytest.approx((0.6 + 0.1 + 1.2) / 8)     # probabilities: pooled unrounded
    assert s["action_sharpness_ratio"] == pytest.approx(0.8) and s["action_identity_error"] == pytest.approx(10.0)
    assert (s["by_style"]["human"]["instr_success"], s["by_style"]["human"]["instr_hit"]) == (0.5, 0.75)
    assert s["by_style"]["animal"]["instr_classes"] == {"nod": {"told": 4, "success": 1, "hit": 4}}
    cells = dict(table_rows([run]))
    assert cells["... the same by chance (that class in a 1-s window at random)"] == ["23.8%"]
    assert cells["human: instruction success"] == ["50.0%"] and cells["animal: ... others allowed"] == ["100.0%"]
    assert cells["... told class fired in 0-1 s, others allowed"] == ["87.5%"]
    assert cells["human: sharpness told / idle"] == ["0.70"] and cells["animal: samples"] == ["1"]
    # the instruction drift pooled over the three rows' events: 6 of 12 first, 3 of 12 last
    assert (s["ratio_instructions_pooled"], cells["synth drift (pooled over events), last/first 10 %: instructions"]) == (0.5, ["0.50"])
    assert (s["ratio_instructions_low"], s["ratio_instructions_high"]) == pytest.approx((0.1613, 1.5503), abs=1e-4)


def test_drift_reports_the_instruction_ratios_counts(case):
    """The drift's instruction ratio comes with its counts: events by onset in the first / last 10 %."""
    from stages.eval.bench.synthscore import drift_ratios, frame_stats
    from stages.synth import Identity, analyze
    frames, truth, _ = case
    identity = Identity(**{k: tuple(v) if isinstance(v, list) else v for k, v in truth["identity"].items()})
    m = analyze(frames, identity)
    gt = np.asarray(truth["tracks"]["mouth"], np.float64)
    T = len(frames)                                   # 101 frames: the parts are frames 0-9 and 91-100
    told = [(0.0, True), (0.36, False), (0.4, True), (2.0, False), (3.64, True), (4.0, False)]
    d = drift_ratios(frame_stats(frames), m, identity, gt, told, FPS)
    assert T == 101 and d["instruction_counts"] == [[1, 2], [1, 2]] and d["instructions"] == 1.0
    d = drift_ratios(frame_stats(frames), m, identity, gt, told[:4], FPS)   # none in the last part: no ratio
    assert d["instruction_counts"] == [[1, 2], [0, 0]] and d["instructions"] is None


def test_instruction_drift_pooled_with_its_interval():
    """The instruction drift pooled over rows' events, with Katz's 95 % log interval: hand-computed values,
    rows as dicts or JSON, empty windows; and the interval's coverage over simulated streams (a 68 % interval
    as the negative control)."""
    rows = [{"drift_ratios": {"instruction_counts": [[2, 10], [4, 10]]}},
            {"drift_ratios": json.dumps({"instruction_counts": [[3, 10], [6, 10]]})}, {"drift_ratios": "{}"}, {}]
    d = instruction_drift(rows)
    se = (1 / 10 - 1 / 20 + 1 / 5 - 1 / 20) ** 0.5           # 10 of 20 last against 5 of 20 first
    assert d["counts"] == [[5, 20], [10, 20]] and d["ratio"] == 2.0
    assert (d["low"], d["high"]) == pytest.approx((2 * np.exp(-1.959964 * se), 2 * np.exp(1.959964 * se)))
    assert (round(d["low"], 3), round(d["high"], 3)) == (0.832, 4.805)
    # session 59's 10-minute reading (22 events a window): 0.78 rests on two events, its interval holds 0.9 and 1
    d = instruction_drift([{"drift_ratios": {"instruction_counts": [[9, 22], [7, 22]]}}])
    assert d["ratio"] == pytest.approx(7 / 9) and d["low"] < 0.5 and d["high"] > 1.4
    assert instruction_drift([{"drift_ratios": {"instruction_counts": [[3, 5], [0, 0]]}}])["ratio"] is None
    none_first = instruction_drift([{"drift_ratios": {"instruction_counts": [[0, 5], [2, 5]]}}])
    assert none_first["ratio"] is None and 0 < none_first["low"] < 4 < none_first["high"]   # 2 / 0.5 = 4 centred
    rng = np.random.default_rng(0)
    draws = rng.binomial(40, [0.5, 0.4], size=(4000, 2))          # true ratio 0.8, 40 events a window

    def coverage(z: float) -> float:
        hit = 0
        for s0, s1 in draws:
            d = instruction_drift([{"drift_ratios": {"instruction_counts": [[int(s0), 40], [int(s1), 40]]}}], z)
            hit += d["low"] <= 0.8 <= d["high"]
        return hit / len(draws)
    assert 0.93 <= coverage(1.959964) <= 0.975
    assert coverage(1.0) < 0.75                                   # a 68 % interval covers far less
