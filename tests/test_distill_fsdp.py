"""`vidu distill` under torchrun: two processes (FSDP2 over gloo, each its rows of the global batch) train
what one process trains with the same global batch, step for step, pure DMD and with PCM (its EMA student
gathered); a run cut short resumes on two processes where the uninterrupted one ended.

The one-process runs (the reference and the other-seed control) are `vidu distill` in this process (typer's
CliRunner): a fresh interpreter's start-up and imports cost more than the 3 tiny steps (measured on one thread:
8.7 s a run as a process, 1.6 s in this one once the modules are loaded)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ARGS = ("--steps", "3", "--batch", "2", "--chunks", "2", "--samples", "2", "--save-every", "1", "--quiet")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tests.test_distill import tiny_teacher
    return tiny_teacher(tmp_path_factory.mktemp("teacher"))[0]


def history(out) -> list[dict]:
    return [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]


def torchrun(teacher, out, work, *extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "vidu_cli",
                           "distill", "--from", str(teacher), "--out", str(out), "--workdir", str(work), *ARGS, *extra],
                          env=env, capture_output=True, text=True, timeout=600)


def close(a: list[dict], b: list[dict], keys=("loss", "loss_dmd", "loss_critic", "grad_norm")) -> bool:
    return len(a) == len(b) and all(abs(x[k] - y[k]) <= 1e-4 * max(abs(x[k]), 1e-6) for x, y in zip(a, b) for k in keys)


def test_two_processes_distill_what_one_does_and_resume(teacher, tmp_path):
    from models.checkpoint import read_state_dict
    from tests.conftest import cli
    one, two = tmp_path / "one", tmp_path / "two"
    cli("distill", "--from", str(teacher), "--out", str(one), "--workdir", str(tmp_path / "w1"), *ARGS)
    run = torchrun(teacher, two, tmp_path / "w2")
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = history(one), history(two)
    assert len(a) == 3 and close(a, b), (a, b)
    assert len({round(h["loss"], 6) for h in a}) == 3                       # the steps differ from each other
    for name in ("model", "ema", "critic"):                                 # the same weights, gathered whole
        x, y = (read_state_dict(o / "step-000003" / f"{name}.safetensors") for o in (one, two))
        assert x.keys() == y.keys()
        assert all(torch.allclose(x[k].float(), y[k].float(), rtol=1e-3, atol=1e-5) for k in x), name
    # control: the same run with another seed is not within the tolerance
    seeded = tmp_path / "seeded"
    cli("distill", "--from", str(teacher), "--out", str(seeded), "--workdir", str(tmp_path / "w3"), *ARGS,
        "--seed", "1")
    assert not close(a, history(seeded))
    # cut back to step 1 and re-run on two processes: it ends where it ended
    shutil.rmtree(two / "step-000003")
    shutil.rmtree(two / "step-000002")
    (two / "latest").write_text("step-000001\n")
    again = torchrun(teacher, two, tmp_path / "w2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["resumed_from"] == 1
    assert close(b, history(two))


def test_with_pcm_two_processes_distill_what_one_does(teacher, tmp_path):
    """PCM's EMA student is the gathered EMA on an unsharded copy: the PCM term and the updates match."""
    from tests.conftest import cli
    one, two = tmp_path / "one", tmp_path / "two"
    pcm = ("--pcm-weight", "0.5", "--pcm-distance", "latent")
    cli("distill", "--from", str(teacher), "--out", str(one), "--workdir", str(tmp_path / "w1"), *ARGS, *pcm)
    run = torchrun(teacher, two, tmp_path / "w2", *pcm)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = history(one), history(two)
    assert all(h["loss_pcm"] > 0 for h in a) and close(a, b, ("loss", "loss_dmd", "loss_pcm", "grad_norm")), (a, b)


def test_a_batch_that_does_not_split_is_refused_on_several_processes():
    from stages.distill.loop import DistillSettings, check_world
    from stages.train.machinery import Dist
    check_world(DistillSettings(batch=4, pcm_weight=0.5), Dist(1, 2))
    check_world(DistillSettings(batch=3), Dist(0, 1))                          # one process: any batch
    with pytest.raises(ValueError, match="--batch 3 does not split over 2 processes"):
        check_world(DistillSettings(batch=3), Dist(0, 2))
