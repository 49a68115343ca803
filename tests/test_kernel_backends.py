"""The model's self-attention through the fast backends of vidu_kernels (DiT.use_kernels(attention=...)), run in
Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1)."""
from __future__ import annotations

import pytest
import torch

from models.config import PRESETS
from tests.test_stream_engine import scrambled

CFG = PRESETS["tiny"].dit


def forward_args(frames: int, seed: int, ref: bool = True, kv=None) -> tuple[torch.Tensor, dict, torch.Generator]:
    """A tiny DiT forward's latent [1, C, frames, 8, 8] and keyword inputs (speech, joint audio latent, and a ref
    frame or a kv context), and the generator to draw the rest from."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, CFG.in_dim, frames, 8, 8, generator=g)
    args = dict(audio=torch.randn(1, frames + sum(CFG.audio_context), 16, CFG.audio_dim, generator=g),
                audio_latent=torch.randn(1, frames, CFG.audio_latent_tokens, CFG.audio_latent_dim, generator=g))
    if ref:
        args["ref"] = torch.randn(1, CFG.in_dim, 1, 8, 8, generator=g)
    if kv is not None:
        args["kv"] = kv
    return x, args, g


@pytest.mark.parametrize("backend,bound", [("int8", 3e-2), ("sparse", 3e-2)])
def test_the_model_with_a_fast_attention_backend(backend, bound):
    """DiT.use_kernels(attention=...): a tiny DiT forward through the INT8 or block-sparse self-attention (Triton's
    interpreter; a forward with a ref frame passes a mask, so this one has none: a context and its chunk) stays
    within the backend's approximation of SDPA's; an unknown backend is a one-line error."""
    from models.dit import KV
    from models.rope import grid_positions
    cfg = CFG
    model = scrambled(cfg)
    g = torch.Generator().manual_seed(2)
    n_ctx, heads = 3 * 16, cfg.num_heads
    kv = KV([torch.randn(1, n_ctx, heads, cfg.head_dim, generator=g) for _ in range(cfg.num_layers)],
            [torch.randn(1, n_ctx, heads, cfg.head_dim, generator=g) for _ in range(cfg.num_layers)],
            grid_positions(torch.arange(1, 4), 4, 4))                      # 3 context frames of 4x4 tokens
    x, args, g = forward_args(1, 4, ref=False, kv=kv)
    text, t = torch.randn(1, 5, cfg.text_dim, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        want = model(x, t, text, **args).video
        model.use_kernels(attention=backend)
        got = model(x, t, text, **args).video
    err = float((got - want).norm() / want.norm())
    assert 0 < err < bound
    with pytest.raises(ValueError, match="attention is one of: sdpa, int8, sparse"):
        model.use_kernels(attention="flash9")


@pytest.mark.parametrize("fmt,bound", [("int8", 2e-2), ("fp8", 6e-2)])
def test_the_model_with_w8a8_linears(fmt, bound):
    """DiT.quantize: every block's attention projections and FFN become W8A8 GEMMs (the Triton kernels in the
    interpreter) and the forward stays within the format's quantization error of the float one; the
    embeddings, time projection and head stay float."""
    from vidu_kernels.w8a8 import W8A8Linear
    cfg = CFG
    model = scrambled(cfg)
    x, args, g = forward_args(2, 3)
    text, t = torch.randn(1, 5, cfg.text_dim, generator=g), torch.tensor([400.0])
    with torch.no_grad():
        want = model(x, t, text, **args).video
        swapped = model.quantize(fmt)
        got = model(x, t, text, **args).video
    per_block = 4 * 3 + 2                                  # q, k, v, o of self, text and audio attention; ffn 0, 2
    assert len(swapped) == per_block * cfg.num_layers
    assert not isinstance(model.head.head, W8A8Linear) and not isinstance(model.text_embedding[0], W8A8Linear)
    err = float((got - want).norm() / want.norm())
    assert 0 < err < bound
