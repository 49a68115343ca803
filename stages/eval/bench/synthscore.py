"""Ground-truth numbers of the synthetic avatar world (the teachers issue's definitions).

Everything is measured from pixels with `stages.synth.analyze` (knowing only who the character is),
never read from the model:

- lip sync: per-clip Pearson r at zero lag between the measured mouth opening and the ground-truth
  mouth track of the driving audio (`mouth_r`); control: the same frames against the mouth track of
  another case's audio (`mouth_r_control`, ~0 for a system that follows its own audio). Frames where
  no face is found count as a closed mouth; a mouth that never moves gives r = 0. A silent case has
  no r (null).
- instructions: per-class detectors on the measured tracks (thresholds below, fitted on ground-truth
  renders where they fire on 100 % of events and nowhere else). An event succeeds when its class
  fires within 0-1.0 s after its onset and no other class fires in that window; latency = onset to
  the first firing; spurious = detections (a class switching on) outside every event's
  [onset, end + 1.0 s], per minute; confusion = {instructed: {first class detected or "none": n}}.
- drift: last 10 % of the frames (at least 5) against the first 10 %: identity error ratio,
  sharpness ratio, motion energy ratio, lip-sync r ratio. A frozen frame has motion ratio 0.
"""
from __future__ import annotations

import numpy as np

WINDOW_S = 1.0  # an event's detector must fire within this long after the onset
MIN_RUN = {"turn left": 3, "turn right": 3}  # frames a detection must last
SHAKE_SPAN_S = 0.8  # a shake: yaw beyond +-SHAKE_YAW on both sides within this long
SHAKE_YAW = 0.3


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


def detections(m: dict[str, np.ndarray], fps: float) -> dict[str, np.ndarray]:
    """Per class, a [T] bool: the class's action is visible at that frame."""
    eyes, pitch, yaw = _finite(m["eyes"], 1.0), _finite(m["pitch"]), _finite(m["yaw"])
    smile, hand = _finite(m["smile"]), _finite(m["hand"])
    found = np.asarray(m["found"], bool)
    T = len(found)
    span = max(1, int(round(SHAKE_SPAN_S * fps)))
    right, left = yaw > SHAKE_YAW, yaw < -SHAKE_YAW
    shake = np.zeros(T, bool)
    for t in range(T):
        lo = max(0, t - span)
        shake[t] = (right[t] and left[lo:t].any()) or (left[t] and right[lo:t].any())
    out = {"blink": eyes < 0.4, "nod": pitch > 0.5, "look up": pitch < -0.5, "turn left": yaw < -0.75,
           "turn right": yaw > 0.75, "shake head": shake, "smile": smile > 0.6, "raise a hand": hand > 0.5}
    for name, k in MIN_RUN.items():
        out[name] = _min_run(out[name], k)
    return {k: v & found for k, v in out.items()}


def _min_run(x: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(x)
    t = 0
    while t < len(x):
        if x[t]:
            e = t
            while e < len(x) and x[e]:
                e += 1
            if e - t >= k:
                out[t:e] = True
            t = e
        else:
            t += 1
    return out


def instruction_scores(det: dict[str, np.ndarray], events: list[tuple[float, float, str]], fps: float) -> dict:
    """Event success, latencies, spurious detections per minute and the confusion matrix."""
    T = len(next(iter(det.values())))
    t = np.arange(T) / fps
    success, latency, confusion = 0, [], {}
    covered = np.zeros(T, bool)
    for start, end, name in events:
        win = (t >= start) & (t <= start + WINDOW_S)
        covered |= (t >= start) & (t <= end + WINDOW_S)
        fired = {k: np.nonzero(v & win)[0] for k, v in det.items()}
        fired = {k: idx for k, idx in fired.items() if len(idx)}
        first = min(fired, key=lambda k: fired[k][0]) if fired else "none"
        row = confusion.setdefault(name, {})
        row[first] = row.get(first, 0) + 1
        if name in fired and len(fired) == 1:
            success += 1
            latency.append(round(float(t[fired[name][0]] - start), 4))
    onsets = 0
    for v in det.values():
        starts = v & ~np.concatenate([[False], v[:-1]])
        onsets += int((starts & ~covered).sum())
    minutes = T / fps / 60
    return {"instr_events": len(events), "instr_success": success / len(events) if events else None,
            "instr_latency_s": latency, "spurious_per_min": onsets / minutes if minutes > 0 else None,
            "confusion": confusion}


def _sharpness(frames: np.ndarray) -> np.ndarray:
    """Per frame: variance of the 4-neighbour Laplacian of luma in [0, 1]."""
    y = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255
    lap = y[:, 1:-1, 1:-1] * 4 - y[:, :-2, 1:-1] - y[:, 2:, 1:-1] - y[:, 1:-1, :-2] - y[:, 1:-1, 2:]
    return lap.reshape(len(frames), -1).var(1)


def _ratio(last: float | None, first: float | None) -> float | None:
    if last is None or first is None or not np.isfinite(last) or not np.isfinite(first) or abs(first) < 1e-12:
        return None
    return float(last / first)


def drift_ratios(frames: np.ndarray, m: dict[str, np.ndarray], identity, gt_mouth: np.ndarray) -> dict:
    """Last 10 % vs first 10 % of the clip (at least 5 frames each)."""
    from stages.synth import identity_error
    T = len(frames)
    n = max(5, T // 10)
    if T < 2 * n:
        return {}
    head, tail = slice(0, n), slice(T - n, T)
    sharp = _sharpness(frames)
    motion = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean((1, 2, 3))  # [T - 1]

    def part(d: dict, s: slice) -> dict:
        return {k: v[s] for k, v in d.items()}

    ident = [identity_error(part(m, s), identity) if np.asarray(m["found"])[s].any() else None for s in (head, tail)]
    mouth = _finite(m["mouth"])
    sync = [pearson(mouth[s], gt_mouth[s]) for s in (head, tail)]
    return {"identity_error": _ratio(ident[1], ident[0]), "sharpness": _ratio(sharp[tail].mean(), sharp[head].mean()),
            "motion": _ratio(motion[T - n:].mean(), motion[:n - 1].mean()), "sync_r": _ratio(sync[1], sync[0])}


def synth_scores(frames: np.ndarray, fps: float, truth: dict, control_mouth: np.ndarray | None) -> dict:
    """All ground-truth numbers of one synth case; `frames` [T, H, W, 3] uint8 at the case's size."""
    from stages.synth import Identity, analyze, identity_error
    identity = Identity(**{k: tuple(v) if isinstance(v, list) else v for k, v in truth["identity"].items()})
    T = min(len(frames), truth["frames"])
    frames = frames[:T]
    m = analyze(frames, identity)
    gt = np.asarray(truth["tracks"]["mouth"], np.float64)[:T]
    measured = _finite(m["mouth"])
    events = [(float(a), float(b), str(n)) for a, b, n in truth["actions"] if a < T / fps]
    out = {"mouth_r": pearson(measured, gt),
           "mouth_r_control": None if control_mouth is None else pearson(measured, control_mouth[:T]),
           "identity_error": identity_error(m, identity) if m["found"].any() else None}
    out.update(instruction_scores(detections(m, fps), events, fps))
    out["drift_ratios"] = drift_ratios(frames, m, identity, gt)
    return out
