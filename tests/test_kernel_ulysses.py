"""qk_rope's kernels under Ulysses sequence parallelism (models/ulysses.py), on two gloo processes and the tiny preset
(Triton's interpreter on the CPU: conftest sets TRITON_INTERPRET=1, which the spawned ranks inherit).

With DiT.use_kernels() a sharded forward normalises q and k with the fused kernel's norm-only pass
(qk_rope.rms_norm_heads: the rank's tokens, every head) before the all-to-all and rotates them with its RoPE pass
(qk_rope.rope, at the sequence's positions) after it, instead of the torch expressions. It must give what the
single-process forward with the kernels gives (outputs, and this rank's heads of the keys/values), and what the
sharded forward without them gives; the kernels must have run (launches counted); and a mutant that rotates by the
angles of the neighbouring token must break the equality. INT8 and sparse self-attention work per head, so a rank's
heads must attend exactly as in one process, a context rotated once (DiT.rotate) served by each rank's prefix cache."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.config import PRESETS
from models.dit import DiT

TINY = PRESETS["tiny"]                                   # 2 heads; 18 tokens a frame: 9 per rank
TOL = 1e-5


def scrambled(seed: int = 0) -> DiT:
    """Random weights everywhere and peaky self-attention (q/k norm gains near 4), so positions matter."""
    torch.manual_seed(seed)
    m = DiT(TINY.dit)
    with torch.no_grad():
        for name, p in m.named_parameters():
            gain = 4.0 if name.endswith(("norm_q.weight", "norm_k.weight")) and "self_attn" in name else 0.0
            p.copy_(gain + torch.randn_like(p) * 0.1)
    return m.eval()


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    d, h, w, B, F = TINY.dit, TINY.height // 8, TINY.width // 8, 2, 3     # ref + 3 frames: 72 keys
    return (torch.randn(B, d.in_dim, F, h, w, generator=g), torch.rand(B, F, generator=g) * 1000,
            torch.randn(B, 5, d.text_dim, generator=g),
            dict(audio=torch.randn(B, F + sum(d.audio_context), 16, d.audio_dim, generator=g),
                 audio_latent=torch.randn(B, F, d.audio_latent_tokens, d.audio_latent_dim, generator=g),
                 ref=torch.randn(B, d.in_dim, 1, h, w, generator=g)))


def run(model: DiT, group, kernels: bool, attention: str = "sdpa"):
    """A block-causal forward with the ref frame, then one attending to its keys/values (rotated in the forward),
    then two attending to them rotated once (DiT.rotate, as a stream's chunk: a fast backend's cache serves the
    second)."""
    model.shard_sequence(group)
    model.use_kernels(kernels, attention)
    x, t, text, kw = inputs(1)
    x2, t2, text2, _ = inputs(2)
    x3, t3, text3, _ = inputs(3)
    with torch.no_grad():
        first = model(x, t, text, **kw, mask="causal", return_kv=True)
        second = model(x2, t2, text2, **{**kw, "ref": None}, kv=first.kv, return_kv=True)
        ctx = model.rotate(first.kv)
        third = model(x3, t3, text3, **{**kw, "ref": None}, kv=ctx, return_kv=True)
        fourth = model(x2, t2, text2, **{**kw, "ref": None}, kv=ctx, return_kv=True)
    return first, second, third, fourth


def diff(one, many, mine: slice | None) -> float:
    """Largest difference, relative to the largest value, of outputs and keys/values (mine: this rank's heads of the
    single-process ones)."""
    out = 0.0
    for a, b in zip(one, many):
        pairs = [(a.video, b.video), (a.audio, b.audio)]
        pairs += [(x if mine is None else x[:, :, mine], y) for x, y in zip(a.kv.k + a.kv.v, b.kv.k + b.kv.v)]
        out = max(out, max(float((x - y).abs().max()) / max(1.0, float(x.abs().max())) for x, y in pairs))
    return out


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from vidu_kernels import qk_rope
        group = dist.group.WORLD
        heads = TINY.dit.num_heads // world
        mine = slice(rank * heads, (rank + 1) * heads)
        model = scrambled()
        one = run(model, None, True)
        launches = []
        launch = qk_rope._launch
        qk_rope._launch = lambda x4, w, cos, *a: launches.append(cos is None) or launch(x4, w, cos, *a)
        sharded = run(model, group, True)
        qk_rope._launch = launch
        plain = run(model, group, False)
        rope = qk_rope.rope
        qk_rope.rope = lambda x, cos, sin: rope(x, cos.roll(1, 0), sin.roll(1, 0))       # the mutant's positions
        mutant = run(model, group, True)
        qk_rope.rope = rope
        res = {"kernels": diff(one, sharded, mine), "plain": diff(plain, sharded, None),
               "mutant": diff(one, mutant, mine), "norm_launches": sum(launches),
               "rope_launches": len(launches) - sum(launches), "layers": TINY.dit.num_layers}
        for backend in ("int8", "sparse"):          # the fast backends on the rank's heads, their caches too
            one_fast = run(model, None, True, backend)
            sharded_fast = run(model, group, True, backend)
            res[backend] = diff(one_fast, sharded_fast, mine)
            res[backend + "_hits"] = [b.self_attn.prefix_cache.hits for b in model.blocks]
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)        # as tests/test_ulysses.py: leave without gloo's teardown, which sometimes aborts


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ulysses_kernels")
    mp.spawn(_worker, args=(2, str(out / "store"), str(out)), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_sharded_kernels_equal_one_process(two_ranks):
    for r in two_ranks:
        assert r["kernels"] <= TOL and r["plain"] <= TOL, r
        # every block of the four forwards: q and k normalised by the kernel before the exchange; q, k and (the
        # second forward) the context's keys rotated by it after; DiT.rotate's one launch per block between
        n = r["layers"]
        assert r["norm_launches"] == 2 * 4 * n and r["rope_launches"] == (2 + 3 + 1 + 2 + 2) * n, r
        assert r["mutant"] > 1e-2, r
        # INT8 / sparse attention per head: a rank's heads attend as they do in one process
        assert r["int8"] <= TOL and r["sparse"] <= TOL, r
        assert r["int8_hits"] == [1] * n and r["sparse_hits"] == [0] * n, r     # sparse attention keeps nothing
