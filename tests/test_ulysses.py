"""Ulysses sequence parallelism (models/ulysses.py) on two gloo processes and the tiny preset, against
the single-process model: the forward (with a key/value context and padded frames), the streaming
engine's chunks (TwinCache, sink, wrapping window, guidance, recache; sharded engines, and the
LeadEngine with a follower of `vidu stream --gpus`), the teachers' losses and their gradients (stage 2
with gradient checkpointing); a wrong all-to-all must break the equality.

Measured on a 2-core CPU, one thread a process: the forward outputs and keys/values are bitwise
equal (max abs difference 0.0) and so are the losses; the stream's chunks differ by up to 6e-6 on
values up to 5.8 (matmuls over fewer rows round differently; the difference does not grow over the
chunks); the group's summed gradients differ by 3e-7 of the largest gradient (the order of the sum).
The tests allow 1e-5 (relative to the largest value). The wrong all-to-all moves outputs by 2 to 20.
Slow: `vidu train --sequence-parallel 2` under torchrun (FSDP2 + Ulysses) against one process, like
tests/test_train.py, and `vidu stream --gpus 2 --device cpu` against one process."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.config import PRESETS
from models.dit import DiT
from models.ulysses import SequenceShards, check_heads
from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings
from stages.stream.ranks import follow, lead
from stages.train.machinery import Dist, batch_rows
from stages.train.objectives import Draw, ObjectiveSettings, bidirectional_loss, causal_loss
from tests.conftest import cli

TINY = PRESETS["tiny"]                                   # 2 heads; 18 tokens a frame: 9 per rank
PADDED = TINY.replace(dit=dataclasses.replace(TINY.dit, audio_latent_tokens=3))    # 19 tokens: one pad
SMALL_FRAMES = TINY.replace(height=32, width=32)         # 6 tokens a frame, for the stream
TOL = 1e-5


def scrambled(cfg, seed=0) -> DiT:
    """Random weights everywhere (the zero-initialised heads and adapters too), so that every path
    reaches the outputs, and peaky self-attention (q/k norm gains near 4), so that positions matter."""
    torch.manual_seed(seed)
    m = DiT(cfg.dit)
    with torch.no_grad():
        for name, p in m.named_parameters():
            gain = 4.0 if name.endswith(("norm_q.weight", "norm_k.weight")) and "self_attn" in name else 0.0
            p.copy_(gain + torch.randn_like(p) * 0.1)
    return m


def swapped(real):
    """A wrong all-to-all: seq_to_heads joining the ranks' token slices in reverse order."""
    def mutant(self, x):
        return real(self, x).unflatten(1, (-1, self.world, self.local)).flip(2).flatten(1, 3)
    return mutant


def mutated(on: bool):
    return mock.patch.object(SequenceShards, "seq_to_heads", swapped(SequenceShards.seq_to_heads)) if on else nullcontext()


def maxdiff(a, b) -> float:
    return float((a.detach() - b.detach()).abs().max())


