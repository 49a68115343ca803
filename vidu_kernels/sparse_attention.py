"""Block-sparse attention with a training-free mask from pooled block similarity (issue 18).

The idea (SpargeAttention's, written here from the description): attention in a video DiT is mostly local, so
for each block of queries most blocks of keys carry almost no softmax mass. Which ones can be guessed cheaply
from block averages: mean-pool the queries over blocks of `block_q` tokens and the keys over blocks of `block_k`
tokens, take softmax(pooled_q . pooled_k^T / sqrt(D)) over the key blocks, and keep for each query block the
fewest key blocks whose estimated mass reaches `keep` (the accuracy knob: 1.0 keeps every block, so the result
is dense attention; lower keeps fewer and skips more work). A block average only stands for its tokens when they
agree, so a block whose tokens are not similar to each other (mean pairwise cosine below `min_sim`) is never
judged by its average: such a query block keeps every key block, such a key block is kept for every query block.
Key blocks named in `always` (block indices, negative from the end; default (0,): the first block_k keys, the
start of the reference frame, an attention sink) are always kept; to pin a whole reference frame of S tokens pass
range(ceil(S / block_k)).

- `block_mask_reference(q, k, block_q, block_k, keep, always=(), min_sim=...)` -> bool [B, H, nq, nk]: the rule in
  torch ops (the oracle of the map kernels).
- `block_map(q, k, block_q, block_k, keep, always, min_sim)` -> (mask, lut, cnt): the same mask built by two Triton
  launches where `runs_triton(q, k)` — one pools every query block and every key block (mean token, mean pairwise
  cosine), one per query block scores the key blocks, selects by the `keep` rule and writes the mask row and the
  list of kept key blocks the attention kernel walks — else the reference and `block_lists`.
- `sparse_attention_reference(q, k, v, block_mask, block_q, block_k)`: exact attention over the kept blocks,
  in float32 (the oracle of the kernel).
- `sparse_attention(q, k, v, keep=0.9, block_q=64, block_k=64, always=(0,), ...)` -> [B, Lq, H, D] in q's
  dtype: `block_map`, then a Triton flash-attention kernel that visits only the kept key blocks of each query block
  (online softmax, float32 accumulation): three launches in all, no host sync, where `runs_triton(q, k, v)`; else
  the reference. `return_mask=True` also returns the block mask; `kept_fraction(mask)` is the share of (query
  block, key block) tiles computed.

The map is built afresh at every call from that call's q and k (nothing is carried across calls, steps or layers),
so a call's output is a function of its inputs alone. Built in two launches it costs two reads of q and k (the
pooling) plus a few microseconds, against the dense attention's Lq x Lk work: the torch-op map it replaces (tens
of small launches, a sort per query block) cost more than the kernel saved at Wan 1.3B's shapes on the H200.
The kernel map selects exactly by the reference's rule; its float32 sums are taken in another order, so a tile
whose mass-before lies within float32 rounding of `keep` (or whose block similarity lies at `min_sim`) can be
decided the other way (the tests bound where masks may differ); on exact ties of the pooled scores the kernel
keeps every tied block where the reference, by its sort, may keep only the first.

Tensors are tokens-first as everywhere in vidu_kernels: q [B, Lq, H, D], k/v [B, Lk, H, D]; Lq may differ
from Lk (streaming: the chunk's queries against [cached context + chunk] keys), neither need be a multiple of
its block. There is no token mask: blocks replace it (the DiT's streaming calls use none).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vidu_kernels._triton import HAVE_TRITON, runs_triton

DEFAULT_MIN_SIM = 0.5  # mean pairwise cosine below which a block's average is not trusted (kept dense)


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> float32 [B, H, n, block, D] zero-padded to whole blocks, and each block's token count [n]."""
    B, L, H, D = x.shape
    n = -(-L // block)
    xb = F.pad(x.float(), (0, 0, 0, 0, 0, n * block - L)).view(B, n, block, H, D).permute(0, 3, 1, 2, 4)
    counts = torch.full((n,), float(block), device=x.device)
    counts[-1] = L - (n - 1) * block
    return xb, counts


def pool_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per batch and head: the mean token of each block [B, H, n, D] (float32), the mean pairwise cosine
    similarity of the block's tokens [B, H, n] (1 for a one-token block), and each block's token count [n]."""
    xb, counts = _blocks(x, block)
    mean = xb.sum(3) / counts[:, None]
    u = xb / xb.norm(dim=-1, keepdim=True).clamp_min(1e-12)        # padding rows stay 0
    s = u.sum(3).pow(2).sum(-1)                                      # sum over all ordered pairs (i, j) of cos
    pairs = (counts * (counts - 1)).clamp_min(1)
    sim = torch.where(counts > 1, (s - counts) / pairs, torch.ones_like(s))
    return mean, sim, counts


def block_mask_from_pooled(pq: torch.Tensor, sim_q: torch.Tensor, pk: torch.Tensor, sim_k: torch.Tensor,
                           count_k: torch.Tensor, keep: float, always: Sequence[int] = (),
                           min_sim: float = DEFAULT_MIN_SIM) -> torch.Tensor:
    """The block mask from pooled blocks (`pool_blocks` of q and of k); see `block_mask_reference`."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    B, H, nq, D = pq.shape
    nk = pk.shape[2]
    if keep >= 1:
        return torch.ones(B, H, nq, nk, dtype=torch.bool, device=pq.device)
    # estimated softmax mass of each key block: exp(pooled score) times its token count (a short tail block
    # holds fewer keys than a whole one)
    logits = torch.einsum("bhqd,bhkd->bhqk", pq, pk) / math.sqrt(D) + count_k.log()
    p = logits.softmax(-1)
    p_sorted, order = p.sort(-1, descending=True)
    before = p_sorted.cumsum(-1) - p_sorted                          # mass of the blocks ranked above this one
    kept_sorted = before < keep                                      # the first block always (before = 0)
    mask = torch.zeros_like(kept_sorted).scatter_(-1, order, kept_sorted)
    for j in always:
        if not -nk <= j < nk:
            raise IndexError(f"always={tuple(always)}: key block {j} of {nk}")
        mask[..., j] = True
    mask |= (sim_q < min_sim)[..., :, None]                          # query blocks whose tokens disagree: dense
    mask |= (sim_k < min_sim)[..., None, :]                          # key blocks whose tokens disagree: always
    return mask


def block_mask_reference(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, keep: float,
                         always: Sequence[int] = (), min_sim: float = DEFAULT_MIN_SIM) -> torch.Tensor:
    """Training-free block mask, bool [B, H, ceil(Lq / block_q), ceil(Lk / block_k)] (True = computed).

    Per batch and head: pooled_q / pooled_k = the mean token of each block of q / k; score = softmax over the
    key blocks of pooled_q . pooled_k^T / sqrt(D) (plus log of the block's token count, so a short tail block
    counts for the keys it holds); each query block keeps the smallest set of key blocks, best first, whose score
    mass reaches `keep` (in (0, 1]; 1 keeps all), at least one. Key blocks in `always` (indices, negative from
    the end) are kept for every query block. Self-similarity guard: a block whose tokens' mean pairwise cosine
    similarity is below `min_sim` is not judged by its average (a query block keeps its whole row, a key block
    its whole column); min_sim=-1 turns the guard off."""
    pq, sim_q, _ = pool_blocks(q, block_q)
    pk, sim_k, count_k = pool_blocks(k, block_k)
    return block_mask_from_pooled(pq, sim_q, pk, sim_k, count_k, keep, always, min_sim)


def kept_fraction(block_mask: torch.Tensor) -> float:
    """Share of the (query block, key block) tiles that are computed: the work done relative to dense."""
    return float(block_mask.float().mean())


def token_mask(block_mask: torch.Tensor, Lq: int, Lk: int, block_q: int, block_k: int) -> torch.Tensor:
    """The block mask [B, H, nq, nk] expanded to tokens, bool [B, H, Lq, Lk]."""
    return block_mask.repeat_interleave(block_q, 2)[:, :, :Lq].repeat_interleave(block_k, 3)[..., :Lk]


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                               block_q: int, block_k: int) -> torch.Tensor:
    """Exact softmax(q k^T / sqrt(D)) v in float32 over the kept blocks only; [B, Lq, H, D] in q's dtype.
    Every query block must keep at least one key block (block_mask_reference's masks do)."""
    Lq, Lk = q.shape[1], k.shape[1]
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~token_mask(block_mask.to(q.device), Lq, Lk, block_q, block_k), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)


