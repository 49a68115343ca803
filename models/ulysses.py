"""Ulysses sequence (context) parallelism for the DiT: the collectives and the token layout.

N ranks of a process group run one sample's forward together (DeepSpeed-Ulysses, Jacobs et al. 2023).
Each rank holds a slice of every frame's tokens — tokens [r * S/N, (r+1) * S/N) of each of the F frames,
each frame's S tokens padded with zeros to a multiple of N — so everything the DiT does per frame (the
adaLN modulation by the frame's timestep, the frame's text, the audio adapter's per-frame speech
window) stays local, and a one-frame streaming chunk splits as well as a long clip. Around
self-attention an all-to-all trades the token slice for a head slice:

    q, k, v [B, F, S/N, H, D]  --seq_to_heads-->  [B, F*S, H/N, D]  (every token, H/N heads)
    attention over the whole sequence (global RoPE positions and mask, cached context by heads)
    out [B, F*S, H/N, D]       --heads_to_seq-->  [B, F, S/N, H, D]

so RoPE, the block-causal / reference mask and the streaming key/value context are the
single-process ones, applied to H/N heads (the context buffers hold H/N heads per rank).
Cross-attention needs no communication: text and speech keys are short and every rank has them, so
each rank attends from its own query tokens. The output heads run on local tokens and `gather` joins
their predictions, which every rank then holds whole.

Gradients: every op is local except the collectives, whose backward passes are their transposes,
and `gather`, whose backward keeps the rank's own slice of the output's gradient. That is right when
what follows the forward is the same on every rank of the group (the loss of one sample, the
sampler's update): each rank's parameter gradients are then the contributions of its tokens, and their
sum over the group is the single-process gradient (stages/train/loop.py gets it from FSDP2's
reduction).

    model.shard_sequence(group)      # models/dit.py: every forward of `model` now runs over `group`
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def check_heads(num_heads: int, world: int) -> None:
    """ValueError unless the heads split evenly over the ranks."""
    if world < 1 or num_heads % world:
        raise ValueError(f"sequence parallelism splits attention heads over ranks: {num_heads} heads over "
                         f"{world} ranks do not split (use a rank count that divides {num_heads})")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 in equal parts ([N, ...]: part j goes to rank j, part j of the
    result came from rank j); its own transpose, so the backward is the same exchange."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _Gather(torch.autograd.Function):
    """All ranks' [N parts of] x stacked on a new dim 0; backward keeps this rank's part (what follows
    is the same on every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.rank = dist.get_rank(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None


@dataclass(frozen=True)
class SequenceShards:
    """The token layout of one forward over `group`: frames of S tokens, each split into `world` slices
    of `local` tokens (the last padded)."""
    group: ProcessGroup
    S: int                  # tokens per frame

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def local(self) -> int:
        return -(-self.S // self.world)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F, S, C] (the same on every rank) -> this rank's tokens [B, F, local, C]."""
        pad = self.local * self.world - self.S
        if pad:
            x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], 2)
        return x[:, :, self.rank * self.local:(self.rank + 1) * self.local]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F, local, C] of every rank -> [B, F, S, C] on every rank."""
        parts = _Gather.apply(x, self.group)                          # [N, B, F, local, C]
        return parts.permute(1, 2, 0, 3, 4).flatten(2, 3)[:, :, :self.S]

    def seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F*local, H, D] this rank's tokens, all heads -> [B, F*S, H/N, D] every token, this rank's heads."""
        B, _, H, D = x.shape
        N = self.world
        x = x.unflatten(1, (-1, self.local)).unflatten(3, (N, H // N))     # [B, F, local, N, H/N, D]
        x = _AllToAll.apply(x.permute(3, 0, 1, 2, 4, 5), self.group)        # [N (token slice), B, F, local, H/N, D]
        return x.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)[:, :, :self.S].flatten(1, 2)

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F*S, H/N, D] every token, this rank's heads -> [B, F*local, H, D] this rank's tokens."""
        N = self.world
        x = x.unflatten(1, (-1, self.S))                                      # [B, F, S, H/N, D]
        pad = self.local * N - self.S
        if pad:
            x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], 2)
        x = x.unflatten(2, (N, self.local)).permute(2, 0, 1, 3, 4, 5)         # [N (token slice), B, F, local, H/N, D]
        x = _AllToAll.apply(x, self.group)                                    # [N (head slice), B, F, local, H/N, D]
        return x.permute(1, 2, 3, 0, 4, 5).flatten(3, 4).flatten(1, 2)