def forward_inputs(cfg, B=2, F=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    d, h, w = cfg.dit, cfg.height // 8, cfg.width // 8
    x = torch.randn(B, d.in_dim, F, h, w, generator=g)
    t = torch.rand(B, F, generator=g) * 1000
    text = torch.randn(B, F, 5, d.text_dim, generator=g)                 # a text per frame
    kw = dict(audio=torch.randn(B, F + sum(d.audio_context), 16, d.audio_dim, generator=g),
              audio_latent=torch.randn(B, F, d.audio_latent_tokens, d.audio_latent_dim, generator=g),
              ref=torch.randn(B, d.in_dim, 1, h, w, generator=g))
    return x, t, text, kw


def forward_diff(cfg, group, mutant=False) -> float:
    """Largest difference of the sharded forward from the single-process one: a block-causal call
    with the ref frame, then a call attending to its keys/values (this rank's heads of them)."""
    rank, heads = dist.get_rank(group), cfg.dit.num_heads // dist.get_world_size(group)
    mine = slice(rank * heads, (rank + 1) * heads)
    model = scrambled(cfg).eval()
    x, t, text, kw = forward_inputs(cfg)
    x2, t2, text2, _ = forward_inputs(cfg, seed=2)
    outs = []
    for sp in (None, group):
        model.shard_sequence(sp)
        with torch.no_grad(), mutated(mutant and sp is not None):
            first = model(x, t, text, **kw, mask="causal", return_kv=True)
            kw2 = {**kw, "ref": None}
            second = model(x2, t2, text2, **kw2, kv=first.kv, return_kv=True)
        outs.append((first, second))
    diffs = []
    for one, many in zip(*outs):
        diffs += [maxdiff(one.video, many.video), maxdiff(one.audio, many.audio)]
        diffs += [maxdiff(a[:, :, mine], b) for a, b in zip(one.kv.k + one.kv.v, many.kv.k + many.kv.v)]
    return max(diffs)


def stream(group, mutant=False, led=False) -> torch.Tensor:
    """Six chunks of a TwinCache stream with sink, a window that wraps, guidance and a recache after the
    third chunk: every chunk's video and joint audio latents, flattened. `led`: rank 0's engine of
    `vidu stream --gpus` (stages/stream/ranks.py `lead`; the other ranks `follow` it)."""
    cfg, d = SMALL_FRAMES, SMALL_FRAMES.dit
    g = torch.Generator().manual_seed(3)
    text, text2 = torch.randn(1, 5, d.text_dim, generator=g), torch.randn(1, 5, d.text_dim, generator=g)
    audio = torch.randn(1, 6 + sum(d.audio_context), 16, d.audio_dim, generator=g)
    ref = torch.randn(1, d.in_dim, 1, cfg.height // 8, cfg.width // 8, generator=g)
    model = scrambled(cfg).eval()
    st = StreamSettings(chunk_frames=1, steps=3, window=2, guidance=2.0, recache=True)
    if led:
        eng = lead(StreamEngine(model, cfg, st, seed=0), group, seed=0)
    else:
        model.shard_sequence(group)
        eng = StreamEngine(model, cfg, st, seed=0)
    eng.start(ref)
    chunks = []
    with mutated(mutant):
        for j in range(6):
            if j == 3:
                text = text2
                eng.recache(text)
            r = eng.step(ChunkInputs(text, audio[:, j:j + 1 + sum(d.audio_context)]))
            chunks += [r.video.flatten(), r.audio.flatten()]
    if led:
        eng.close()
    return torch.cat(chunks)


def training_batch(cfg, F, B=2, seed=4):
    g = torch.Generator().manual_seed(seed)
    d, h, w = cfg.dit, cfg.height // 8, cfg.width // 8
    return {"video": torch.randn(B, d.in_dim, F, h, w, generator=g), "ref": torch.randn(B, d.in_dim, 1, h, w, generator=g),
            "text": torch.randn(B, F, 5, d.text_dim, generator=g),
            "audio": torch.randn(B, F + sum(d.audio_context), 16, d.audio_dim, generator=g),
            "audio_latent": torch.randn(B, F, d.audio_latent_tokens, d.audio_latent_dim, generator=g)}


def loss_and_grads(objective, group, st, batch, grad_ckpt=False) -> tuple[float, dict]:
    model = scrambled(TINY).train()
    model.shard_sequence(group)
    model.gradient_checkpointing = grad_ckpt            # the blocks' all-to-alls run again in the backward
    B = batch["video"].shape[0]
    loss, _ = objective(model, batch, st, Draw(torch.Generator().manual_seed(5), 0, B, B))
    loss.backward()
    return float(loss.detach()), {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def training_diffs(group) -> dict:
    """Per objective (stage 2 with gradient checkpointing): loss difference, and the relative gradient
    difference of the group's summed gradients and of this rank's own share (which must differ: the sum
    is needed)."""
    out = {}
    cases = {"bidirectional": (bidirectional_loss, ObjectiveSettings(), TINY.latent_frames, False),
             "causal": (causal_loss, ObjectiveSettings(chunk_frames=1, window=2, sink=True), 6, True)}
    for name, (objective, st, F, grad_ckpt) in cases.items():
        batch = training_batch(TINY, F)
        loss1, g1 = loss_and_grads(objective, None, st, batch)
        loss2, g2 = loss_and_grads(objective, group, st, batch, grad_ckpt)
        own = max(maxdiff(g2[n], g1[n]) for n in g1)
        for g in g2.values():
            dist.all_reduce(g, group=group)
        scale = max(float(g.abs().max()) for g in g1.values())
        out[name] = {"loss": abs(loss1 - loss2), "loss_value": loss1,
                     "grad": max(maxdiff(g2[n], g1[n]) for n in g1) / scale, "own_share": own / scale}
    return out


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        one, two = stream(None), stream(group)
        res = {"forward": forward_diff(TINY, group), "forward_padded": forward_diff(PADDED, group),
               "forward_mutant": forward_diff(TINY, group, mutant=True),
               "stream": maxdiff(one, two), "stream_mutant": maxdiff(one, stream(group, mutant=True)),
               "stream_scale": float(one.abs().max()), "train": training_diffs(group)}
        if rank == 0:
            res["stream_led"] = maxdiff(one, stream(group, led=True))
        else:
            follow(group, torch.device("cpu"))
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()
    # Done, results written: leave without the interpreter's teardown. About one run in four, a thread
    # torch/gloo leaves behind aborts it ("terminate called without an active exception", SIGABRT
    # after both ranks returned from here), which mp.spawn reports as a failed rank.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Rendezvous through a FileStore in a fresh folder, not a TCP port: a port taken with bind(0) and
    closed again stays free only until someone else binds it, and the children import torch for
    seconds before rank 0 listens on it (on a shared CI machine another process, or a torchrun of
    another test, can get it; the client rank then talks to a stranger)."""
    out = tmp_path_factory.mktemp("ulysses")
    mp.spawn(_worker, args=(2, str(out / "store"), str(out)), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_sequence_parallel_groups_share_their_rows_of_the_batch():
    rows = [batch_rows(8, Dist(rank, 4), sequence_parallel=2) for rank in range(4)]
    assert rows == [(0, 4), (0, 4), (4, 8), (4, 8)]
    assert [batch_rows(8, Dist(rank, 4)) for rank in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_heads_must_split_over_the_ranks():
    check_heads(12, 4)
    with pytest.raises(ValueError, match="12 heads over 5 ranks"):
        check_heads(12, 5)


def test_sharded_forward_equals_one_process(two_ranks):
    for r in two_ranks:
        assert r["forward"] <= TOL and r["forward_padded"] <= TOL, r
        assert r["forward_mutant"] > 1e-2, r                        # the wrong all-to-all is caught


def test_sharded_stream_equals_one_process(two_ranks):
    for r in two_ranks:
        assert r["stream"] <= TOL * max(1.0, r["stream_scale"]), r
        assert r["stream_mutant"] > 1e-2, r
    assert two_ranks[0]["stream_led"] <= TOL * max(1.0, two_ranks[0]["stream_scale"])   # a LeadEngine and a follower


def test_sharded_losses_and_gradients_equal_one_process(two_ranks):
    for r in two_ranks:
        for name, t in r["train"].items():
            assert t["loss"] <= TOL * abs(t["loss_value"]), (name, t)
            assert t["grad"] <= TOL, (name, t)
            assert t["own_share"] > 1e-2, (name, t)                # one rank's share is not the gradient


@pytest.mark.slow
def test_torchrun_sequence_parallel_training_matches_one_process(tmp_path):
    """`vidu train --sequence-parallel 2` on two torchrun processes (FSDP2 + Ulysses, gloo): the losses
    and gradient norms of one process on the same global batch."""
    work = ["--workdir", str(tmp_path / "work"), "-q"]
    cli("train", "--stage", "autoencoder", "--steps", "1", "--batch", "1", "--samples", "1", "--save-every", "1",
        "--out", str(tmp_path / "ae"), *work)
    args = ["train", "--stage", "bidirectional", "--preset", "tiny", "--steps", "3", "--batch", "2", "--samples", "2",
            "--save-every", "3", "--codec", str(tmp_path / "ae" / "step-000001" / "ema.safetensors"), *work]
    cli(*args, "--out", str(tmp_path / "one"))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "vidu_cli",
                          *args, "--sequence-parallel", "2", "--out", str(tmp_path / "two")],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    def logged(out):
        return [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    a, b = logged(tmp_path / "one"), logged(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert abs(x[key] - y[key]) <= TOL * abs(x[key]), (key, a, b)


@pytest.mark.slow
def test_vidu_stream_gpus_generates_the_one_process_frames(tmp_path):
    """`vidu stream --gpus 2 --device cpu` (two gloo processes: rank 0's session and a follower) writes
    the frames one process writes with the same model and decoder (random weights, saved): measured, 1
    byte of 159744 one level apart; another noise seed changes 17 % of them."""
    from PIL import Image

    from models.checkpoint import save_model, save_taehv
    from models.taehv import TAEHV
    face = tmp_path / "face.png"
    Image.new("RGB", (100, 120), (200, 150, 120)).save(face)
    ckpt = save_model(tmp_path / "scrambled.safetensors", scrambled(TINY), TINY)
    torch.manual_seed(0)
    decoder = save_taehv(tmp_path / "decoder.safetensors", TAEHV(TINY.taehv), TINY.taehv)

    def frames(*extra):    # started together: each run is mostly its one-thread start-up (imports, loading)
        return subprocess.Popen([sys.executable, "-m", "vidu_cli", "stream", "--image", str(face), "--ckpt", str(ckpt),
                                 "--decoder-weights", str(decoder), "--out", "-", "--seconds", "0.4", "--device", "cpu",
                                 "-q", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    procs = frames(), frames("--gpus", "2"), frames("--seed", "1")
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err.decode()[-2000:] for _, err in outs]
    one, two, other = (torch.frombuffer(bytearray(out), dtype=torch.uint8).int() for out, _ in outs)
    assert one.numel() == two.numel() == 13 * 64 * 64 * 3
    assert int((one - two).abs().max()) <= 1 and float((one != two).float().mean()) < 1e-3
    assert float((one != other).float().mean()) > 0.05
