"""An hour-long stream with its drift, segment by segment (issue 16's evidence; any checkpoint).

    python benchmarks/long_stream.py --work W [--ckpt FILE] [--minutes 60] [--segment 600] [--budget 540] [--workers 12]

One held-out character of the synthetic world (synth bench case `--case`, seed HELD_OUT_BASE + case, eval-split
voices and texts) talks for `--minutes`, with the world's timed instructions typed as they come due (the bench's
typist). The stream runs as `--segment`-second runs that continue one stream exactly through the state of
`vidu stream --save-state / --resume` (Session.suspend, stages/stream/state.py, identity-checked on resume): each
run resumes from W/state.st, streams one segment, writes the state back. Each segment is scored with the synth
bench's numbers (stages/eval/bench/synthscore.synth_scores) against the world's ground truth for its frames: lip
sync r (control: the mouth track of the next segment's speech), instruction success, latency and spurious fires
(instructions whose onset falls in the segment), identity error, and the segment's mean sharpness and motion;
drift = each segment's number over the first segment's. A segment's frames go to unscored_<i>.npy in --scratch (RAM:
/dev/shm; moved to W when a call ends with them unscored) and are scored in another process (one at a time, so the stream keeps its cores) beside the next segment's streaming (a thread
would take the host-bound stream's GIL: measured on the H200, chunk p50 37.5 -> 80.5 ms). A scoring the budget
cuts short is killed and done again by the next call. A segment is committed in an order that a call killed at
any moment (the device's limit) loses at most the segment it was streaming: frames, the new state beside the
old, segments.json, the state in place (`recover`).

A call streams whole segments while `--budget` seconds allow (a device call is at most 600 s), so an hour runs
as several calls: re-running the same command continues from W (state + W/segments.json; the inputs are a
function of the case alone, kept in W/case.npz). W must stay on the machine between calls (a warm
machine keeps ignored folders such as .recipe/): the starter's state is 38.6 MB, which cannot travel back beside
the 41-MiB starter under the device's 64-MiB limit in one call, so the calls should follow each other within its
idle release. A lost machine need not lose the stream: --out's state.st.NN (cat them), xz-compressed (22.4 MB) and
split in three, travels in three small calls (each carries one piece and copies it to the machine's /tmp, which
lives while the machine is warm; a folder ignored only by .git/info/exclude did not survive a call), a fourth carries the wheels into /tmp,
and the last unpacks state.st and segments.json into W and runs this command (session 42 finished the hour so).
Outputs (W and `--out`): segments.json (every finished segment: frames, wall times, fps, chunk latency, peak
GPU memory, scores), state.st (in --out as 15-MiB pieces state.st.NN: `cat state.st.* > state.st`), sheet.png
(each finished segment's first and last frame; W/shots.npz holds them).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FPS = 25
PIECE = 15 * 2 ** 20            # bytes of a piece of the state copied to --out
NEXT_STATE = "state.next.st"   # the state at the end of the segment being committed
DISK_BYTES_S = 40e6            # W's write speed on the H200's machine (1.5 GB in ~35 s, session 40)


def hour_case(case: int, seconds: float, size: int = 256, cache: Path | None = None) -> dict:
    """The inputs and ground truth of synth case `case` made `seconds` long, pixels not drawn: identity (as the
    truth's JSON has it), speech (16 kHz), the per-frame truth mouth track, actions (onset, end, text), and the
    reference image; kept in `cache` (an .npz) for the next call (the hour's speech takes a minute to make)."""
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            meta = json.loads(str(z["meta"]))
            if meta["case"] == case and meta["seconds"] == seconds:
                return {**meta, "audio": z["audio"], "mouth": z["mouth"], "ref": z["ref"]}
    from stages import synth
    from stages.eval.bench.cases import HELD_OUT_BASE
    s = synth.make_sample(HELD_OUT_BASE + case, size, size, FPS, seconds, split="eval", draw=False)
    meta = {"case": case, "seconds": seconds, "identity": asdict(s.identity), "frames": s.frames.shape[0],
            "actions": [(float(a), float(b), str(t)) for a, b, t in s.actions], "voice": s.said.source if s.said else ""}
    out = {**meta, "audio": s.audio, "mouth": np.asarray(s.tracks["mouth"], np.float64),
           "ref": synth.render(s.identity, synth.State(), size, size, s.scene)}
    if cache is not None:
        np.savez(cache, meta=json.dumps(meta), audio=out["audio"], mouth=out["mouth"], ref=out["ref"])
    return out


def segment_truth(case: dict, f0: int, f1: int) -> tuple[dict, np.ndarray]:
    """(truth, control mouth track) of frames [f0, f1): the truth as synth_scores reads it (times relative to
    f0; the instructions whose onset falls inside), the control the mouth track of the next f1 - f0 frames
    (wrapping to the start): other speech of the same voice."""
    n = f1 - f0
    t0, t1 = f0 / FPS, f1 / FPS
    actions = [[a - t0, b - t0, t] for a, b, t in case["actions"] if t0 <= a < t1]
    truth = {"identity": case["identity"], "frames": n, "fps": FPS,
             "tracks": {"mouth": case["mouth"][f0:f1].tolist()}, "actions": actions}
    return truth, np.roll(case["mouth"], -f1)[:n]


def score_file(path: str, case: int, seconds: float, cache: str, f0: int, workers: int, out: str) -> None:
    """score_segment of the frames saved at `path` (.npy) into `out` (JSON, replaced whole), in a scorer process
    niced below the stream (its pools inherit it): the host-bound chunk loop keeps its core. It leads its own
    process group, so that killing a scoring (stop_scoring) kills its pools' workers with it."""
    try:
        os.setsid()
        os.nice(10)
    except OSError:
        pass
    scores = score_segment(np.load(path, mmap_mode="r"), hour_case(case, seconds, cache=Path(cache)), f0, workers)
    atomic_write(Path(out), json.dumps(scores, default=float).encode())


def stop_scoring(proc) -> None:
    """Kill a scorer process and its pools' workers (its process group: score_file), else they live on,
    orphaned, holding their frames and the call's stdout (a shell pipe then never ends)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.join()


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def frames_file(i: int, dirs: list[Path]) -> Path | None:
    """Where segment i's unscored frames are (the call's scratch, else W), or None."""
    return next((d / f"unscored_{i}.npy" for d in dirs if (d / f"unscored_{i}.npy").is_file()), None)


def default_scratch(W: Path, need: int) -> Path:
    """/dev/shm (RAM) when it has room for `need` bytes, else W: a segment's frames wait there for their
    scoring. Written to W's disk they cost ~35 s per 5-minute segment on the H200's machine (1.5 GB at ~40
    MB/s, measured), a quarter of the segment's streaming."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > need:
            d = shm / ("vidu_hour_" + hashlib.sha1(str(W.resolve()).encode()).hexdigest()[:12])
            d.mkdir(exist_ok=True)
            return d
    except OSError:
        pass
    return W


def scratch_survives(W: Path, scratch: Path) -> bool:
    """Whether this call found the previous call's mark in scratch: a RAM folder that lived through the call
    boundary (the device's machine between its calls), so unscored frames may stay there instead of going to
    W's disk; leaves this call's mark. W itself always survives."""
    if scratch == W:
        return True
    mark, me = scratch / "call.mark", str(W.resolve())
    found = mark.is_file() and mark.read_text() == me
    mark.write_text(me)
    return found


def persist(W: Path, scratch: Path, segs: list[dict]) -> float:
    """Move the unscored frames still in scratch to W (the next call may find scratch gone); seconds taken."""
    t = time.perf_counter()
    if scratch != W:
        for s in segs:
            f = scratch / f"unscored_{s['index']}.npy"
            if "scores" not in s and f.is_file():
                tmp = W / (f.name + ".tmp")
                shutil.copyfile(f, tmp)
                tmp.replace(W / f.name)
                f.unlink()
    return time.perf_counter() - t


def recover(W: Path, segs: list[dict], scratch: Path | None = None) -> dict | None:
    """The stream's state in W after a call that may have been killed mid-commit, checked against the finished
    segments (None: nothing streamed yet). A next state whose segment reached segments.json is put in place;
    one whose segment did not is dropped with that segment's frames (the segment is streamed again). A finished
    segment whose frames are nowhere (a killed call's scratch gone with them) is marked `lost`: never scored."""
    from stages.stream.state import read_state
    dirs = [W] if scratch in (None, W) else [scratch, W]
    for d in dirs:
        for f in [*d.glob("*.tmp"), *d.glob("scores_*.json")]:   # writes cut short; scorings not taken (redone)
            f.unlink()
    nxt = W / NEXT_STATE
    if nxt.is_file():
        if segs and read_state(nxt)[0]["frames"] == segs[-1]["frames_end"]:
            nxt.replace(W / "state.st")
        else:
            nxt.unlink()
    for f in [f for d in dirs for f in d.glob("unscored_*.npy")]:   # frames of a segment that never reached
        i = int(f.stem.split("_")[1])                                 # segments.json, or scored
        if i >= len(segs) or "scores" in segs[i]:
            f.unlink()
    for s in segs:
        if "scores" not in s and frames_file(s["index"], dirs) is None:
            s["lost"] = True
    if not segs:
        return None
    state, saved = read_state(W / "state.st")
    if state["frames"] != segs[-1]["frames_end"]:
        raise SystemExit(f"{W}/state.st is at frame {state['frames']}, segments.json at {segs[-1]['frames_end']}")
    return {"state": state, "identity": saved}


def score_segment(frames: np.ndarray, case: dict, f0: int, workers: int) -> dict:
    from stages.eval.bench.synthscore import frame_stats, synth_scores
    truth, control = segment_truth(case, f0, f0 + len(frames))
    stats = frame_stats(frames[:truth["frames"]], workers)
    s = synth_scores(frames, FPS, truth, control, workers, stats)
    s.pop("per_event", None)
    s["sharpness"], s["motion"] = float(stats[0].mean()), float(stats[1].mean())
    s["instr_latency_s_p50"] = float(np.median(s["instr_latency_s"])) if s["instr_latency_s"] else None
    return s


DRIFT = ("identity_error", "sharpness", "motion", "mouth_r", "instr_success", "spurious_per_min", "face_found")


def drift(segments: list[dict]) -> list[dict]:
    """Each segment's numbers over the first segment's (None where either is missing or the first is 0)."""
    first = segments[0]["scores"]
    out = []
    for s in segments:
        row = {}
        for k in DRIFT if "scores" in s else ():          # a segment still being scored has none yet
            a, b = s["scores"].get(k), first.get(k)
            row[k] = None if a is None or b is None or abs(b) < 1e-12 else round(float(a) / float(b), 4)
        out.append(row)
    return out


def stream_segment(bench, case: dict, image: Path, seconds: float, state: dict | None):
    """Frames [n, H, W, 3] of one run of `seconds` of video from `state` (None: the stream's start), the state
    at its end, the run's summary, and the stream's identity (stages/stream/state.py)."""
    from models.config import NEUTRAL_TEXT
    from stages.eval.bench.runner import _Collect, _Typist
    from stages.stream.events import AudioChunk, AudioEnd, EventQueue
    from stages.stream.session import SessionOptions, run_session
    from stages.stream.state import identity
    parts = bench._parts(str(image))
    ident = identity(parts, image)
    done = state["frames"] if state else 0
    events = EventQueue()
    typist = _Typist(events, case["actions"], FPS, NEUTRAL_TEXT)
    typist.push_due(done, put=state is None)      # resumed: those due before the stop were given then
    events.put(AudioChunk(case["audio"][state["audio_samples"] if state else 0:]))
    events.put(AudioEnd())
    collect, saved = _Collect(), []
    summary = run_session(parts, events, [collect], SessionOptions(max_seconds=seconds), live=typist, resume=state,
                          save=saved.append)
    if not saved:
        raise SystemExit(f"the segment ended without a whole state ({summary.get('reason')})")
    return np.concatenate(collect.frames), saved[0], summary, ident


def sheet(shots: Path, path: Path) -> None:
    """First and last frame of each finished segment (W/shots.npz), one row each, as a PNG."""
    from PIL import Image
    if shots.is_file():
        with np.load(shots) as z:
            rows = [np.concatenate([z[k][0], z[k][-1]], 1) for k in sorted(z.files, key=int)]
        Image.fromarray(np.concatenate(rows, 0)).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, help="a copy of W's outputs (the device's $OUT)")
    ap.add_argument("--ckpt", type=Path, help="default: the starter model")
    ap.add_argument("--case", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--segment", type=float, default=600.0, help="seconds of video per run")
    ap.add_argument("--budget", type=float, default=540.0, help="wall seconds this call may use")
    ap.add_argument("--workers", type=int, default=12, help="scoring processes")
    ap.add_argument("--compile", action="store_true", help="the model's blocks compiled (vidu stream --compile)")
    ap.add_argument("--scratch", type=Path, help="where a segment's frames wait for their scoring (default: /dev/shm "
                    "when it has room, else --work); moved to --work at a call's end if unscored, unless the scratch "
                    "was found to live through calls")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    t_call = time.perf_counter()
    os.environ.setdefault("VIDU_TEXT_TABLE", str(ROOT / "benchmarks" / "data" / "text_table.safetensors"))  # no MiniLM
    from PIL import Image

    from models.starter import starter_checkpoint
    from stages.eval.bench.runner import EvalBench
    from stages.stream.state import check_identity, write_state
    W = a.work
    W.mkdir(parents=True, exist_ok=True)
    ckpt = a.ckpt or starter_checkpoint()
    log_path = W / "segments.json"
    record = json.loads(log_path.read_text()) if log_path.is_file() else {
        "checkpoint": str(ckpt), "case": a.case, "minutes": a.minutes, "segment_s": a.segment, "device": a.device,
        "compile": a.compile, "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
        "segments": []}
    for k, v in (("case", a.case), ("minutes", a.minutes), ("segment_s", a.segment), ("compile", a.compile)):
        if record[k] != v:
            raise SystemExit(f"{W} holds a stream with {k} {record[k]}, not {v}: another --work")
    segs = record["segments"]
    t0 = time.perf_counter()
    case = hour_case(a.case, a.minutes * 60, cache=W / "case.npz")
    total = case["frames"]                        # 1 + 4k: the stream's own frame count
    image = W / "ref.png"
    Image.fromarray(case["ref"]).save(image)
    print(f"case {a.case}: {case['frames']} frames, {len(case['actions'])} instructions, voice {case['voice']}; "
          f"inputs made in {time.perf_counter() - t0:.1f} s", flush=True)
    bench = EvalBench(bench="synth", system=str(ckpt), preset="small", device=a.device, compile=a.compile)
    bench.setup()
    scratch = a.scratch or default_scratch(W, 2 * int(a.segment * FPS + 1) * case["ref"].nbytes)  # two segments
    scratch.mkdir(parents=True, exist_ok=True)
    moving = not scratch_survives(W, scratch)     # unscored frames go to W at the call's end
    print(f"frames wait in {scratch}" + ("" if scratch == W else ", which " + ("must be moved to W at the call's end"
          if moving else "lived through the last call")), flush=True)
    found = recover(W, segs, scratch)
    state, saved = (found["state"], found["identity"]) if found else (None, None)
    scoring: dict = {}                            # the one scoring process running: {"index", "process", "t0"}

    def start_scoring() -> None:
        """Score the oldest unscored segment in its own process (one at a time: the stream keeps its cores)."""
        if scoring:
            return
        todo = [s["index"] for s in segs if "scores" not in s and frames_file(s["index"], [scratch, W])]
        if todo:
            i = todo[0]
            proc = mp.get_context("spawn").Process(target=score_file, args=(
                str(frames_file(i, [scratch, W])), a.case, a.minutes * 60, str(W / "case.npz"), segs[i]["frames_start"],
                a.workers, str(W / f"scores_{i}.json")))
            proc.start()
            scoring.update(index=i, process=proc, t0=time.perf_counter())

    def collect(wait_s: float = 0.0) -> None:
        """Take the running scoring's result if it ends within wait_s, and start the next one."""
        if not scoring:
            return
        proc = scoring["process"]
        proc.join(wait_s)
        if proc.is_alive():
            return
        i = scoring["index"]
        out = W / f"scores_{i}.json"
        if proc.exitcode != 0 or not out.is_file():
            raise SystemExit(f"scoring segment {i} failed (exit code {proc.exitcode})")
        segs[i]["scores"] = json.loads(out.read_text())
        segs[i]["score_s"] = round(time.perf_counter() - scoring["t0"], 1)
        scoring.clear()
        commit()
        out.unlink()
        frames_file(i, [scratch, W]).unlink()
        start_scoring()

    seg_bytes = int(a.segment * FPS + 1) * case["ref"].nbytes

    def fits() -> bool:
        """Another segment, its save and its commit fit this call's budget, judged by the last segment, with
        time to move its frames to W should its scoring not finish (the first segment of a stream always runs:
        it includes compilation and the context's growth)."""
        if not segs:
            return True
        last = segs[-1]
        need = last["stream_s"] + last.get("save_s", 0.0) + 10.0 + (seg_bytes / DISK_BYTES_S if moving else 0.0)
        return time.perf_counter() - t_call + need <= a.budget

    def commit() -> None:
        """W/segments.json and --out's copies, each replaced whole (a call killed at any moment leaves W
        consistent: the next call redoes at most the segment it was streaming)."""
        record["drift_vs_first"] = drift(segs) if segs and "scores" in segs[0] else []
        atomic_write(log_path, json.dumps(record, indent=1, default=float).encode())
        sheet(W / "shots.npz", W / "sheet.png")
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            for f in ("segments.json", "sheet.png"):
                if (W / f).is_file():
                    shutil.copyfile(W / f, a.out / f)
            if (W / "state.st").is_file():                # in pieces under the device's 16 MiB a file:
                data = (W / "state.st").read_bytes()      # cat state.st.* > state.st
                for i in range(0, len(data), PIECE):
                    (a.out / f"state.st.{i // PIECE:02d}").write_bytes(data[i:i + PIECE])

    start_scoring()                               # what the previous call left unscored, beside this call's stream
    try:
        while (state["frames"] if state else 0) < total:
            done = state["frames"] if state else 0
            if not fits():
                print(f"stopping for this call: {time.perf_counter() - t_call:.0f} s of {a.budget:.0f} spent")
                break
            seconds = min(a.segment, (total - done) / FPS)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t1 = time.perf_counter()
            frames, new, summary, ident = stream_segment(bench, case, image, seconds, state)
            if state is not None:
                check_identity(saved, ident, W / "state.st")
            stream_s = time.perf_counter() - t1
            i = len(segs)
            seg = {"index": i, "frames_start": done, "frames_end": new["frames"], "stream_s": round(stream_s, 2),
                   "fps": summary.get("fps"), "chunk_ms_p50": summary.get("chunk_ms_median"),
                   "chunk_ms_p95": summary.get("chunk_ms_p95"), "first_chunk_s": summary.get("first_chunk_s"),
                   "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None}
            # the commit: frames and first/last shots, then the state beside the old one, then segments.json,
            # then the state in place (recover() finishes or drops a commit a killed call left half done)
            t2 = time.perf_counter()
            tmp = scratch / f"unscored_{i}.npy.tmp"
            with open(tmp, "wb") as fh:
                np.save(fh, frames)
            tmp.replace(scratch / f"unscored_{i}.npy")
            t3 = time.perf_counter()
            shots = dict(np.load(W / "shots.npz")) if (W / "shots.npz").is_file() else {}
            with open(W / "shots.npz.tmp", "wb") as fh:
                np.savez(fh, **shots, **{str(i): frames[[0, -1]]})
            (W / "shots.npz.tmp").replace(W / "shots.npz")
            del frames
            t4 = time.perf_counter()
            write_state(W / NEXT_STATE, new, ident)
            t5 = time.perf_counter()
            seg["save_s"] = round(t5 - t2, 2)
            seg["save_parts_s"] = {"frames": round(t3 - t2, 2), "shots": round(t4 - t3, 2), "state": round(t5 - t4, 2)}
            segs.append(seg)
            commit()
            (W / NEXT_STATE).replace(W / "state.st")
            saved, state = ident, new
            print(f"segment {i}: frames {done}-{state['frames']}, {stream_s:.0f} s, {seg['fps']:.1f} fps, "
                  f"chunk p50/p95 {seg['chunk_ms_p50']:.1f}/{seg['chunk_ms_p95']:.1f} ms, saved in {seg['save_s']:.0f} s {seg['save_parts_s']}",
                  flush=True)
            start_scoring()
            collect()
    finally:
        # the stream's end: score what remains; else wait for the running scoring only while the budget lasts
        # (a scoring cut short is redone by the next call, from the frames kept in W)
        finished = (state["frames"] if state else 0) >= total
        while scoring:
            unsaved = sum(f.stat().st_size for f in scratch.glob("unscored_*.npy")) if moving else 0
            left = 1e9 if finished else a.budget - (time.perf_counter() - t_call) - unsaved / DISK_BYTES_S
            if left <= 0:
                stop_scoring(scoring["process"])
                print(f"segment {scoring['index']} is left unscored for the next call")
                break
            collect(wait_s=min(left, 5.0))
        if moving and any("scores" not in s for s in segs):
            print(f"unscored frames kept in {W} for the next call in {persist(W, scratch, segs):.0f} s")
        commit()
    table(record)


def table(record: dict) -> None:
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    print(f"\n{record['checkpoint']} case {record['case']} on {record['gpu'] or record['device']}: "
          f"{len(record['segments'])} segments of {record['segment_s']:g} s")
    print("| segment | minutes | fps | chunk p50 / p95 ms | peak GiB | lip-sync r | control |r| | instructions | "
          "spurious / min | identity | sharpness | motion |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in record["segments"]:
        c = s.get("scores") or {}
        ctrl = c.get("mouth_r_control")
        print(f"| {s['index']} | {s['frames_start'] / FPS / 60:.1f}-{s['frames_end'] / FPS / 60:.1f} | {f(s['fps'], 1)} | "
              f"{f(s['chunk_ms_p50'], 1)} / {f(s['chunk_ms_p95'], 1)} | {f(s['peak_gib'], 2)} | {f(c.get('mouth_r'))} | "
              f"{f(None if ctrl is None else abs(ctrl))} | {f(c.get('instr_success'))} of {c.get('instr_events', '-')} | "
              f"{f(c.get('spurious_per_min'), 1)} | {f(c.get('identity_error'), 2)} | {f(c.get('sharpness'), 5)} | "
              f"{f(c.get('motion'), 2)} |")
    if record.get("drift_vs_first"):
        print("\ndrift, segment / first segment:")
        for s, d in zip(record["segments"], record["drift_vs_first"]):
            print(f"  {s['index']}: " + ", ".join(f"{k} {f(v)}" for k, v in d.items()))


if __name__ == "__main__":
    main()
