"""Instruction following: does each instructed action happen soon after its instruction, and nothing else?

Events: a list of {"t": seconds, "action": name} or {"t": seconds, "text": "please nod"} (the text
names one of stages.synth.ACTIONS; another text is class "unknown"), or a synthetic sample's truth
JSON (`vidu synth`: "identity" and "actions" [[onset, end, name], ...]: the instruction is given at
the onset and its action, over at the end, starts stages.synth.world.INSTRUCTION_DELAY later, as its
"events" [[onset, action start, end, name], ...] say).

Synthetic avatar world (an identity is known): stages.synth.analyze reads eyes, yaw, pitch, smile and
hand back from the pixels; a class is active on a frame when (measured on 12 rendered samples, actions
reach 0.9-1.2 of their target, idle frames stay within 0.64-1.2 eyes and +-0.3 otherwise):
blink eyes < 0.4; nod pitch > 0.5; look up pitch < -0.5; turn left yaw < -0.75; turn right yaw > 0.75;
shake head |yaw| > 0.35 with the opposite sign over 0.35 within 0.6 s; smile > 0.6; raise a hand
hand > 0.5. A class fires at each rising edge of its activity (gaps under 0.2 s bridged).
- an event succeeds when its class fires within [t, t + latency] (latency 1.0 s) and no other class
  fires in that window; `latency_s` = mean delay of the successful events' fires;
- `spurious_per_min` = fires that answer no event per minute of video; a fire answers an event
  when it is the instructed class's first fire in [t, t + latency], or (when the event gives its
  "end", as the synthetic truth does) any fire of that class in [t, end + latency];
- `confusion`: instructed class -> {class that fired first in the window, or "none": count}.
Real video (no identity): with `--judge DIR` a local vision-language model (models.hf) is asked, per
event, whether the person performs the action in frames of [t, t + latency]; else "not_assessed".
"""
from __future__ import annotations

import numpy as np

from stages.eval.metrics import NOT_ASSESSED, EvalError

GAP_S = 0.2
SHAKE_YAW, SHAKE_S = 0.35, 0.6
JUDGE_FRAMES = 4
JUDGE_TOKENS = 24  # {"answer": "yes"} and some slack


def class_of(text: str) -> str:
    from stages.synth import ACTIONS

    t = " ".join(str(text).lower().replace("-", " ").split())
    hits = [a for a in sorted(ACTIONS, key=len, reverse=True) if a in t]
    return hits[0] if hits else "unknown"


def parse_events(spec) -> tuple[list[tuple[float, str]], list[float | None], dict | None]:
    """(onset s, class) pairs sorted by time, their end times (None: not given), and the synthetic
    identity dict if the spec has one."""
    identity = None
    if isinstance(spec, dict):
        identity = spec.get("identity")
        if "actions" in spec:
            spec = [{"t": a[0], "end": a[1], "action": a[2]} for a in spec["actions"]]
        else:
            spec = spec.get("events")
    if not isinstance(spec, list):
        raise EvalError("instructions: a list of {\"t\": seconds, \"action\" or \"text\": ...} events is needed")
    events = []
    for e in spec:
        if not isinstance(e, dict) or "t" not in e or not ("action" in e or "text" in e):
            raise EvalError(f"instructions: event {e!r} needs \"t\" and \"action\" or \"text\"")
        end = e.get("end")
        events.append((float(e["t"]), class_of(e.get("action") or e.get("text")), None if end is None else float(end)))
    events.sort(key=lambda x: x[0])
    return [(t, c) for t, c, _ in events], [end for _, _, end in events], identity


def activity(m: dict[str, np.ndarray], fps: float) -> dict[str, np.ndarray]:
    """Per class, [T] bool: the class is active on the frame (thresholds in the module doc)."""
    yaw = np.nan_to_num(m["yaw"])
    w = max(1, round(SHAKE_S * fps))
    pos, neg = yaw > SHAKE_YAW, yaw < -SHAKE_YAW
    near = lambda x: np.convolve(x.astype(float), np.ones(2 * w + 1))[w:w + len(x)] > 0  # noqa: E731  (full, centred: any length)
    with np.errstate(invalid="ignore"):
        return {"blink": m["eyes"] < 0.4, "nod": m["pitch"] > 0.5, "look up": m["pitch"] < -0.5,
                "turn left": yaw < -0.75, "turn right": yaw > 0.75,
                "shake head": (pos & near(neg)) | (neg & near(pos)), "smile": m["smile"] > 0.6,
                "raise a hand": m["hand"] > 0.5}


