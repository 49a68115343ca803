"""`vidu_kernels.sparse_attention` (issue 18): the block-sparse flash-attention kernel in Triton's interpreter
against its float32 oracle on awkward shapes (tails, Lq != Lk, strided views, fp32/bf16/fp16), keep=1 against
dense attention, the pooled-similarity mask on inputs whose attention really is block-sparse (work skipped, small
error, and a random mask of the same size as the negative control), the `always` blocks, the self-similarity
guard, the fallback to the reference where no kernel runs, and the block map's two Triton launches against the
torch-op rule (block_mask_reference), with negative controls."""
from __future__ import annotations

import textwrap

import pytest
import torch

import vidu_kernels.sparse_attention as sa
from tests.conftest import compile_for_hopper, count_launches
from vidu_kernels.attention import attention_reference
from vidu_kernels._triton import runs_triton
from vidu_kernels.sparse_attention import (
    block_lists,
    block_map,
    block_mask_reference,
    kept_fraction,
    pool_blocks,
    sparse_attention,
    sparse_attention_reference,
    sparse_attention_triton,
)

BLK = 16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def qkv(B, Lq, Lk, H, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H, D, generator=g).to(dtype) for L in (Lq, Lk, Lk)]


def clustered(B, Lq, Lk, H, D, seed=0, scale=6.0, mix=0.8, noise=0.3):
    """Keys in clusters, one per key block (orthogonal centres of norm `scale`, small noise); every query block
    aims at a main cluster plus `mix` times a second one, so its attention falls on about two key blocks:
    attention that is block-sparse by construction. Returns q, k, v (float32)."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-Lq // BLK), -(-Lk // BLK)
    centres = torch.linalg.qr(torch.randn(B, H, D, D, generator=g)).Q[..., :nk].transpose(-1, -2) * scale
    k = centres[:, :, torch.arange(Lk) // BLK].permute(0, 2, 1, 3)
    a, b = torch.randint(0, nk, (2, B, H, nq), generator=g)
    b = torch.where(a == b, (b + 1) % nk, b)
    aim = torch.gather(centres, 2, a[..., None].expand(B, H, nq, D)) \
        + mix * torch.gather(centres, 2, b[..., None].expand(B, H, nq, D))
    q = aim[:, :, torch.arange(Lq) // BLK].permute(0, 2, 1, 3)
    q = q + noise * torch.randn(q.shape, generator=g)
    k = k + noise * torch.randn(k.shape, generator=g)
    return q, k, torch.randn(B, Lk, H, D, generator=g)


def random_mask_like(mask: torch.Tensor, seed=1) -> torch.Tensor:
    """The same number of key blocks per query block as `mask`, chosen at random."""
    ranks = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed)).argsort(-1).argsort(-1)
    return ranks < mask.sum(-1, keepdim=True)


SHAPES = [(2, 5, 7, 2, 16), (2, 50, 90, 2, 32), (2, 33, 47, 2, 16), (2, 50, 20, 2, 32), (2, 17, 64, 2, 16)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("B,Lq,Lk,H,D", SHAPES)
def test_kernel_matches_sparse_reference(B, Lq, Lk, H, D, dtype, tol):
    q, k, v = qkv(B, Lq, Lk, H, D, seed=Lq * 100 + Lk, dtype=dtype)
    nq, nk = -(-Lq // BLK), -(-Lk // BLK)
    # a random block mask (at least one key block per query block) and the pooled one
    g = torch.Generator().manual_seed(Lk)
    rnd = torch.rand(B, H, nq, nk, generator=g) < 0.5
    rnd[..., torch.randint(0, nk, (1,), generator=g)] = True
    pooled = block_mask_reference(q, k, BLK, BLK, keep=0.6, min_sim=-1.0)
    for mask in (rnd, pooled):
        out = sparse_attention_triton(q, k, v, mask, BLK, BLK)
        ref = sparse_attention_reference(q, k, v, mask, BLK, BLK)
        assert out.dtype == dtype and out.shape == (B, Lq, H, D)
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
        assert rel(out, ref) < {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    if nk > 1:  # negative control: the blocks skipped change the answer, so the comparison can fail
        assert not rnd.all() and rel(sparse_attention_reference(q, k, v, rnd, BLK, BLK), attention_reference(q, k, v)) > 0.05


def test_kernel_reads_strided_views():
    # q, k, v as views of one packed [B, L, 3, H, D] projection (the strides a fused qkv gives), Lq = Lk
    B, L, H, D = 2, 45, 2, 32
    qkv_packed = torch.randn(B, L, 3, H, D, generator=torch.Generator().manual_seed(3))
    q, k, v = qkv_packed.unbind(2)
    assert not q.is_contiguous()
    mask = block_mask_reference(q, k, BLK, BLK, keep=0.7, min_sim=-1.0)
    out = sparse_attention_triton(q, k, v, mask, BLK, BLK)
    torch.testing.assert_close(out, sparse_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), mask,
                                                               BLK, BLK), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,Lq,Lk,H,D", [(2, 5, 7, 2, 16), (2, 50, 90, 2, 32), (2, 41, 23, 2, 16)])
def test_keep_one_is_dense_attention(B, Lq, Lk, H, D):
    q, k, v = qkv(B, Lq, Lk, H, D, seed=7)
    out, mask = sparse_attention(q, k, v, keep=1.0, block_q=BLK, block_k=BLK, return_mask=True)
    assert mask.all() and kept_fraction(mask) == 1.0
    torch.testing.assert_close(out, attention_reference(q, k, v), rtol=1e-5, atol=1e-5)
    ob, _ = sparse_attention(*(t.bfloat16() for t in (q, k, v)), keep=1.0, block_q=BLK, block_k=BLK, return_mask=True)
    assert rel(ob, attention_reference(q, k, v)) < 1e-2


def test_block_sparse_inputs_skip_work_with_a_small_error():
    B, Lq, Lk, H, D = 2, 50, 90, 2, 32
    q, k, v = clustered(B, Lq, Lk, H, D)
    dense = attention_reference(q, k, v)
    out, mask = sparse_attention(q, k, v, keep=0.95, block_q=BLK, block_k=BLK, always=(), return_mask=True)
    kept = kept_fraction(mask)
    err = rel(out, dense)
    assert kept <= 0.5, kept                      # about two key blocks of six per query block
    assert err < 0.02, err
    # negative control: as many blocks per query block, chosen at random, lose the attention's real blocks
    rnd = random_mask_like(mask)
    assert kept_fraction(rnd) == pytest.approx(kept)
    err_rnd = rel(sparse_attention_reference(q, k, v, rnd, BLK, BLK), dense)
    assert err_rnd > 0.3 and err_rnd > 20 * err, (err, err_rnd)
    # the knob: a lower keep computes fewer blocks and errs more; 1 is dense
    out_lo, mask_lo = sparse_attention(q, k, v, keep=0.6, block_q=BLK, block_k=BLK, always=(), return_mask=True)
    assert kept_fraction(mask_lo) < kept and rel(out_lo, dense) > 2 * err
    assert (mask_lo <= mask).all()                # nested: a higher keep keeps a superset
    # in bf16 too (the pooled mask reads bf16 tokens; the kernel's products are bf16)
    ob, mb = sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), keep=0.95, block_q=BLK, block_k=BLK, always=(),
                              return_mask=True)
    assert kept_fraction(mb) <= 0.5 and rel(ob, dense) < 0.03


def test_always_blocks_are_kept():
    B, Lq, Lk, H, D = 2, 50, 90, 2, 32
    q, k, _ = clustered(B, Lq, Lk, H, D, seed=4)
    free = block_mask_reference(q, k, BLK, BLK, keep=0.9)
    assert not free[..., 0].all() and not free[..., -1].all()   # neither end block is chosen everywhere by itself
    pinned = block_mask_reference(q, k, BLK, BLK, keep=0.9, always=(0, -1))
    assert pinned[..., 0].all() and pinned[..., -1].all()
    assert (pinned >= free).all() and torch.equal(pinned[..., 1:-1], free[..., 1:-1])
    with pytest.raises(IndexError):
        block_mask_reference(q, k, BLK, BLK, keep=0.9, always=(6,))
    with pytest.raises(ValueError):
        block_mask_reference(q, k, BLK, BLK, keep=0.0)


def test_self_similarity_guard_keeps_blocks_whose_tokens_disagree():
    B, Lq, Lk, H, D = 1, 48, 80, 2, 32
    q, k, v = clustered(B, Lq, Lk, H, D, seed=5, mix=0.0)
    c = 6.0 * torch.nn.functional.normalize(torch.randn(B, H, D, generator=torch.Generator().manual_seed(9)), dim=-1)
    # key block 2: tokens alternately +c and -c (mean pairwise cosine -1/15; their mean is 0, so the pooled score
    # sees nothing there); query block 1 aims at +c and at key block 0's cluster: the pooled score sees block 0
    # alone, but the +c half of key block 2 scores as high and holds a third of the attention
    k[:, 2 * BLK:3 * BLK] = c[:, None] * torch.tensor([1.0, -1.0]).repeat(BLK // 2)[None, :, None, None]
    q[:, BLK:2 * BLK] = c[:, None] + k[:, :BLK].mean(1, keepdim=True) \
        + 0.3 * torch.randn(B, BLK, H, D, generator=torch.Generator().manual_seed(2))
    _, sim_k, _ = pool_blocks(k, BLK)
    assert sim_k[..., 2].max() < 0 and sim_k[..., [0, 1, 3, 4]].min() > 0.9
    dense = attention_reference(q, k, v)
    blind = block_mask_reference(q, k, BLK, BLK, keep=0.95, always=(), min_sim=-1.0)
    guarded = block_mask_reference(q, k, BLK, BLK, keep=0.95, always=())
    assert not blind[:, :, 1, 2].any()                          # without the guard the block is dropped ...
    assert rel(sparse_attention_reference(q, k, v, blind, BLK, BLK)[:, BLK:2 * BLK], dense[:, BLK:2 * BLK]) > 0.3
    assert guarded[..., 2].all()                                # ... with it, kept for every query block
    out = sparse_attention(q, k, v, keep=0.95, block_q=BLK, block_k=BLK, always=())
    assert rel(out, dense) < 0.02

    # a query block whose tokens disagree keeps its whole row: half its tokens are c0 + 2 c2, half c0 - 2 c2
    # (c_j: key block j's cluster centre); their mean c0 points at key block 0, yet the first half attends to block 2
    q2, k2, v2 = clustered(B, Lq, Lk, H, D, seed=6, mix=0.0)
    c0, c2 = k2[:, :BLK].mean(1), k2[:, 2 * BLK:3 * BLK].mean(1)
    q2[:, BLK:BLK + BLK // 2] = (c0 + 2 * c2)[:, None]
    q2[:, BLK + BLK // 2:2 * BLK] = (c0 - 2 * c2)[:, None]
    _, sim_q, _ = pool_blocks(q2, BLK)
    assert sim_q[..., 1].max() < 0.5 and sim_q[..., [0, 2]].min() > 0.9
    blind2 = block_mask_reference(q2, k2, BLK, BLK, keep=0.9, always=(), min_sim=-1.0)
    assert not blind2[:, :, 1, 2].any()
    guarded2 = block_mask_reference(q2, k2, BLK, BLK, keep=0.9, always=())
    assert guarded2[:, :, 1].all() and not guarded2.all()
    dense2 = attention_reference(q2, k2, v2)[:, BLK:2 * BLK]
    assert rel(sparse_attention_reference(q2, k2, v2, blind2, BLK, BLK)[:, BLK:2 * BLK], dense2) > 0.3
    assert rel(sparse_attention(q2, k2, v2, keep=0.9, block_q=BLK, block_k=BLK, always=())[:, BLK:2 * BLK],
               dense2) < 1e-5


def test_pool_blocks():
    B, L, H, D = 1, 21, 1, 16
    x = torch.randn(B, L, H, D, generator=torch.Generator().manual_seed(0))
    x[:, :BLK] = x[:, :1]                                       # block 0: one token repeated
    mean, sim, counts = pool_blocks(x, BLK)
    assert counts.tolist() == [16.0, 5.0]
    torch.testing.assert_close(mean[0, 0], torch.stack([x[0, :16, 0].mean(0), x[0, 16:, 0].mean(0)]))
    assert sim[0, 0, 0] == pytest.approx(1.0, abs=1e-5)
    # orthogonal tokens: mean pairwise cosine 0; a one-token block counts as similar
    eye = torch.eye(16).view(1, 16, 1, 16)
    _, sim_eye, _ = pool_blocks(torch.cat([eye, eye[:, :1]], 1), BLK)
    assert sim_eye[0, 0, 0] == pytest.approx(0.0, abs=1e-6) and sim_eye[0, 0, 1] == 1.0


def test_falls_back_to_the_reference_without_triton(monkeypatch):
    q, k, v = clustered(2, 50, 90, 2, 32, seed=8)
    mask = block_mask_reference(q, k, BLK, BLK, keep=0.9, always=(0,))
    assert not mask.all()
    monkeypatch.setattr(sa, "runs_triton", lambda *t: False)

    def no_kernel(*a, **kw):
        raise AssertionError("the kernel ran although runs_triton is false")

    monkeypatch.setattr(sa, "sparse_attention_triton", no_kernel)
    monkeypatch.setattr(sa, "_attend", no_kernel)
    out, m = sparse_attention(q, k, v, keep=0.9, block_q=BLK, block_k=BLK, return_mask=True)
    assert torch.equal(m, mask)
    assert torch.equal(out, sparse_attention_reference(q, k, v, mask, BLK, BLK))


# ------------------------------------------------------------------------------------------ the block map in Triton

def undecided(q, k, keep, always=(), min_sim=sa.DEFAULT_MIN_SIM, tol=1e-5) -> torch.Tensor:
    """Tiles [B, H, nq, nk] whose decision lies within `tol` of a threshold of the rule (the mass ranked above the
    tile within tol of keep, or the query or key block's similarity within tol of min_sim): float32 sums taken in
    another order may decide those the other way. Pinned blocks (`always`) are decided either way."""
    pq, sim_q, _ = pool_blocks(q, BLK)
    pk, sim_k, count_k = pool_blocks(k, BLK)
    p = (torch.einsum("bhqd,bhkd->bhqk", pq, pk) / q.shape[-1] ** 0.5 + count_k.log()).softmax(-1)
    p_sorted, order = p.sort(-1, descending=True)
    before = torch.empty_like(p).scatter_(-1, order, p_sorted.cumsum(-1) - p_sorted)
    near = ((before - keep).abs() < tol) | ((sim_q - min_sim).abs() < tol)[..., None] \
        | ((sim_k - min_sim).abs() < tol)[..., None, :]
    near[..., list(always)] = False
    return near


MAP_SHAPES = [(2, 5, 7, 2, 16), (2, 50, 90, 2, 32), (1, 33, 200, 2, 16), (2, 50, 20, 2, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Lq,Lk,H,D", MAP_SHAPES)
def test_block_map_kernel_equals_the_reference(B, Lq, Lk, H, D, dtype):
    """The two-launch map (pool, select) against block_mask_reference: the same mask on random and block-sparse
    inputs, every keep, with and without the `always` blocks and the similarity guard; and the lists the attention
    kernel walks equal block_lists of the reference's mask. Where the masks may differ (tiles within float32
    rounding of a threshold, `undecided`) they are counted: none differ on these inputs."""
    assert runs_triton(torch.zeros(1)), "needs Triton's interpreter (conftest sets TRITON_INTERPRET=1)"
    inputs = [qkv(B, Lq, Lk, H, D, seed=Lq + Lk, dtype=dtype), clustered(B, Lq, Lk, H, D, seed=Lk)]
    tiles = differ = 0
    for q, k, _ in inputs:
        q, k = (3 * q).to(dtype), k.to(dtype)                  # random q scaled: peaked pooled scores
        for keep, always, min_sim in [(0.3, (), -1.0), (0.6, (0, -1), -1.0), (0.9, (0,), sa.DEFAULT_MIN_SIM),
                                      (0.99, (), 0.0), (1.0, (0,), -1.0)]:
            mask, lut, cnt = block_map(q, k, BLK, BLK, keep, always, min_sim)
            ref = block_mask_reference(q, k, BLK, BLK, keep, always, min_sim)
            assert mask.dtype == torch.bool and mask.shape == ref.shape
            off = mask != ref
            assert not (off & ~undecided(q, k, keep, always, min_sim)).any(), (keep, always, min_sim)
            tiles, differ = tiles + ref.numel(), differ + int(off.sum())
            ref_lut, ref_cnt = block_lists(mask)
            assert torch.equal(cnt, ref_cnt) and (cnt >= 1).all()
            listed = torch.arange(lut.shape[-1]) < cnt[..., None]
            assert torch.equal(lut[listed], ref_lut[listed])
    assert differ == 0, f"{differ} of {tiles} tiles"


def test_block_map_negative_controls():
    """The comparison above can fail: the map of other keys (flipped in order) or of another keep differs from the
    reference's mask, on tiles the rule decides well away from its thresholds."""
    q, k, _ = clustered(2, 50, 90, 2, 32, seed=11)
    ref = block_mask_reference(q, k, BLK, BLK, 0.9, (), -1.0)
    for mask in (block_map(q, k.flip(1), BLK, BLK, 0.9, (), -1.0)[0], block_map(q, k, BLK, BLK, 0.5, (), -1.0)[0]):
        assert ((mask != ref) & ~undecided(q, k, 0.9, (), -1.0)).sum() >= 5