def block_lists(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept key blocks of each query block as a list the kernel walks: int32 [B, H, nq, nk] with the kept
    indices first, ascending (the rest is unused), and how many are kept, int32 [B, H, nq]."""
    nk = block_mask.shape[-1]
    idx = torch.arange(nk, device=block_mask.device, dtype=torch.int32).expand_as(block_mask)
    # kept blocks sort first; among them the index keeps them ascending (contiguous key reads)
    key = (~block_mask).to(torch.int32) * nk + idx
    return key.sort(-1).values.remainder(nk).to(torch.int32).contiguous(), block_mask.sum(-1, dtype=torch.int32)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pool_block(X, sxl, sxd, base, blk, L, D, MEAN, SIM, out, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        """pool_blocks of one block of BLOCK tokens (of L; base: the (batch, head) offset) -> MEAN[out, :D] (the mean
        token) and SIM[out] (mean pairwise cosine: (|sum of unit tokens|^2 - n) / (n (n - 1)); 1 for n = 1)."""
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        x = tl.load(X + base + offs[:, None] * sxl + offs_d[None, :] * sxd, mask=(offs < L)[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        n = tl.minimum(L - blk * BLOCK, BLOCK).to(tl.float32)
        tl.store(MEAN + out * D + offs_d, tl.sum(x, 0) / n, mask=d_ok)
        u = x / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)[:, None]     # padding rows stay 0
        su = tl.sum(u, 0)
        s = tl.sum(su * su, 0)
        sim = tl.where(n > 1, (s - n) / tl.maximum(n * (n - 1), 1.0), 1.0)
        tl.store(SIM + out, sim)

    @triton.jit
    def _pool_qk(Q, K, PQ, SQ, PK, SK, sqb, sql, sqh, sqd, skb, skl, skh, skd, H, Lq, Lk, D, nq, nk,
                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """One launch pools every block of q and of k: program (i, b * H + h) takes query block i for i < nq, else
        key block i - nq; outputs [B, H, n, D] means and [B, H, n] similarities, float32."""
        i = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        if i < nq:
            _pool_block(Q, sql, sqd, b * sqb + h * sqh, i, Lq, D, PQ, SQ, bh * nq + i, BLOCK_Q, BLOCK_D)
        else:
            _pool_block(K, skl, skd, b * skb + h * skh, i - nq, Lk, D, PK, SK, bh * nk + i - nq, BLOCK_K, BLOCK_D)

    @triton.jit
    def _select_blocks(PQ, SQ, PK, SK, ALWAYS, MASK, LUT, CNT, Lk, D, nq, nk, sm_scale, keep, keep_all, min_sim,
                       N_ALWAYS: tl.constexpr, BLOCK_K: tl.constexpr, NK_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                       DC: tl.constexpr):
        """One program: one query block of one (batch, head). Scores its pooled query against every pooled key block
        (softmax over the key blocks of pq . pk / sqrt(D) + log(token count)), keeps key block j when the mass of
        the blocks scoring above it, S(p_j) = sum of p_i > p_j, is below `keep` (the reference's rule: best first
        until the mass reaches keep), adds the `always` blocks and the similarity guard, and writes the mask row,
        the kept indices ascending (LUT) and their count (CNT). The kept set is {j: p_j >= t} for the smallest p
        value t with S(t) < keep, found exactly by bisection on float32 bit patterns (positive floats order as
        their bits): 32 halvings of [0, bits(max p)], no sort."""
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        row = bh * nq + qb
        offs_j = tl.arange(0, NK_PAD)
        j_ok = offs_j < nk
        logits = tl.zeros([NK_PAD], dtype=tl.float32)
        for d0 in range(0, BLOCK_D, DC):
            offs_d = d0 + tl.arange(0, DC)
            d_ok = offs_d < D
            pq = tl.load(PQ + row * D + offs_d, mask=d_ok, other=0.0)
            pk = tl.load(PK + (bh * nk + offs_j[:, None]) * D + offs_d[None, :], mask=j_ok[:, None] & d_ok[None, :],
                         other=0.0)
            logits += tl.sum(pk * pq[None, :], 1)
        count = tl.minimum(Lk - offs_j * BLOCK_K, BLOCK_K).to(tl.float32)
        logits = tl.where(j_ok, logits * sm_scale + tl.log(tl.maximum(count, 1.0)), float("-inf"))
        e = tl.exp(logits - tl.max(logits, 0))
        p = e / tl.sum(e, 0)                                             # 0 past nk
        lo = tl.zeros([1], dtype=tl.int32)                               # S(bits lo) >= keep (or lo = 0)
        hi = tl.max(p, 0).to(tl.int32, bitcast=True) + tl.zeros([1], dtype=tl.int32)   # S(max p) = 0 < keep
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            t = mid.to(tl.float32, bitcast=True)                         # [1]
            s = tl.sum(tl.where(p[:, None] > t[None, :], p[:, None], 0.0), 0)
            good = s < keep
            hi = tl.where(good, mid, hi)
            lo = tl.where(good, lo, mid)
        t = tl.sum(hi, 0).to(tl.float32, bitcast=True)
        sq_low = (tl.load(SQ + row) < min_sim).to(tl.int32)
        sk = tl.load(SK + bh * nk + offs_j, mask=j_ok, other=1.0)
        k32 = tl.maximum((p >= t).to(tl.int32), tl.maximum(keep_all, sq_low))
        k32 = tl.maximum(k32, (sk < min_sim).to(tl.int32))
        for a in range(0, N_ALWAYS):
            k32 = tl.maximum(k32, (offs_j == tl.load(ALWAYS + a)).to(tl.int32))
        k32 = tl.where(j_ok, k32, 0)
        kept = k32 > 0
        tl.store(MASK + row * nk + offs_j, k32.to(tl.int8), mask=j_ok)
        pos = tl.cumsum(k32, 0) - 1
        tl.store(LUT + row * nk + pos, offs_j, mask=kept)
        tl.store(CNT + row, tl.sum(k32, 0))

    @triton.jit
    def _attend_tile(q, kb, m_i, l_i, acc, k_base, v_base, skl, svl, Lk, offs_n, d_ok, qk_scale,
                     BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """Online-softmax update of (m_i, l_i, acc) with key block kb: scores pre-scaled by log2(e) / sqrt(D)
        for exp2, keys past Lk masked out, float32 accumulation. IEEE: float32 inputs, exact float32 products
        (not TF32). UPCAST (the interpreter, whose tl.dot multiplies bf16 bit patterns as integers): the same
        bf16/fp16 operands, p rounded to v's dtype as compiled, multiplied in float32."""
        cols = kb * BLOCK_N + offs_n
        n_ok = cols < Lk
        kt = tl.load(k_base + cols[None, :] * skl, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        elif UPCAST:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32))
        else:
            s = tl.dot(q, kt)
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))                            # finite: every kept block has a key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + cols[:, None] * svl, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        elif UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype).to(tl.float32), vt.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        return m_new, l_i, acc

    @triton.jit
    def _sparse_attn_fwd(Q, K, V, O, LUT, CNT,
                         sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd, sob, sol, soh, sod,
                         H, Lq, Lk, D, nq, nk, qk_scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                         INTERPRET: tl.constexpr):
        """One program: one block of BLOCK_M queries of one (batch, head); visits only the CNT kept key blocks
        that LUT lists for it (ascending), so a skipped block costs nothing."""
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Lq
        d_ok = offs_d < D
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b * skb + h * skh + offs_d[:, None] * skd          # K^T tile [BLOCK_D, BLOCK_N]
        v_base = V + b * svb + h * svh + offs_d[None, :] * svd          # V tile [BLOCK_N, BLOCK_D]
        row = (bh * nq + qb).to(tl.int64)
        lut = LUT + row * nk
        n_kept = tl.load(CNT + row)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if INTERPRET:
            # Triton's interpreter cannot take a loaded count as a range() bound (int() of a one-element numpy
            # array), so it walks the same list with a while loop; compiled, the for loop below (pipelined)
            i = 0
            while i < n_kept:
                m_i, l_i, acc = _attend_tile(q, tl.load(lut + i), m_i, l_i, acc, k_base, v_base, skl, svl, Lk,
                                             offs_n, d_ok, qk_scale, BLOCK_N, IEEE, INTERPRET)
                i += 1
        else:
            for i in range(0, n_kept):
                m_i, l_i, acc = _attend_tile(q, tl.load(lut + i), m_i, l_i, acc, k_base, v_base, skl, svl, Lk,
                                             offs_n, d_ok, qk_scale, BLOCK_N, IEEE, INTERPRET)
        out = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _always_blocks(always: Sequence[int], nk: int) -> tuple[int, ...]:
    """The `always` key blocks as indices in [0, nk) (IndexError for one out of range, as the reference)."""
    out = []
    for j in always:
        if not -nk <= j < nk:
            raise IndexError(f"always={tuple(always)}: key block {j} of {nk}")
        out.append(j % nk)
    return tuple(sorted(set(out)))


