"""Ground-truth numbers of the synthetic avatar world (the teachers issue's definitions).

Everything is measured from pixels with `stages.synth.analyze` (knowing only who the character is),
never read from the model:

- lip sync: per-clip Pearson r at zero lag between the measured mouth opening and the ground-truth
  mouth track of the driving audio (`mouth_r`); control: the same frames against the mouth track of
  another case's audio (`mouth_r_control`, ~0 for a system that follows its own audio). Frames where
  no face is found count as a closed mouth; a mouth that never moves gives r = 0. A silent case has
  no r (null).
- instructions: the per-class detectors and event rules of stages/eval/metrics/instructions.py on
  the same measurements: an event succeeds when its class fires within 0-1.0 s after its onset and
  no other class fires in that window; latency = onset to that firing (one per successful event);
  spurious = fires per minute not of an instructed class inside its event's [onset, end + 1.0 s]
  (an action may fire twice while it lasts: a nod dips twice); of them, spurious_idle = those outside
  every event's window (the model acting unprompted; the rest fire during an instructed action, e.g. a
  blink read while the head looks up); confusion = {instructed: {first class fired or "none": n}}.
  instr_hit (relaxed, beside the strict instr_success, the headline): the share of events whose class
  fires within 0-1.0 s after its onset, whatever else fires in that window (instr_hit - instr_success =
  the events lost only to another class firing too, e.g. a blink read off a blurred face during a nod).
  instr_hit_chance: what instr_hit would be by chance, each event's class firing in a 1.0-s window at a
  random time of the same stream (the share of window starts, one per frame, whose window holds a fire
  of that class, over the starts whose window is clear of every window [onset, end + 1.0 s] of that class's
  events), averaged over events; None when no start is clear. A stream that fires every class at random
  has instr_hit ~ instr_hit_chance (an untrained model: 33 % against ~250 fires a minute): read instr_hit
  against it.
  instr_classes = {instructed class: {"told": events, "success": strict successes, "hit": relaxed hits}}
  (confusion cannot give the strict count: its first fire may be the told class with another after it);
  instr_blockers = {instructed class: {other class: events of that class in whose 0-1.0 s window it fired}}
  (what the strict rule lost an event to: e.g. a blink read off a face blurred by a head shake).
- action frames: frames (frame i at i / fps s) inside any event's [onset, end] against idle frames,
  outside every event's [onset, end + 1.0 s]: action_sharpness_ratio = mean frame sharpness (frame_stats)
  over the action frames / its mean over the idle frames (None when either set is empty or the idle
  mean is 0); action_identity_error = identity error (as identity_error) over the action frames alone
  (None when no face is found on them). Read both against the ground truth's: its actions move the head
  too, and a moving hand adds edges.
- drift: last 10 % of the frames (at least 5) against the first 10 %: identity error ratio,
  sharpness ratio, motion energy ratio, lip-sync r ratio, instruction success ratio (events by onset).
  A stream that freezes has motion ratio 0 and lip-sync ratio 0. Meant for long streams
  (`--seconds 600`); the frames are held in memory (T x H x W x 3 bytes: 2.9 GB for 10 min at 256^2).
  Over several rows the instruction drift is also pooled over events (instruction_drift): the first and
  last windows' successes / events summed, the ratio of the two rates and its 95 % interval (Katz's
  log interval, 0.5 added to a window without a success): 7 of 22 events in both windows give
  0.42-2.4 around 1: a ratio under a bound such as 0.9 shows a drop only where the interval's high end
  is under the bound too.
"""
from __future__ import annotations

import json

import numpy as np

WINDOW_S = 1.0  # an event's detector must fire within this long after the onset


