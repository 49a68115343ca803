"""A stream (stages/stream/engine.py) with a fast self-attention backend keeps what the backend derives from each
cached context (vidu_kernels.prefix_cache) across a chunk's forwards, and streams exactly what it streams without
(Triton's interpreter on the CPU; conftest sets TRITON_INTERPRET=1)."""
from __future__ import annotations

import pytest
import torch

from models.config import PRESETS
from vidu_kernels._triton import runs_triton
from tests.test_stream_engine import scrambled


@pytest.mark.parametrize("backend", ["int8", "sparse"])
def test_a_stream_with_the_caches_equals_one_without(backend):
    """The stream engine (TwinCache, a wrapping window) with a fast backend: every block's cache is hit (a chunk's
    second noisy step reuses the noisy context's derived keys, its cache pass the last step's clean ones), and the
    chunks equal, bit for bit, those of the same stream whose blocks have no cache. (Under guidance the steps read the
    context doubled to 2B rows, the cache pass the B rows: one hit a chunk.)"""
    from stages.stream.engine import StreamSettings
    from tests.test_stream_engine import run_engine
    if not runs_triton(torch.zeros(1)):
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1)")
    cfg = PRESETS["tiny"].replace(height=64, width=64)          # 8x8 latent: 16 video tokens a frame
    st = StreamSettings(chunk_frames=1, steps=3, window=2, twin=True, noisy_step=1)
    runs = []
    for cached in (True, False):
        model = scrambled(cfg.dit)
        model.use_kernels(attention=backend, keep_context=cached)
        assert all((b.self_attn.prefix_cache is None) != cached for b in model.blocks)
        with torch.no_grad():
            runs.append((model, run_engine(model, st, 4, cfg=cfg)[1]))
    (model, outs), (_, plain) = runs
    assert all(torch.equal(a.video, b.video) and torch.equal(a.audio, b.audio) for a, b in zip(outs, plain))
    # INT8's cache serves every chunk (it keeps the context's mean too); sparse attention builds its block map from
    # each call's q and k and keeps nothing (its cache stays empty: the two runs are the same computation)
    want = {"int8": 2 * 4, "sparse": 0}[backend]
    assert all(b.self_attn.prefix_cache.hits == want for b in model.blocks), [
        b.self_attn.prefix_cache.hits for b in model.blocks]
