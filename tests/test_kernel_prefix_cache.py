"""vidu_kernels.prefix_cache: what INT8 attention (quantized key blocks) derives from a cached context, kept across
the calls of a chunk (block-sparse attention, in the compiled-block test, keeps nothing; Triton's interpreter on the
CPU: conftest sets TRITON_INTERPRET=1). Each cached call must equal the same call recomputing everything; stale-cache mutants (an
entry not invalidated when the context's keys are written in place) must fail that comparison."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import vidu_kernels.int8_attention as I8
import vidu_kernels.prefix_cache as PC
import vidu_kernels.sparse_attention as SA
from models.config import PRESETS
from tests.test_kernel_backends import forward_args
from tests.test_stream_engine import scrambled
from vidu_kernels._triton import runs_triton
from vidu_kernels.prefix_cache import PrefixCache, prefix_length

B, H, D, BLK = 2, 2, 32, 16
LC = 45                       # context keys: two whole blocks of 16 and a partial one (the chunk's keys follow it)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def context(seed: int = 0, dtype=torch.float32, offset: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    ck = torch.randn(B, LC, H, D, generator=g) + offset * torch.randn(B, 1, H, D, generator=g)
    return ck.to(dtype), torch.randn(B, LC, H, D, generator=g).to(dtype)


def step(ck, cv, seed: int, lx: int = 20, lq: int = 20):
    """One call's inputs: the chunk's queries, and [context + chunk] keys/values (new tensors, as the DiT's cat)."""
    g = torch.Generator().manual_seed(100 + seed)
    dt = ck.dtype
    q = torch.randn(B, lq, H, D, generator=g).to(dt)
    kx = (torch.randn(B, lx, H, D, generator=g) + 3.0).to(dt)
    vx = torch.randn(B, lx, H, D, generator=g).to(dt)
    return q, torch.cat([ck, kx], 1), torch.cat([cv, vx], 1)


class Grids:
    """Counts the launches of a Triton kernel and the programs of each (its grid's first axis)."""

    def __init__(self, kernel):
        self.kernel, self.first = kernel, []

    def __getitem__(self, grid):
        self.first.append(grid[0])
        return self.kernel[grid]


@pytest.fixture(autouse=True)
def interpreter():
    if not runs_triton(torch.zeros(1)):
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1)")


# ----------------------------------------------------------------------------------------------- the cache

def test_prefix_cache_keys_on_the_tensor_and_its_version():
    cache = PrefixCache(2)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    built = []
    build = lambda tag: (lambda: built.append(tag) or tag)  # noqa: E731
    assert cache.get(a, "x", build("a")) == "a" and cache.get(a, "x", build("a2")) == "a"
    assert cache.get(a, "y", build("ay")) == "ay"                        # another derived kind: its own entry
    assert cache.get(b, "x", build("b")) == "b"                          # an equal-shaped other tensor: a miss
    assert len(cache) == 2 and cache.lookup(a, "x") is None              # LRU: size 2, (a, "x") dropped
    assert cache.get(b, "x", build("b2")) == "b"
    b.add_(1)                                                            # written in place: invalidated
    assert cache.get(b, "x", build("b3")) == "b3"
    assert built == ["a", "ay", "b", "b3"]
    assert cache.hits == 2 and cache.misses == 4
    view = b[:2]                                                         # a view is its own prefix ...
    assert cache.get(view, "x", build("v")) == "v"
    b[0, 0] = 5.0                                                        # ... and shares b's version counter
    assert cache.lookup(view, "x") is None and len(cache) == 1          # the stale entry went
    cache.put(view, "x", "v2")
    assert len(cache) == 2
    del view                                                             # a freed tensor's entry goes at once
    assert len(cache) == 1
    with torch.inference_mode():                                         # no version counter: never cached
        c = torch.randn(3)
        assert cache.get(c, "x", build("c1")) == "c1" and cache.get(c, "x", build("c2")) == "c2"
    assert len(cache) == 1
    assert len(copy.deepcopy(cache)) == 0 and copy.deepcopy(cache).size == 2
    assert len(pickle.loads(pickle.dumps(cache))) == 0 and pickle.loads(pickle.dumps(cache)).size == 2
    with pytest.raises(ValueError):
        PrefixCache(0)


def test_prefix_length():
    k = torch.zeros(2, 10, 3, 8)
    assert prefix_length(None, k) is None and prefix_length(k[:, :0], k) is None and prefix_length(k[:, :4], k) == 4
    for bad in (torch.zeros(2, 11, 3, 8), torch.zeros(1, 4, 3, 8), torch.zeros(2, 4, 2, 8)):
        with pytest.raises(ValueError):
            prefix_length(bad, k)


