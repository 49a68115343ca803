"""The one attention entry point every model calls.

`attention(q, k, v, mask)` takes tokens-first tensors ([B, L, H, D], as the DiT produces them) and
dispatches to a backend. Today the backend is PyTorch SDPA (flash / memory-efficient / math chosen
by PyTorch); faster backends (low-bit, sparse) register here later and are checked against
`attention_reference`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, Lq, H, D], k/v: [B, Lk, H, D], mask: bool [Lq, Lk] (True = may attend) or None.
    Returns [B, Lq, H, D] in q's dtype."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def attention_reference(q, k, v, mask=None):
    """Plain softmax(q k^T / sqrt(D)) v in float32: the oracle for fast backends."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)