def _finite(x: np.ndarray, fill: float = 0.0) -> np.ndarray:
    return np.where(np.isfinite(x), x, fill)


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """r at zero lag; None when `b` (the ground truth) is constant, 0.0 when `a` is."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    if n < 3 or np.std(b) < 1e-9:
        return None
    if np.std(a) < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def instruction_scores(m: dict[str, np.ndarray], events: list[tuple[float, float, str]], fps: float) -> dict:
    """Event success (strict) and hit (relaxed), per-class counts of both, per-event latencies, spurious
    fires per minute and the confusion matrix, with the detectors and event rules of
    stages/eval/metrics/instructions.py (definitions: the module doc)."""
    from stages.eval.metrics.instructions import activity, fires, score_events
    fired = {k: fires(v, fps) for k, v in activity(m, fps).items()}
    onsets = [(a, name) for a, _, name in events]
    res = score_events(onsets, fired, len(m["found"]) / fps, WINDOW_S)
    delays = [round(min(f for f in fired[c] if t <= f <= t + WINDOW_S) - t, 4)
              for (t, c), e in zip(onsets, res["per_event"]) if e["success"]]
    # relaxed: the told class fired in the window, whatever else fired there too (the strict rule's other half)
    hit = [any(t <= f <= t + WINDOW_S for f in fired.get(c, [])) for t, c in onsets]
    duration = len(m["found"]) / fps                      # one chance per told class, weighted by its events
    by_class = {k: hit_chance(fired.get(k, []), [(a, b) for a, b, n in events if n == k], duration, fps)
                for k in {k for _, k in onsets}}
    chance = [by_class[k] for _, k in onsets if by_class[k] is not None]
    classes: dict[str, dict[str, int]] = {}
    blockers: dict[str, dict[str, int]] = {}
    for (_, c), e, h in zip(onsets, res["per_event"], hit):
        n = classes.setdefault(c, {"told": 0, "success": 0, "hit": 0})
        n["told"], n["success"], n["hit"] = n["told"] + 1, n["success"] + e["success"], n["hit"] + h
        for k in e["others"]:
            b = blockers.setdefault(c, {})
            b[k] = b.get(k, 0) + 1
    # an action may fire more than once while it lasts (a nod dips twice): every fire of the instructed
    # class inside [onset, end + WINDOW_S] is the action; any other fire is spurious
    # spurious; of those, "idle" ones fire while no instruction is in force (outside every event's window): the
    # model acting unprompted, where the rest are another detector firing during an instructed action
    explained = lambda k, f: any(k == c and a <= f <= b + WINDOW_S for a, b, c in events)  # noqa: E731
    told = lambda f: any(a <= f <= b + WINDOW_S for a, b, _ in events)  # noqa: E731
    spurious = [f for k, fs in fired.items() for f in fs if not explained(k, f)]
    idle = sum(not told(f) for f in spurious)
    minutes = len(m["found"]) / fps / 60
    return {"instr_events": res["events"], "instr_success": res["success_rate"], "instr_latency_s": delays,
            "instr_hit": float(np.mean(hit)) if hit else None,
            "instr_hit_chance": float(np.mean(chance)) if chance else None, "instr_classes": classes,
            "instr_blockers": blockers,
            "spurious_per_min": len(spurious) / minutes if minutes > 0 else None,
            "spurious_idle_per_min": idle / minutes if minutes > 0 else None, "confusion": res["confusion"],
            "per_event": [(t, e["success"]) for (t, _), e in zip(onsets, res["per_event"])]}


def hit_chance(fired: list[float], told: list[tuple[float, float]], duration: float, fps: float) -> float | None:
    """The share of WINDOW_S windows starting at each frame (i / fps, the window inside the stream) that hold a
    fire time of `fired`, over the windows clear of every [onset, end + WINDOW_S] of `told` (that class's
    events: its fires there are the model's answer, not chance); None when none is clear."""
    starts = np.arange(int(np.floor((duration - WINDOW_S) * fps + 1e-9)) + 1) / fps
    clear = np.ones(len(starts), bool)
    for a, b in told:
        clear &= (starts + WINDOW_S < a) | (starts > b + WINDOW_S)
    if not clear.any():
        return None
    f = np.sort(np.asarray(fired, np.float64))
    inside = np.searchsorted(f, starts + WINDOW_S, "right") > np.searchsorted(f, starts, "left")
    return float(inside[clear].mean())


STATS_STEP = 250  # frames per piece of frame_stats (10 min at 256^2 as float32 would be 12 GB at once)


def _piece_stats(piece: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sharpness of the first n frames of `piece` and the motion of each of its frames after the first."""
    from stages.sense.pixels import frame_sharpness, luma
    motion = np.abs(np.diff(piece.astype(np.float32), axis=0)).mean((1, 2, 3))
    return frame_sharpness(luma(piece[:n])), motion


def frame_stats(frames: np.ndarray, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: sharpness [T] (variance of the 4-neighbour Laplacian of Rec.601 luma in [0, 1]:
    stages.eval.metrics.quality.frame_sharpness) and motion [T - 1] (mean |RGB change| per pixel and
    channel from the previous frame, in uint8 steps); in pieces of STATS_STEP frames (each with the
    next piece's first frame, for its last motion), in `workers` processes when > 1."""
    T = len(frames)
    starts = range(0, T, STATS_STEP)
    pieces = [frames[s:s + STATS_STEP + 1] for s in starts]
    counts = [min(STATS_STEP, T - s) for s in starts]
    if workers > 1 and len(pieces) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(workers, len(pieces)), mp_context=mp.get_context("spawn")) as pool:
            got = list(pool.map(_piece_stats, pieces, counts))
    else:
        got = [_piece_stats(p, n) for p, n in zip(pieces, counts)]
    if not got:
        return np.zeros(0), np.zeros(0)
    return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])