def fires(active: np.ndarray, fps: float) -> list[float]:
    """Times (s) of the rising edges of `active`, runs closer than GAP_S merged."""
    idx = np.flatnonzero(active)
    if not len(idx):
        return []
    starts = [idx[0]] + [b for a, b in zip(idx[:-1], idx[1:]) if (b - a) / fps > GAP_S]
    return [float(i / fps) for i in starts]


def score_events(events: list[tuple[float, str]], fired: dict[str, list[float]], seconds: float,
                 latency: float, ends: list[float | None] | None = None) -> dict:
    """Success, latency, spurious fires and confusion of timed events against class fire times. With
    `ends` (when each instructed action should be over), every fire of the instructed class in
    [t, end + latency] answers the event (a nod dips twice); without, only the first in the window."""
    used: set[tuple[str, float]] = set()
    for (t, c), end in zip(events, ends or []):
        if end is not None:
            used.update((c, f) for f in fired.get(c, []) if t <= f <= end + latency)
    ok, delays, confusion, others_in = [], [], {}, []
    for t, c in events:
        inside = sorted((f, k) for k, fs in fired.items() for f in fs if t <= f <= t + latency)
        mine = [f for f, k in inside if k == c]
        others = [k for f, k in inside if k != c]
        others_in.append(sorted(set(others)))        # the classes that fired beside it (what a strict fail is lost to)
        success = bool(mine) and not others
        ok.append(success)
        if mine:
            used.add((c, mine[0]))
        if success:
            delays.append(mine[0] - t)
        row = confusion.setdefault(c, {})
        first = inside[0][1] if inside else "none"
        row[first] = row.get(first, 0) + 1
    total = sum(len(fs) for fs in fired.values())
    return {"events": len(events), "success_rate": float(np.mean(ok)) if ok else None,
            "latency_s": float(np.mean(delays)) if delays else None,
            "spurious_per_min": float((total - len(used)) / (seconds / 60)) if seconds > 0 else None,
            "confusion": confusion, "per_event": [{"t": t, "action": c, "success": s, "others": o}
                                                   for (t, c), s, o in zip(events, ok, others_in)]}


def score_synthetic(frames: np.ndarray, fps: float, events: list[tuple[float, str]], identity: dict,
                    latency: float, ends: list[float | None] | None = None) -> dict:
    from stages.synth import Identity, analyze

    try:
        idt = Identity.from_dict(identity)
    except TypeError as e:
        raise EvalError(f"instructions: the identity is not a stages.synth Identity ({e})") from None
    act = activity(analyze(frames, idt), fps)
    fired = {k: fires(v, fps) for k, v in act.items()}
    return {"method": "synth.analyze", **score_events(events, fired, len(frames) / fps, latency, ends)}


def score_judge(frames: np.ndarray, fps: float, events: list[tuple[float, str]], judge: str, latency: float) -> dict:
    from models.hf import VisionLanguageModel, first_json_object

    try:
        vlm = VisionLanguageModel(judge, "--judge", max_new_tokens=JUDGE_TOKENS)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from None
    ok = []
    for t, c in events:
        a, b = int(t * fps), min(len(frames), int((t + latency) * fps) + 1)
        if b <= a:
            ok.append(False)
            continue
        pick = frames[np.linspace(a, b - 1, min(JUDGE_FRAMES, b - a)).astype(int)]
        answer = first_json_object(vlm(pick, f"These frames follow the instruction \"{c}\". Does the person "
                                             "perform that action in them? Answer with JSON {\"answer\": \"yes\" or \"no\"}."))
        ok.append(bool(answer) and str(answer.get("answer", "")).strip().lower() == "yes")
    return {"method": f"judge:{vlm.name}", "events": len(events), "success_rate": float(np.mean(ok)) if ok else None,
            "per_event": [{"t": t, "action": c, "success": s} for (t, c), s in zip(events, ok)]}


def score_instructions(spec, frames: np.ndarray, fps: float, latency: float = 1.0, judge: str | None = None):
    """The instruction-following result, or NOT_ASSESSED (no events, or a real video without a judge)."""
    if spec is None:
        return NOT_ASSESSED
    events, ends, identity = parse_events(spec)
    if identity is not None:
        return score_synthetic(frames, fps, events, identity, latency, ends)
    if judge:
        return score_judge(frames, fps, events, judge, latency)
    return NOT_ASSESSED