def test_sparse_attention_is_three_launches(monkeypatch):
    """Where the kernels run, sparse_attention is the pooling launch, the selection launch and the attention
    launch, once each, with no torch-op mask (block_mask_reference, block_lists) on the way; its output equals the
    kernel's on the reference's mask, and its mask the reference's."""
    q, k, v = clustered(2, 50, 90, 2, 32, seed=12)
    ref_mask = block_mask_reference(q, k, BLK, BLK, 0.9, (0,))
    expected = sparse_attention_triton(q, k, v, ref_mask, BLK, BLK)
    launches = count_launches(monkeypatch, sa, {n: n for n in ("_pool_qk", "_select_blocks", "_sparse_attn_fwd")})

    def torch_map(*a, **kw):
        raise AssertionError("the torch-op map ran on the kernel path")

    monkeypatch.setattr(sa, "block_mask_reference", torch_map)
    monkeypatch.setattr(sa, "block_lists", torch_map)
    out, mask = sparse_attention(q, k, v, keep=0.9, block_q=BLK, block_k=BLK, return_mask=True)
    assert launches == ["_pool_qk", "_select_blocks", "_sparse_attn_fwd"]
    assert torch.equal(mask, ref_mask) and torch.equal(out, expected)


COMPILE_MAP = textwrap.dedent("""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vidu_kernels import sparse_attention as S
def build(fn, sig, consts, div16, warps=4, stages=3):
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    info = ptxas_info(k.asm["ptx"])
    spills = sum(int(n) for n in re.findall(r"(\\d+) bytes spill", info))
    regs = re.findall(r"Used (\\d+) registers", info)
    print("CASE", fn.__name__, "SPILLS", spills, "REGS", regs[0] if regs else -1)
# Wan 1.3B at 960x544, chunk 3 against 10 frames: D 128, tiles 64 x 64, 319 key blocks (NK_PAD 512)
sig = dict(Q="*bf16", K="*bf16", PQ="*fp32", SQ="*fp32", PK="*fp32", SK="*fp32", sqb="i32", sql="i32", sqh="i32",
           sqd="constexpr", skb="i32", skl="i32", skh="i32", skd="constexpr", H="i32", Lq="i32", Lk="i32", D="i32",
           nq="i32", nk="i32", BLOCK_Q="constexpr", BLOCK_K="constexpr", BLOCK_D="constexpr")
build(S._pool_qk, sig, dict(sqd=1, skd=1, BLOCK_Q=64, BLOCK_K=64, BLOCK_D=128),
      "Q K PQ SQ PK SK sqb sql sqh skb skl skh D".split())
sig = dict(PQ="*fp32", SQ="*fp32", PK="*fp32", SK="*fp32", ALWAYS="*i32", MASK="*i8", LUT="*i32", CNT="*i32",
           Lk="i32", D="i32", nq="i32", nk="i32", sm_scale="fp32", keep="fp32", keep_all="i32", min_sim="fp32",
           N_ALWAYS="constexpr", BLOCK_K="constexpr", NK_PAD="constexpr", BLOCK_D="constexpr", DC="constexpr")
for nk_pad in (512, 2048):
    build(S._select_blocks, sig, dict(N_ALWAYS=1, BLOCK_K=64, NK_PAD=nk_pad, BLOCK_D=128,
                                     DC=max(2, min(128, 8192 // nk_pad))), "PQ SQ PK SK ALWAYS MASK LUT CNT D".split())
""")