# ----------------------------------------------------------------------------------------------- INT8 attention

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_cached_context_equals_requantizing_every_call(dtype, monkeypatch):
    """A chunk's calls (3 steps, a cache pass with a longer chunk, then a shorter one) over one context tensor: with the
    cache, the context's whole key blocks are quantized at the first call only (later calls launch the quantization
    for the blocks from the context's last whole block on, and no column sums), and every output equals, bit for bit,
    the call without a cache (all blocks quantized again). Both are the int8 reference with the context's mean."""
    ck, cv = context(1, dtype)
    cache = PrefixCache()
    quant, colsum = Grids(I8._quant_k_kernel), Grids(I8._k_colsum_kernel)
    monkeypatch.setattr(I8, "_quant_k_kernel", quant)
    monkeypatch.setattr(I8, "_k_colsum_kernel", colsum)
    for i, lx in enumerate((20, 20, 20, 37, 9)):
        q, k, v = step(ck, cv, i, lx)
        n_quant = len(quant.first)
        got = I8.int8_attention(q, k, v, block_q=BLK, block_k=BLK, prefix=ck, cache=cache)
        nk = -(-(LC + lx) // BLK)
        assert quant.first[n_quant:] == [nk if i == 0 else nk - LC // BLK]
        fresh = I8.int8_attention(q, k, v, block_q=BLK, block_k=BLK, prefix=ck)
        assert quant.first[-1] == nk
        assert torch.equal(got, fresh), i
        want = I8.int8_attention_reference(q, k, v, BLK, BLK, mean_keys=LC)
        assert rel_l2(got, want) < {torch.float32: 1e-5, torch.bfloat16: 6e-3}[dtype]
    assert cache.hits == 4 and cache.misses == 1
    assert len(colsum.first) == 1 + 5                      # the cache's once, the uncached calls' every time


def test_int8_prefix_smoothing_is_the_contexts_mean():
    """With a prefix, K smoothing subtracts the context's mean key; the keys' quantization, hence the output, differ
    from smoothing by all keys' mean (so the comparisons above are not vacuous), and both stay near exact attention."""
    from vidu_kernels.attention import attention_reference
    ck, cv = context(2)
    q, k, v = step(ck, cv, 0)
    ref = I8.quantize_qk_reference(q, k, BLK, BLK, mean_keys=LC)
    torch.testing.assert_close(ref.k_mean, ck.float().mean(1))
    with_prefix = I8.int8_attention(q, k, v, block_q=BLK, block_k=BLK, prefix=ck)
    plain = I8.int8_attention(q, k, v, block_q=BLK, block_k=BLK)
    exact = attention_reference(q, k, v)
    assert not torch.equal(with_prefix, plain)
    assert rel_l2(with_prefix, exact) < 2e-2 and rel_l2(plain, exact) < 2e-2
    _, _, mean = I8.quantize_k_triton(k, BLK, mean_keys=LC)
    torch.testing.assert_close(mean[..., :D], ck.float().mean(1), rtol=1e-5, atol=1e-6)


def test_int8_stale_cache_mutant_is_caught(monkeypatch):
    """The context written in place between two calls (a stream's buffers are): the cache sees the version change and
    requantizes, so the output equals the uncached call's. A mutant cache that ignores versions serves the old blocks:
    its output differs from the uncached call's, which the equality the tests use catches."""
    ck, cv = context(3)
    q, k, v = step(ck, cv, 0)
    cache = PrefixCache()
    I8.int8_attention(q, k, v, block_q=BLK, block_k=BLK, prefix=ck, cache=cache)
    ck.mul_(-0.5).add_(1.0)                                            # new keys, same tensor
    q, k, v = step(ck, cv, 1)
    fresh = I8.int8_attention(q, k, v, block_q=BLK, block_k=BLK, prefix=ck)
    assert torch.equal(I8.int8_attention(q, k, v, block_q=BLK, block_k=BLK, prefix=ck, cache=cache), fresh)
    assert cache.misses == 2

    stale_cache = PrefixCache()
    ck2, cv2 = context(3)
    q, k, v = step(ck2, cv2, 0)
    I8.int8_attention(q, k, v, block_q=BLK, block_k=BLK, prefix=ck2, cache=stale_cache)
    monkeypatch.setattr(PC, "_version", lambda t: 0)                   # the mutant: versions never change
    ck2.mul_(-0.5).add_(1.0)
    q, k, v = step(ck2, cv2, 1)
    stale = I8.int8_attention(q, k, v, block_q=BLK, block_k=BLK, prefix=ck2, cache=stale_cache)
    assert stale_cache.hits == 1
    assert not torch.equal(stale, fresh) and rel_l2(stale, fresh) > 1e-2


def test_int8_cache_off_the_kernel_path(monkeypatch):
    """Where no kernel runs the reference runs with the context's mean, and the cache is not consulted."""
    monkeypatch.setattr(I8, "runs_triton", lambda *t: False)
    ck, cv = context(4)
    q, k, v = step(ck, cv, 0)
    cache = PrefixCache()
    got = I8.int8_attention(q, k, v, block_q=BLK, block_k=BLK, prefix=ck, cache=cache)
    assert torch.equal(got, I8.int8_attention_reference(q, k, v, BLK, BLK, mean_keys=LC))
    assert cache.hits == cache.misses == 0


# ----------------------------------------------------------------------------------------------- in the model

@pytest.mark.parametrize("backend", ["int8"])
def test_the_model_reuses_a_rotated_context(backend):
    """A tiny DiT with a fast backend, three forwards (a chunk's steps) over one rotated context (DiT.rotate, as the
    stream engine hands it to every step): every block's cache is built at the first forward and hit by the next
    two, and each forward equals the same forward with the caches emptied before it. A context rotated inside the
    forward (not DiT.rotate's) is never cached."""
    from models.dit import KV
    from models.rope import grid_positions
    cfg = PRESETS["tiny"].dit
    model = scrambled(cfg)
    model.use_kernels(attention=backend)
    g = torch.Generator().manual_seed(7)
    n_ctx = 5 * 16 + 5                                  # one whole key block of 64 and a partial one
    kv = KV([torch.randn(1, n_ctx, cfg.num_heads, cfg.head_dim, generator=g) for _ in range(cfg.num_layers)],
            [torch.randn(1, n_ctx, cfg.num_heads, cfg.head_dim, generator=g) for _ in range(cfg.num_layers)],
            torch.cat([grid_positions(torch.arange(1, 6), 4, 4), torch.tensor([[6, 0, j] for j in range(5)])]))
    caches = [b.self_attn.prefix_cache for b in model.blocks]
    with torch.no_grad():
        ctx = model.rotate(kv)
        for i in range(3):
            x, args, g2 = forward_args(1, 20 + i, ref=False, kv=ctx)
            text, t = torch.randn(1, 5, cfg.text_dim, generator=g2), torch.tensor([900.0 - 300 * i])
            got = model(x, t, text, **args).video
            assert all(c.misses == 1 and c.hits == i for c in caches)
            hits = [c.hits for c in caches]
            for c in caches:
                c.clear()
            assert torch.equal(model(x, t, text, **args).video, got)
            for c, h in zip(caches, hits):
                c.hits, c.misses = h, 1
        args["kv"] = kv                                 # rotated in every forward: nothing to keep
        for c in caches:
            c.clear()
        model(x, t, text, **args)
        assert all(len(c) == 0 for c in caches)


@pytest.mark.parametrize("backend", ["int8", "sparse"])
def test_compiled_block_runs_the_fast_backend_eagerly(backend, monkeypatch):
    """A block compiled (aot_eager, as DiT.compile_blocks compiles them) with a fast attention backend: the backend is
    left out of the graph and runs eagerly, its Triton kernel and its prefix cache included (a traced launcher would
    be its torch reference, and INT8 attention's materialises every score); the output equals the uncompiled
    block's, bit for bit, and the cache serves the second call."""
    from models.dit import KV
    from models.rope import grid_positions
    torch._dynamo.reset()
    cfg = PRESETS["tiny"].dit
    model = scrambled(cfg)
    model.use_kernels(False, attention=backend)     # the element-wise kernels off: traced, they are their references
    g = torch.Generator().manual_seed(8)
    n_ctx = 5 * 16
    kv = KV([torch.randn(1, n_ctx, cfg.num_heads, cfg.head_dim, generator=g) for _ in range(cfg.num_layers)],
            [torch.randn(1, n_ctx, cfg.num_heads, cfg.head_dim, generator=g) for _ in range(cfg.num_layers)],
            grid_positions(torch.arange(1, 6), 4, 4))
    block = model.blocks[0]
    captured = []
    hook = block.register_forward_hook(lambda m, a, out: captured.append(a))
    with torch.no_grad():
        ctx = model.rotate(kv)
        for i in range(2):
            x, args, g2 = forward_args(1, 30 + i, ref=False, kv=ctx)
            model(x, torch.tensor([500.0]), torch.randn(1, 5, cfg.text_dim, generator=g2), **args)
    hook.remove()
    kernel = {"int8": (I8, "attend_quantized_k"), "sparse": (SA, "_attend")}[backend]
    calls = []
    real = getattr(*kernel)
    monkeypatch.setattr(*kernel, lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = block.self_attn.prefix_cache
    compiled = torch.compile(block, backend="aot_eager")
    with torch.no_grad():
        for i, a in enumerate(captured):
            eager = block(*a)
            cache.clear()
            hits = cache.hits
            got = compiled(*a)
            assert all(torch.equal(o, e) for o, e in zip(got, eager)), i
            assert len(calls) == 3 * i + 2
            cached = backend == "int8"                                 # sparse attention keeps nothing
            assert cache.hits == hits and len(cache) == int(cached)    # built by the compiled call itself
            got_again = compiled(*a)
            assert cache.hits == hits + int(cached) and all(torch.equal(o, e) for o, e in zip(got_again, eager))
    # negative control: the backend traced (without torch.compiler.disable) never launches the kernel
    from models import dit
    torch._dynamo.reset()
    traced = {"int8": lambda q, k, v, mask=None, prefix=None, cache=None: I8.int8_attention(q, k, v, mask, prefix=prefix),
              "sparse": lambda q, k, v, mask=None, prefix=None, cache=None: SA.sparse_attention(q, k, v)}
    monkeypatch.setitem(dit.SELF_ATTENTION, backend, traced[backend])
    n = len(calls)
    with torch.no_grad():
        torch.compile(block, backend="aot_eager")(*captured[0])
    assert len(calls) == n
    torch._dynamo.reset()

