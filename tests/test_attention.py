"""`vidu_kernels.attention.attention_reference` (the float32 oracle for fast backends): a case worked by
hand, PyTorch SDPA on awkward shapes with and without a mask, low-precision inputs, and the
`attention` entry point against it."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vidu_kernels.attention import attention, attention_reference


def sdpa(q, k, v, mask=None):
    # q: [B, Lq, H, D] -> SDPA's [B, H, Lq, D] and back
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


def qkv(B, Lq, Lk, H, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H, D, generator=g).to(dtype) for L in (Lq, Lk, Lk)]


def test_hand_computed_case():
    # D = 4, scale 1/2: scores q.k0 / 2 = 0 and q.k1 / 2 = ln 3, so the weights are 1/4 and 3/4
    q = torch.tensor([2.0, 0, 0, 0]).view(1, 1, 1, 4)
    k = torch.tensor([[0.0, 0, 0, 0], [math.log(3.0), 0, 0, 0]]).view(1, 2, 1, 4)
    v = torch.tensor([[4.0, 0, 0, 0], [0, 8.0, 0, 0]]).view(1, 2, 1, 4)
    out = attention_reference(q, k, v)
    assert out.shape == (1, 1, 1, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor([1.0, 6.0, 0.0, 0.0]))
    # masking the second key leaves the first value alone; masking the first, the second
    torch.testing.assert_close(attention_reference(q, k, v, torch.tensor([[True, False]])).flatten(), v[0, 0, 0])
    torch.testing.assert_close(attention_reference(q, k, v, torch.tensor([[False, True]])).flatten(), v[0, 1, 0])


@pytest.mark.parametrize("B,Lq,Lk,H,D", [(1, 1, 1, 1, 1), (2, 7, 13, 3, 24), (3, 17, 5, 2, 40), (1, 33, 33, 4, 64)])
def test_matches_sdpa_without_and_with_a_mask(B, Lq, Lk, H, D):
    q, k, v = qkv(B, Lq, Lk, H, D, seed=Lq * 100 + Lk)
    torch.testing.assert_close(attention_reference(q, k, v), sdpa(q, k, v), rtol=1e-5, atol=1e-5)
    # a causal-style mask aligned to the end of the keys (query i sees keys up to Lk - Lq + i), plus holes
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
    mask &= torch.rand(Lq, Lk, generator=g) > 0.3
    mask[:, 0] = True  # every query sees at least one key
    ref = attention_reference(q, k, v, mask)
    torch.testing.assert_close(ref, sdpa(q, k, v, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(q, k, v, mask), ref, rtol=1e-5, atol=1e-5)
    if not mask.all():  # negative control: the mask changes the answer, so the comparison can fail
        assert not torch.allclose(ref, attention_reference(q, k, v), rtol=1e-3, atol=1e-3)


def test_low_precision_inputs_are_computed_in_float32():
    q, k, v = qkv(2, 9, 11, 2, 16, seed=5, dtype=torch.bfloat16)
    out = attention_reference(q, k, v)
    assert out.dtype == torch.bfloat16
    exact = sdpa(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), exact, rtol=2 ** -8, atol=1e-6)  # only the final rounding to bf16
    torch.testing.assert_close(attention(q, k, v).float(), exact, rtol=3e-2, atol=3e-2)


def test_wrong_scale_or_swapped_inputs_are_caught():
    # negative controls: the same check rejects an unscaled softmax and k/v swapped
    q, k, v = qkv(2, 7, 13, 3, 24, seed=9)
    ref = attention_reference(q, k, v)
    unscaled = torch.einsum("bhqk,bkhd->bqhd", torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1), v)
    assert not torch.allclose(ref, unscaled, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(ref, attention_reference(q, v, k), rtol=1e-3, atol=1e-3)
