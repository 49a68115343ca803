"""`vidu stream` is a pure function of its inputs inside a long-lived process: the same stream run twice
in one process, with other work in between that changes the process's global state (the global torch,
numpy and stdlib RNGs, the heap), gives the same frames bit for bit.

The frames compared are the ones the stream generates (`--out -`, raw rgb24), not an mp4 decoded
back: libx264 (PyAV's build) is not reproducible inside one process. It reads memory it never
initialised, so its packets depend on what the allocator hands it, i.e. on the process's history
(an mp4 of the same frames differed in 2 of 8 in-process runs with the model's frames bit-identical;
with MALLOC_PERTURB_ set, so every allocation starts with the same bytes, 12 of 12 agreed; a fresh
process always gives the same file). That is why the --say / --audio mp4 comparison of
tests/test_stream_say.py differed inside the full suite's process and never alone.

The torch thread count is an input here, not history: float reductions split over another number of
threads round differently (1 vs 2 threads: frames differ by one level), so the fixture puts it back."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.conftest import scramble_stream_models, write_face, write_speech_tone

SR = 16000
FAST = ("--steps", "1", "--no-twin", "-q")       # a few chunks of the tiny preset: under a second each
SIZE = 64                                         # the tiny preset's frames: 64 x 64


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A face, 0.6 s of speech-like audio, and the tiny preset and TAEHV with random weights large enough
    that the noise and the speech change the frames (as tests/test_stream_say.py makes them), drawn from
    generators of their own (the global RNG is the thing under test)."""
    from models.checkpoint import save_model
    from models.config import PRESETS
    from models.dit import DiT
    from models.taehv import TAEHV
    d = tmp_path_factory.mktemp("pure")
    write_face(d / "face.png")
    write_speech_tone(d / "speech.wav", 0.6, seed=3)
    dit, tae = DiT(PRESETS["tiny"].dit), TAEHV()
    scramble_stream_models(dit, tae)
    save_model(d / "dit.safetensors", dit, PRESETS["tiny"])
    torch.save(tae.state_dict(), d / "taehv.pth")
    return {"face": d / "face.png", "audio": d / "speech.wav", "ckpt": d / "dit.safetensors", "tae": d / "taehv.pth"}


@pytest.fixture(autouse=True)
def same_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def frames(inputs, *extra) -> np.ndarray:
    """The stream's frames [T, 64, 64, 3], run in this process (typer's CliRunner), raw on stdout."""
    from typer.testing import CliRunner

    from vidu_cli.app import app
    res = CliRunner().invoke(app, ["stream", "--ckpt", str(inputs["ckpt"]), "--decoder-weights", str(inputs["tae"]),
                                   "--image", str(inputs["face"]), "--audio", str(inputs["audio"]), "--out", "-",
                                   *FAST, *extra])
    assert res.exit_code == 0, res.stderr + repr(res.exception)
    out = np.frombuffer(res.stdout_bytes, np.uint8)
    assert out.size and out.size % (SIZE * SIZE * 3) == 0, out.size
    return out.reshape(-1, SIZE, SIZE, 3)


def draw_global_rngs() -> None:
    torch.rand(1000), torch.randn(7, 3), torch.randint(0, 9, (5,))
    torch.manual_seed(1234)                      # another test, or a server's other work, reseeds it
    torch.rand(3)
    np.random.seed(99)
    np.random.rand(100)
    random.seed(5)
    random.random()


def churn_heap() -> None:
    """Allocate and free buffers of many sizes (what the encoder's uninitialised reads see)."""
    keep = [np.full(n, n % 251, np.uint8) for n in (17, 4096, 65536, 1 << 20) for _ in range(8)]
    keep += [torch.full((n,), 0.5) for n in (33, 5000, 70000)]
    del keep


def global_rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


@pytest.mark.parametrize("pollute", [draw_global_rngs, churn_heap], ids=["global-rngs", "heap"])
def test_a_stream_does_not_depend_on_the_process_history(inputs, pollute):
    first = frames(inputs)
    before = global_rng_states()
    pollute()
    if pollute is draw_global_rngs:              # negative control: the pollution did change the global state
        after = global_rng_states()
        assert not torch.equal(before[0], after[0])
        assert not np.array_equal(before[1], after[1])
        assert before[2] != after[2]
    again = frames(inputs)
    assert first.shape == again.shape and first.shape[0] > 5
    assert np.array_equal(first, again)


def test_the_frames_do_depend_on_the_random_draws_and_the_thread_count(inputs):
    """Negative controls: the frames are not blind to randomness (another --seed, other frames), so a
    stream drawing from the global RNG would have failed the test above; and another thread count
    changes them (float rounding: an input, not history)."""
    base = frames(inputs)
    assert not np.array_equal(base, frames(inputs, "--seed", "1"))
    torch.set_num_threads(1 if torch.get_num_threads() > 1 else 2)
    other = frames(inputs)
    if not np.array_equal(base, other):          # on a one-core machine both counts may round alike
        assert np.abs(base.astype(int) - other).max() <= 3
