"""benchmarks/long_stream.py's recovery after a call killed mid-commit (the hour-long stream runs as device calls
that the device's limit can kill at any moment): W is put back to its last finished segment, or refused."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.stream.state import write_state

_spec = importlib.util.spec_from_file_location("long_stream", Path(__file__).resolve().parents[1] / "benchmarks" / "long_stream.py")
long_stream = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(long_stream)
NEXT_STATE, recover = long_stream.NEXT_STATE, long_stream.recover

IDENT = {"image": "x", "size": [256, 256], "model": "m", "decoder": "d", "dtype": "float32"}


def state(frames: int) -> dict:
    return {"frames": frames, "kv": torch.full((2, 3), float(frames))}


def seg(i: int, f0: int, f1: int, scored: bool = False) -> dict:
    return {"index": i, "frames_start": f0, "frames_end": f1, **({"scores": {"mouth_r": 0.5}} if scored else {})}


@pytest.fixture
def W(tmp_path: Path) -> Path:
    write_state(tmp_path / "state.st", state(101), IDENT)
    np.save(tmp_path / "unscored_0.npy", np.zeros((2, 4, 4, 3), np.uint8))
    return tmp_path


def test_killed_before_segments_json_drops_the_segment(W: Path):
    """Killed after the new state and frames were written, before segments.json had the segment."""
    write_state(W / NEXT_STATE, state(201), IDENT)
    np.save(W / "unscored_1.npy", np.zeros((2, 4, 4, 3), np.uint8))
    (W / "shots.npz.tmp").write_bytes(b"half")
    (W / "scores_0.json").write_text(json.dumps({"mouth_r": 0.1}))
    found = recover(W, [seg(0, 0, 101)])
    assert found["state"]["frames"] == 101 and torch.equal(found["state"]["kv"], torch.full((2, 3), 101.0))
    assert found["identity"] == IDENT
    assert sorted(p.name for p in W.iterdir()) == ["state.st", "unscored_0.npy"]


def test_killed_after_segments_json_finishes_the_commit(W: Path):
    """Killed after segments.json had the segment, before the new state was put in place."""
    write_state(W / NEXT_STATE, state(201), IDENT)
    np.save(W / "unscored_1.npy", np.zeros((2, 4, 4, 3), np.uint8))
    found = recover(W, [seg(0, 0, 101, scored=True), seg(1, 101, 201)])
    assert found["state"]["frames"] == 201 and torch.equal(found["state"]["kv"], torch.full((2, 3), 201.0))
    # segment 0 was scored: its frames go; segment 1's stay for its scoring
    assert sorted(p.name for p in W.iterdir()) == ["state.st", "unscored_1.npy"]


def test_a_state_that_is_not_the_last_segments_is_refused(W: Path):
    """Negative control: a state ahead of segments.json with no commit under way is not silently resumed."""
    write_state(W / "state.st", state(201), IDENT)
    with pytest.raises(SystemExit, match="state.st is at frame 201, segments.json at 101"):
        recover(W, [seg(0, 0, 101)])


def test_nothing_streamed_yet(tmp_path: Path):
    write_state(tmp_path / NEXT_STATE, state(101), IDENT)
    assert recover(tmp_path, []) is None and not any(tmp_path.iterdir())


def test_scratch_frames_are_found_kept_or_marked_lost(W: Path, tmp_path_factory):
    """Frames waiting in the call's scratch (RAM) count as W's: a scored segment's go, an unscored one's stay;
    an unscored segment whose frames are in neither (a killed call's scratch gone) is marked lost, not waited for."""
    scratch = tmp_path_factory.mktemp("shm")
    (W / "unscored_0.npy").unlink()
    np.save(scratch / "unscored_0.npy", np.zeros((2, 4, 4, 3), np.uint8))
    np.save(scratch / "unscored_2.npy", np.zeros((2, 4, 4, 3), np.uint8))
    (scratch / "unscored_3.npy.tmp").write_bytes(b"half")
    write_state(W / "state.st", state(301), IDENT)
    segs = [seg(0, 0, 101, scored=True), seg(1, 101, 201), seg(2, 201, 301)]
    found = recover(W, segs, scratch)
    assert found["state"]["frames"] == 301
    assert sorted(p.name for p in scratch.iterdir()) == ["unscored_2.npy"]
    assert [s.get("lost", False) for s in segs] == [False, True, False]
    assert long_stream.frames_file(2, [scratch, W]) == scratch / "unscored_2.npy"
    assert long_stream.frames_file(1, [scratch, W]) is None


def test_persist_moves_unscored_frames_to_W(W: Path, tmp_path_factory):
    """At a call's end the unscored frames leave the scratch for W, byte for byte; scored ones are not copied."""
    scratch = tmp_path_factory.mktemp("shm")
    frames = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.save(scratch / "unscored_1.npy", frames)
    np.save(scratch / "unscored_2.npy", frames)
    segs = [seg(0, 0, 101), seg(1, 101, 201), seg(2, 201, 301, scored=True)]
    long_stream.persist(W, scratch, segs)
    assert sorted(p.name for p in scratch.iterdir()) == ["unscored_2.npy"]     # scored: left for its collect to delete
    np.testing.assert_array_equal(np.load(W / "unscored_1.npy"), frames)
    assert long_stream.persist(W, W, segs) >= 0 and (W / "unscored_1.npy").is_file()   # no scratch: nothing moves


def test_a_scratch_that_lives_through_calls_is_recognised(W: Path, tmp_path_factory):
    """The first call cannot know (frames go to W at its end); a later call that finds the mark of this W knows;
    a scratch emptied between calls (a fresh machine) or marked by another W does not count; W itself always does."""
    scratch = tmp_path_factory.mktemp("shm")
    assert not long_stream.scratch_survives(W, scratch)
    assert long_stream.scratch_survives(W, scratch)
    (scratch / "call.mark").unlink()
    assert not long_stream.scratch_survives(W, scratch)
    other = tmp_path_factory.mktemp("other")
    assert not long_stream.scratch_survives(other, scratch)   # the mark is now other's
    assert not long_stream.scratch_survives(W, scratch)
    assert long_stream.scratch_survives(W, W)


def _sleeping_pool(ready) -> None:
    """A scorer's stand-in: its own process group (as score_file), a pool of spawned workers, then wait."""
    import multiprocessing as mp
    import os
    import time
    from concurrent.futures import ProcessPoolExecutor
    os.setsid()
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        ready.put(sorted({pool.submit(os.getpid).result() for _ in range(4)}))
        time.sleep(600)


def test_stopping_a_scoring_kills_its_pool_workers():
    """Killing a scorer kills its pools' workers too (a plain kill leaves them orphaned: the control)."""
    import multiprocessing as mp
    import os
    import time

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:       # a zombie is gone for our purpose
            return f.read().split(") ")[1][0] != "Z"

    ctx = mp.get_context("spawn")
    for stop, survives in ((lambda p: (p.kill(), p.join()), True), (long_stream.stop_scoring, False)):
        ready = ctx.Queue()
        proc = ctx.Process(target=_sleeping_pool, args=(ready,))
        proc.start()
        workers = ready.get(timeout=120)
        assert workers and all(alive(w) for w in workers)
        stop(proc)
        time.sleep(0.5)
        assert any(alive(w) for w in workers) == survives, stop
        for w in workers:                              # the control's orphans
            if alive(w):
                os.kill(w, 9)
