"""One stream session on N GPUs (`vidu stream --gpus N`): the model's forwards split over N processes
by Ulysses sequence parallelism (models/ulysses.py).

Rank 0 runs the session (inputs, events, decoding, outputs) with a `LeadEngine`; ranks 1..N-1 run
`follow`: they build the model rank 0 sends (config and weights, so every rank holds the same one
whatever it was loaded from) with their num_heads / N heads of the caches, and repeat every engine call
rank 0 makes (start, step, recache) with the same arguments and noise seed. Every forward's
collectives then meet, and every rank's engine holds the same chunks.

    with session_ranks(parts, n=2, device="cuda", seed=0) as parts:   # this process is rank 0
        run_session(parts, ...)
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import socket
from contextlib import contextmanager

import torch
import torch.distributed as dist

from models.dit import DiT
from models.ulysses import check_heads
from stages.stream.engine import ChunkInputs, StreamEngine
from stages.stream.events import StreamError

STOP = "stop"
TIMEOUT = datetime.timedelta(minutes=10)      # a rank waiting this long for the others (a chunk) fails


def _send(group, message: tuple) -> None:
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group)


def _receive(group) -> tuple:
    box = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _moved(x, device):
    """A call's argument (a tensor, ChunkInputs or None) on `device`."""
    if isinstance(x, ChunkInputs):
        return dataclasses.replace(x, **{f.name: _moved(getattr(x, f.name), device) for f in dataclasses.fields(x)})
    return x.to(device) if torch.is_tensor(x) else x


class LeadEngine(StreamEngine):
    """Rank 0's engine: each call is sent to the followers (arguments on the CPU) before it runs."""

    def __init__(self, *args, group, **kw):
        super().__init__(*args, **kw)
        self.group = group

    def _call(self, name: str, *args) -> None:
        _send(self.group, (name, tuple(_moved(a, "cpu") for a in args)))

    def start(self, ref_latent, voice=None):
        self._call("start", ref_latent, voice)
        super().start(ref_latent, voice)

    def step(self, inputs):
        self._call("step", inputs)
        return super().step(inputs)

    def recache(self, text):
        self._call("recache", text)
        super().recache(text)

    def close(self) -> None:
        """The followers return."""
        _send(self.group, (STOP, ()))


def lead(engine: StreamEngine, group, seed: int) -> LeadEngine:
    """Rank 0: the followers get `engine`'s model (config, then weights) and settings; returns an engine
    over the group with the same model, settings and reference (`engine` is dropped: its caches hold
    every head)."""
    model, ref = engine.model, engine.ref
    voice = None if engine.voice is None else int(engine.voice[0])
    _send(group, ("setup", (model.cfg, engine.cfg, engine.st, engine.batch, seed, engine.dtype, model.kernel_settings())))
    for t in model.state_dict().values():
        dist.broadcast(t, src=0, group=group)
    model.shard_sequence(group)
    lead_engine = LeadEngine(model, engine.cfg, engine.st, engine.batch, seed, group=group)
    if ref is not None:
        lead_engine.start(ref, voice)
    return lead_engine


@torch.no_grad()
def follow(group, device) -> None:
    """Ranks > 0: build the model rank 0 sends and repeat its engine calls until it stops."""
    name, args = _receive(group)
    if name == STOP:
        return
    dit_cfg, cfg, st, batch, seed, dtype, kernels = args
    model = DiT(dit_cfg).to(device=device, dtype=dtype).eval()
    model.use_kernels(**kernels)                     # the lead's fast path: every rank computes alike
    for t in model.state_dict().values():
        dist.broadcast(t, src=0, group=group)
    model.shard_sequence(group)
    engine = StreamEngine(model, cfg, st, batch, seed)
    while True:
        name, args = _receive(group)
        if name == STOP:
            return
        getattr(engine, name)(*(_moved(a, device) for a in args))


def _rank_device(device: str, rank: int) -> torch.device:
    return torch.device("cpu") if device == "cpu" else torch.device("cuda", rank)


def _join(rank: int, n: int, address: str, device: str) -> None:
    if device != "cpu":
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if device == "cpu" else "nccl", init_method=address, rank=rank, world_size=n,
                            timeout=TIMEOUT)


def _follower(rank: int, n: int, address: str, device: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)           # rank 0 stops it (Ctrl-C reaches the whole group)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    _join(rank, n, address, device)
    try:
        follow(dist.group.WORLD, _rank_device(device, rank))
    finally:
        dist.destroy_process_group()


@contextmanager
def session_ranks(parts, n: int, device: str, seed: int):
    """`parts` (stages/stream/session.py Parts) with its engine over `n` processes of this machine: this
    one is rank 0 on cuda:0 (or the CPU, gloo: for tests), the others are started here on cuda:1..n-1
    and stopped on exit (terminated after an error or Ctrl-C, when they may be inside a forward)."""
    check_heads(parts.cfg.dit.num_heads, n)
    if device not in ("cpu", "cuda", "cuda:0"):
        raise StreamError(f"--gpus runs rank r on cuda:r; --device {device} does not fit (use cuda or auto)")
    if device != "cpu" and torch.cuda.device_count() < n:
        raise StreamError(f"--gpus {n}: this machine has {torch.cuda.device_count()} GPU(s)")
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_follower, args=(r, n, address, device), daemon=True) for r in range(1, n)]
    for p in procs:
        p.start()
    _join(0, n, address, device)
    engine, clean = None, False
    try:
        engine = lead(parts.engine, dist.group.WORLD, seed)
        yield dataclasses.replace(parts, engine=engine)
        clean = True
    finally:
        if clean:
            engine.close()
        for p in procs:
            p.join(timeout=30 if clean else 0)
            if p.is_alive():
                p.terminate()
                p.join()
        if clean:                  # after an error a collective may still wait: the process exits anyway
            dist.destroy_process_group()