_ALWAYS: dict = {}


def _always_tensor(blocks: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The `always` indices as an int32 tensor on the device, made once per (indices, device): no copy per call."""
    key = (blocks, str(device))
    t = _ALWAYS.get(key)
    if t is None:
        t = _ALWAYS[key] = torch.tensor(blocks or (0,), dtype=torch.int32, device=device)
    return t


def block_map(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, keep: float,
              always: Sequence[int] = (), min_sim: float = DEFAULT_MIN_SIM
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block mask of `block_mask_reference` with the lists the attention kernel walks: (mask bool [B, H, nq, nk],
    lut int32 [B, H, nq, nk] (each row's kept key blocks first, ascending; the rest unused), cnt int32 [B, H, nq]).
    Where `runs_triton(q, k)`: two launches (`_pool_qk`, `_select_blocks`), nothing read back to the host; else the
    reference and `block_lists`."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    nq, nk = -(-Lq // block_q), -(-Lk // block_k)
    blocks = _always_blocks(always, nk)
    if not runs_triton(q, k):
        mask = block_mask_reference(q, k, block_q, block_k, keep, always, min_sim)
        return (mask, *block_lists(mask))
    dev = q.device
    pq = torch.empty(B, H, nq, D, dtype=torch.float32, device=dev)
    pk = torch.empty(B, H, nk, D, dtype=torch.float32, device=dev)
    sq = torch.empty(B, H, nq, dtype=torch.float32, device=dev)
    sk = torch.empty(B, H, nk, dtype=torch.float32, device=dev)
    block_d = max(16, triton.next_power_of_2(D))
    _pool_qk[(nq + nk, B * H)](q, k, pq, sq, pk, sk, *q.stride(), *k.stride(), H, Lq, Lk, D, nq, nk,
                               BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d)
    mask = torch.empty(B, H, nq, nk, dtype=torch.int8, device=dev)
    lut = torch.empty(B, H, nq, nk, dtype=torch.int32, device=dev)
    cnt = torch.empty(B, H, nq, dtype=torch.int32, device=dev)
    nk_pad = max(16, triton.next_power_of_2(nk))
    _select_blocks[(nq, B * H)](pq, sq, pk, sk, _always_tensor(blocks, dev), mask, lut, cnt, Lk, D, nq,
                                nk, 1.0 / math.sqrt(D), float(keep), int(keep >= 1), float(min_sim), N_ALWAYS=len(blocks), BLOCK_K=block_k, NK_PAD=nk_pad,
                                BLOCK_D=block_d, DC=max(2, min(block_d, 8192 // nk_pad)))
    return mask.view(torch.bool), lut, cnt


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor, cnt: torch.Tensor, block_q: int,
            block_k: int, num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """The attention kernel over the kept key blocks that (lut, cnt) list for each query block."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    nq, nk = -(-Lq // block_q), -(-Lk // block_k)
    out = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    extra = {}
    if q.device.type == "cuda":
        # float32 tiles are twice the bytes: two stages keep 128 x 128 x 4 B queries + K/V in shared memory
        extra = dict(num_warps=num_warps or (8 if block_q >= 128 else 4),
                     num_stages=num_stages or (2 if q.dtype == torch.float32 else 3))
    _sparse_attn_fwd[(nq, B * H)](
        q, k, v, out, lut, cnt, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Lq, Lk, D, nq, nk, math.log2(math.e) / math.sqrt(D),
        BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=max(16, triton.next_power_of_2(D)),
        IEEE=q.dtype == torch.float32, INTERPRET=q.device.type == "cpu", **extra)
    return out


def sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                            block_q: int, block_k: int, num_warps: int | None = None,
                            num_stages: int | None = None) -> torch.Tensor:
    """The kernel on a given block mask (block_q x block_k tiles, powers of two >= 16), which must keep at least
    one key block for every query block (not checked here: that would wait for the GPU)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    nq, nk = -(-Lq // block_q), -(-Lk // block_k)
    if tuple(block_mask.shape) != (B, H, nq, nk):
        raise ValueError(f"block mask {tuple(block_mask.shape)} is not [B, H, nq, nk] = {(B, H, nq, nk)}")
    lut, cnt = block_lists(block_mask.to(q.device))   # a query block keeping no key block would give NaN rows
    return _attend(q, k, v, lut, cnt, block_q, block_k, num_warps, num_stages)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: float = 0.9, block_q: int = 64,
                     block_k: int = 64, always: Sequence[int] = (0,), min_sim: float = DEFAULT_MIN_SIM,
                     block_mask: torch.Tensor | None = None, return_mask: bool = False):
    """Block-sparse attention: q [B, Lq, H, D], k/v [B, Lk, H, D] (bf16, fp16 or fp32) -> [B, Lq, H, D] in q's
    dtype, or (out, block_mask) with return_mask. Where runs_triton(q, k, v): the map by `block_map` (or the
    lists of a given block_mask) and the attention kernel, three launches; else the mask by
    `block_mask_reference(q, k, block_q, block_k, keep, always, min_sim)` unless one is given, and
    sparse_attention_reference. kept_fraction(block_mask) is the share of tiles computed."""
    if not runs_triton(q, k, v):
        if block_mask is None:
            block_mask = block_mask_reference(q, k, block_q, block_k, keep, always, min_sim)
        out = sparse_attention_reference(q, k, v, block_mask, block_q, block_k)
        return (out, block_mask) if return_mask else out
    if block_mask is None:
        block_mask, lut, cnt = block_map(q, k, block_q, block_k, keep, always, min_sim)
        out = _attend(q, k, v, lut, cnt, block_q, block_k)
    else:
        out = sparse_attention_triton(q, k, v, block_mask, block_q, block_k)
    return (out, block_mask) if return_mask else out