def _ratio(last: float | None, first: float | None) -> float | None:
    if last is None or first is None or not np.isfinite(last) or not np.isfinite(first) or abs(first) < 1e-12:
        return None
    return float(last / first)


def _part(m: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    """The analysis on the frames `index` (a slice or a [T] bool mask) alone."""
    return {k: v[index] for k, v in m.items()}


def in_events(T: int, fps: float, events: list[tuple[float, float, str]], after: float = 0.0) -> np.ndarray:
    """[T] bool: frame i (at i / fps s) lies inside some event's [onset, end + after]."""
    t = np.arange(T) / fps
    inside = np.zeros(T, bool)
    for a, b, _ in events:
        inside |= (a <= t) & (t <= b + after)
    return inside


def action_scores(sharp: np.ndarray, m: dict[str, np.ndarray], identity, events: list[tuple[float, float, str]],
                  fps: float) -> dict:
    """Quality on the frames of told actions (the module doc): sharpness inside the events' [onset, end]
    against outside every [onset, end + WINDOW_S], and the identity error inside."""
    from stages.synth import identity_error
    T = len(sharp)
    action, idle = in_events(T, fps, events), ~in_events(T, fps, events, WINDOW_S)
    ratio = _ratio(sharp[action].mean(), sharp[idle].mean()) if action.any() and idle.any() else None
    found = np.asarray(m["found"])[:T] & action
    return {"action_sharpness_ratio": ratio,
            "action_identity_error": identity_error(_part(m, action), identity) if found.any() else None}


def drift_ratios(stats: tuple[np.ndarray, np.ndarray], m: dict[str, np.ndarray], identity, gt_mouth: np.ndarray,
                 per_event: list[tuple[float, bool]] = (), fps: float = 25.0) -> dict:
    """Last 10 % vs first 10 % of the clip (at least 5 frames each), from its frame_stats and analysis;
    instructions: success rate of the events whose onset falls in each part (None when a part has none),
    with its counts beside the ratios ("instruction_counts": [[successes, events] first, [...] last]: a
    ratio of a few events is noise, and the counts say how few)."""
    from stages.synth import identity_error
    sharp, motion = stats
    T = len(sharp)
    n = max(5, T // 10)
    if T < 2 * n:
        return {}
    head, tail = slice(0, n), slice(T - n, T)

    ident = [identity_error(_part(m, s), identity) if np.asarray(m["found"])[s].any() else None for s in (head, tail)]
    mouth = _finite(m["mouth"])
    sync = [pearson(mouth[s], gt_mouth[s]) for s in (head, tail)]
    parts = [[ok for t, ok in per_event if a <= t * fps < b] for a, b in ((0, n), (T - n, T))]
    rate = [float(np.mean(r)) if r else None for r in parts]
    return {"identity_error": _ratio(ident[1], ident[0]), "sharpness": _ratio(sharp[tail].mean(), sharp[head].mean()),
            "motion": _ratio(motion[T - n:].mean(), motion[:n - 1].mean()), "sync_r": _ratio(sync[1], sync[0]),
            "instructions": _ratio(rate[1], rate[0]), "instruction_counts": [[int(sum(r)), len(r)] for r in parts]}


def synth_scores(frames: np.ndarray, fps: float, truth: dict, control_mouth: np.ndarray | None,
                 workers: int = 1, stats: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """All ground-truth numbers of one synth case; `frames` [T, H, W, 3] uint8 at the case's size,
    measured in `workers` processes (analyze, frame_stats; `stats`: the frames' frame_stats when the
    caller has them)."""
    from stages.synth import Identity, analyze, identity_error
    identity = Identity(**{k: tuple(v) if isinstance(v, list) else v for k, v in truth["identity"].items()})
    T = min(len(frames), truth["frames"])
    frames = frames[:T]
    m = analyze(frames, identity, workers)
    gt = np.asarray(truth["tracks"]["mouth"], np.float64)[:T]
    measured = _finite(m["mouth"])
    events = [(float(a), float(b), str(n)) for a, b, n in truth["actions"] if a < T / fps]  # (onset, end, text)
    out = {"style": identity.style,                      # the character's kind: human | anime | animal
           "face_found": float(np.mean(m["found"])),    # the world's own face finder (dlib misses anime / animal faces)
           "mouth_r": pearson(measured, gt),
           "mouth_r_control": None if control_mouth is None else pearson(measured, control_mouth[:T]),
           "identity_error": identity_error(m, identity) if m["found"].any() else None}
    out.update(instruction_scores(m, events, fps))
    stats = frame_stats(frames, workers) if stats is None else stats
    out.update(action_scores(stats[0][:T], m, identity, events, fps))
    out["drift_ratios"] = drift_ratios(stats, m, identity, gt, out.pop("per_event"), fps)
    return out


BY_STYLE_MEANS = ("mouth_r", "spurious_per_min", "identity_error", "action_sharpness_ratio")


def pooled(rows: list[dict], key: str = "instr_success", counts: bool = True) -> float | None:
    """An instruction rate (`key`: instr_success, instr_hit, instr_hit_chance) over rows, pooled over events:
    the rows' successes (rate x events, rounded to whole events when `counts`; False for a mean of per-event
    probabilities such as instr_hit_chance) / their events, over the rows that have the rate (an older row
    may lack it); None without events. The one pooling of every instruction summary."""
    have = [r for r in rows if r.get(key) is not None]
    events = sum(r["instr_events"] or 0 for r in have)
    whole = round if counts else float
    return sum(whole(r[key] * (r["instr_events"] or 0)) for r in have) / events if events else None


def instruction_drift(rows: list[dict], z: float = 1.959964) -> dict:
    """The instruction drift pooled over rows (module doc): {"counts": [[successes, events] first,
    [...] last] summed over the rows' drift_ratios (a dict or its JSON), "ratio": last rate / first rate,
    "low", "high": its interval at `z` (1.96: 95 %)}; the three None when a window has no event."""
    counts = [[0, 0], [0, 0]]
    for r in rows:
        d = r.get("drift_ratios") or {}
        for i, (s, n) in enumerate((json.loads(d) if isinstance(d, str) else d).get("instruction_counts") or ()):
            counts[i][0] += s
            counts[i][1] += n
    out = {"counts": counts, "ratio": None, "low": None, "high": None}
    (s0, n0), (s1, n1) = counts
    if n0 and n1:
        a, c = (s1 or 0.5), (s0 or 0.5)                       # a window without a success: half of one
        log = np.log((a / n1) / (c / n0))
        se = np.sqrt(max(0.0, 1 / a - 1 / n1) + max(0.0, 1 / c - 1 / n0))
        out.update(ratio=(s1 / n1) / (s0 / n0) if s0 else None, low=float(np.exp(log - z * se)),
                   high=float(np.exp(log + z * se)))
    return out


def blockers_summed(rows: list[dict]) -> dict[str, dict[str, int]]:
    """The rows' instr_blockers summed ({instructed: {other class: events}}; a row's may be JSON, or
    absent from rows scored before it), each class's others by count, most first."""
    total: dict[str, dict[str, int]] = {}
    for r in rows:
        got = r.get("instr_blockers") or {}
        for c, others in (json.loads(got) if isinstance(got, str) else got).items():
            for k, n in others.items():
                total.setdefault(c, {})[k] = total.get(c, {}).get(k, 0) + n
    return {c: dict(sorted(o.items(), key=lambda kv: (-kv[1], kv[0]))) for c, o in sorted(total.items())}


def style_breakdown(rows: list[dict]) -> dict[str, dict]:
    """Rows (synth_scores' numbers of one case each, with its "style") grouped by character style:
    {style: {clips, instr_events, instr_success and instr_hit pooled over events (successes / events, as
    the overall), instr_classes summed ({class: {"told", "success", "hit"}}; a row's may be JSON), and
    the mean over clips of each of BY_STYLE_MEANS (None where none measured)}}; rows without a style
    are left out."""
    out: dict[str, dict] = {}
    for style in sorted({r["style"] for r in rows if r.get("style")}):
        group = [r for r in rows if r.get("style") == style]
        events = sum(r["instr_events"] or 0 for r in group if r.get("instr_success") is not None)
        classes: dict[str, dict[str, int]] = {}
        for r in group:
            got = r.get("instr_classes") or {}
            for c, n in (json.loads(got) if isinstance(got, str) else got).items():
                total = classes.setdefault(c, {"told": 0, "success": 0, "hit": 0})
                for k in total:
                    total[k] += n[k]
        d = {"clips": len(group), "instr_events": events, "instr_success": pooled(group),
             "instr_hit": pooled(group, "instr_hit"), "instr_classes": dict(sorted(classes.items()))}
        for k in BY_STYLE_MEANS:
            v = [r.get(k) for r in group]
            v = [x for x in v if x is not None and np.isfinite(x)]
            d[k] = float(np.mean(v)) if v else None
        out[style] = d
    return out