def test_map_kernels_compile_for_hopper():
    """Without a GPU: the pooling and selection kernels compile for sm_90 through ptxas at Wan 1.3B's shapes (D 128,
    64 x 64 tiles, 319 key blocks: NK_PAD 512; and NK_PAD 2048, a 1280x720 window) without spilling registers."""
    cases = [line.split() for line in compile_for_hopper(COMPILE_MAP).splitlines() if line.startswith("CASE")]
    assert [c[1] for c in cases] == ["_pool_qk", "_select_blocks", "_select_blocks"], cases
    assert all(int(c[3]) == 0 and int(c[5]) > 0 for c in cases), cases


def test_block_map_reads_strided_views():
    """q and k as views of one packed [B, L, 3, H, D] projection (not contiguous): the pooling kernel reads them by
    their strides, the map equals the reference's on the contiguous copies."""
    B, L, H, D = 2, 45, 2, 32
    packed = torch.randn(B, L, 3, H, D, generator=torch.Generator().manual_seed(13))
    packed[:, :, :2] += 2 * torch.randn(B, 1, 2, H, D, generator=torch.Generator().manual_seed(14))
    q, k, _ = packed.unbind(2)
    assert not q.is_contiguous()
    mask, _, cnt = block_map(q, k, BLK, BLK, 0.7, (0,), -1.0)
    ref = block_mask_reference(q.contiguous(), k.contiguous(), BLK, BLK, 0.7, (0,), -1.0)
    assert torch.equal(mask, ref) and torch.equal(cnt, ref.sum(-1, dtype=torch.int32)) and not ref.all()
