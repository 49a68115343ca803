"""QK-norm + RoPE of self-attention fused in Triton, and RoPE alone for cached keys (issue 18).

Attention.self_attend (models/dit.py) does, per token, for the query and the key projections:

    q = heads(norm_q(q_lin(x)))                  # RMSNorm over the whole dim (float32, .type_as(x) * weight)
    q_r = apply_rope(q, cos, sin)                 # consecutive pairs (x[2i], x[2i+1]) rotated, in float32
    k = heads(norm_k(k_lin(x))); k_r = apply_rope(k, cos, sin)   # k (before RoPE) goes to the cache
    ck_r = apply_rope(ck, ccos, csin)             # cached keys re-rotated to their new positions

    qk_norm_rope(y, norm.weight, cos, sin, H, norm.eps, unrotated=False) -> (q_r, None)
    qk_norm_rope(y, norm.weight, cos, sin, H, norm.eps)                 -> (k_r, k)
    rope(ck, ccos, csin)                                                  -> ck_r

Under Ulysses sequence parallelism a rank holds all heads of its tokens before the all-to-all and all tokens of its
heads after it, so the norm (over the whole dim) and the rotation (at the sequence's positions) fall on either side
of the exchange: `rms_norm_heads(y, norm.weight, H, norm.eps)` is the same kernel's norm-only pass (no rotation),
then `rope` after the exchange.

One pass per token: a program loads ROWS rows of dim = H*D elements (a row's pairs split into their even and odd
halves), sums the squares for the RMS, normalises, rounds to x's dtype, multiplies by the weight, rounds to the
output dtype (the rounding order of RMSNorm.forward), stores that (the unrotated keys) when asked, rotates each pair
by its token's cos/sin (float32 [L, D/2], as models.rope.rope_angles gives them: the angles of any position, also
1e6, are computed there in float64; here they are only read) and stores the rotated row. x is read through its
batch/token strides (a column slice of a fused projection is not copied; a last dim with a stride other than 1 is
made contiguous first); the outputs are new contiguous [B, L, H, D] tensors.

The `*_reference` functions are the model's own expressions (tests/test_kernel_qk_rope.py checks them against an
Attention module). The launchers run the kernel where `runs_triton` says one can run (CUDA, or the CPU under
TRITON_INTERPRET=1; not while autograd records through an input, e.g. a norm weight that requires grad with grad
enabled, nor under torch.compile's tracing) and for float32/float16/bfloat16 x and weight with float32 cos/sin;
the reference anywhere else.
"""
from __future__ import annotations

import torch

from vidu_kernels._triton import HAVE_TRITON, runs_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from vidu_kernels._triton import rounded

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- references

def qk_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                           num_heads: int, eps: float = 1e-6,
                           unrotated: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Today's math: x [B, L, dim] (a q or k projection's output) -> RMSNorm over the whole dim as models/dit.py's
    RMSNorm computes it (`(xf * rsqrt(mean(xf^2) + eps)).type_as(x) * weight`, xf = x in float32; weight None: no
    norm, Attention's qk_norm=False), split into num_heads heads, then models.rope.apply_rope with cos/sin [L, D/2].
    Returns (rotated [B, L, H, D], normalised-but-unrotated [B, L, H, D] or None when `unrotated` is False), both
    in the dtype of `.type_as(x) * weight` (x's dtype when the weight has it, as in the model)."""
    if weight is not None:
        x = rms_norm_reference(x, weight, eps)
    n = x.unflatten(-1, (num_heads, -1))
    return _rotate(n, cos, sin), (n if unrotated else None)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim in float32, rounded to x's dtype, times the weight (models/dit.py's RMSNorm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]: consecutive pairs (x[2i], x[2i+1]) rotated by the angles cos/sin [L, D/2], in float32
    (models.rope.apply_rope)."""
    return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------------------------- the kernel

if HAVE_TRITON:
    @triton.jit
    def _qk_rope_kernel(x_ptr, sxb, sxl, sxh, w_ptr, cos_ptr, scl, sin_ptr, ssl, rot_ptr, unrot_ptr,
                        N, L, P, HD, eps,
                        NORM: tl.constexpr, UNROT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                        ROT: tl.constexpr):
        """Rows r < N = B*L of P = H*D/2 pairs, (b, l) = divmod(r, L); element c of a row (head c // HD, HD = D, at
        d = c % HD) read at x + b*sxb + l*sxl + (c // HD)*sxh + d. NORM: RMS over the row's 2P elements, the
        normalised value rounded to x's dtype, times w[c], rounded to the output dtype; UNROT: that stored to unrot
        (contiguous [N, 2P]). Then pair j = c // 2 rotated by cos[l*scl + j % (HD/2)], sin[l*ssl + j % (HD/2)] in
        float32, rounded and stored to rot (contiguous [N, 2P]); not ROT: no rotation (cos/sin not read, rot not
        written): the norm alone, to unrot."""
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, 2 * BLOCK)
        rmask = rows < N
        mask = rmask[:, None] & (cols < 2 * P)[None, :]
        r = rows.to(tl.int64)
        b = r // L
        tok = r % L
        c = cols.to(tl.int64)
        xoff = (b * sxb + tok * sxl)[:, None] + ((c // HD) * sxh + c % HD)[None, :]
        v = tl.load(x_ptr + xoff, mask=mask, other=0.0).to(tl.float32)
        out_ty = rot_ptr.dtype.element_ty
        if NORM:
            ss = tl.sum(v * v, axis=1)
            rstd = tl.rsqrt(ss / (2 * P) + eps)
            v = rounded(v * rstd[:, None], x_ptr.dtype.element_ty)                 # .type_as(x)
            w = tl.load(w_ptr + c, mask=c < 2 * P, other=0.0).to(tl.float32)
            v = rounded(v * w[None, :], out_ty)                                      # * weight
        flat = r[:, None] * (2 * P) + c[None, :]
        if UNROT:
            tl.store(unrot_ptr + flat, v.to(out_ty), mask=mask)
        if ROT:
            a, bb = tl.split(tl.reshape(v, (ROWS, BLOCK, 2)))
            j = tl.arange(0, BLOCK).to(tl.int64)
            pmask = rmask[:, None] & (j < P)[None, :]
            i = (j % (HD // 2))[None, :]
            cs = tl.load(cos_ptr + (tok * scl)[:, None] + i, mask=pmask, other=0.0)
            sn = tl.load(sin_ptr + (tok * ssl)[:, None] + i, mask=pmask, other=0.0)
            ra = a * cs - bb * sn
            rb = a * sn + bb * cs
            rot = tl.reshape(tl.join(ra, rb), (ROWS, 2 * BLOCK))
            tl.store(rot_ptr + flat, rounded(rot, out_ty).to(out_ty), mask=mask)


def _angles_ok(cos: torch.Tensor, sin: torch.Tensor, L: int, half: int) -> bool:
    return (cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape and cos.ndim == 2
            and cos.shape[0] in (L, 1) and cos.shape[1] == half)


def _angles(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cos or sin [L or 1, D/2] with a unit last stride, and its row stride (0 for one row, broadcast)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0)


def _launch(x4: torch.Tensor, weight, cos, sin, eps: float, out_dtype: torch.dtype, unrotated: bool):
    """x4: a [B, L, H, D] view with a unit last stride (and, with a weight, each row's heads side by side: the
    RMS spans the row). Returns (rot, unrot or None), new contiguous [B, L, H, D] tensors in out_dtype; cos None:
    no rotation, (None, unrot) (the norm alone)."""
    B, L, H, D = x4.shape
    rotated = cos is not None
    unrot = torch.empty((B, L, H, D), dtype=out_dtype, device=x4.device) if unrotated or not rotated else None
    rot = torch.empty((B, L, H, D), dtype=out_dtype, device=x4.device) if rotated else None
    N, P = B * L, H * D // 2
    if N == 0 or P == 0:
        return rot, unrot
    if rotated:
        cos, scl = _angles(cos)
        sin, ssl = _angles(sin)
    else:
        cos = sin = unrot                                    # not read
        scl = ssl = 0
    BLOCK = max(16, triton.next_power_of_2(P))
    ROWS = max(1, min(16, 4096 // (2 * BLOCK)))
    warps = 4 if 2 * BLOCK * ROWS <= 2048 else 8 if 2 * BLOCK * ROWS <= 8192 else 16
    w = weight.contiguous() if weight is not None else x4
    _qk_rope_kernel[(triton.cdiv(N, ROWS),)](
        x4, x4.stride(0), x4.stride(1), x4.stride(2), w, cos, scl, sin, ssl, rot if rotated else unrot,
        unrot if unrot is not None else rot, N, L, P, D, float(eps),
        NORM=weight is not None, UNROT=unrot is not None, ROWS=ROWS, BLOCK=BLOCK, ROT=rotated, num_warps=warps)
    return rot, unrot


# ----------------------------------------------------------------------------------------------- launchers

def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 num_heads: int, eps: float = 1e-6,
                 unrotated: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qk_norm_rope_reference in one pass per token: x [B, L, dim] (any batch/token strides), weight [dim] (the
    RMSNorm's; None: no norm), cos/sin [L, D/2] float32 (or [1, D/2], one angle set for every token), D = dim /
    num_heads. Returns (rotated, unrotated or None), new contiguous [B, L, H, D] tensors in the reference's dtype
    (x's when the weight has x's dtype); unrotated=False skips the second output (the query path)."""
    if x.ndim != 3 or x.shape[-1] % num_heads or (x.shape[-1] // num_heads) % 2:
        raise ValueError(f"x must be [B, L, dim] with dim split into {num_heads} heads of even size, not "
                         f"{tuple(x.shape)}")
    B, L, dim = x.shape
    D = dim // num_heads
    tensors = [t for t in (x, weight, cos, sin) if t is not None]
    if not (runs_triton(*tensors) and x.dtype in _KERNEL_DTYPES
            and (weight is None or (weight.dtype in _KERNEL_DTYPES and weight.shape == (dim,)))
            and _angles_ok(cos, sin, L, D // 2)):
        return qk_norm_rope_reference(x, weight, cos, sin, num_heads, eps, unrotated)
    out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _launch(x.unflatten(-1, (num_heads, D)), weight, cos, sin, eps, out_dtype, unrotated)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """models.rope.apply_rope in one pass: x [B, L, H, D] (any strides; e.g. cached keys before RoPE), cos/sin
    [L, D/2] float32 (or [1, D/2]). Returns a new contiguous [B, L, H, D] tensor in x's dtype."""
    if x.ndim != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be [B, L, H, D] with an even D, not {tuple(x.shape)}")
    if not (runs_triton(x, cos, sin) and x.dtype in _KERNEL_DTYPES and _angles_ok(cos, sin, x.shape[1],
                                                                                  x.shape[-1] // 2)):
        return rope_reference(x, cos, sin)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _launch(x, None, cos, sin, 0.0, x.dtype, False)[0]


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor | None, num_heads: int, eps: float = 1e-6) -> torch.Tensor:
    """The norm of qk_norm_rope without the rotation, in the same one pass: x [B, L, dim] -> RMSNorm over the whole
    dim (rms_norm_reference; weight None: none) split into num_heads heads, a new contiguous [B, L, H, D] tensor
    (weight None: x's view). For Ulysses sequence parallelism, whose ranks normalise their tokens (all heads) before
    the all-to-all and rotate after it, at the sequence's positions (`rope`)."""
    if x.ndim != 3 or x.shape[-1] % num_heads or (x.shape[-1] // num_heads) % 2:
        raise ValueError(f"x must be [B, L, dim] with dim split into {num_heads} heads of even size, not "
                         f"{tuple(x.shape)}")
    if weight is None:
        return x.unflatten(-1, (num_heads, -1))
    if not (runs_triton(x, weight) and x.dtype in _KERNEL_DTYPES and weight.dtype in _KERNEL_DTYPES
            and weight.shape == (x.shape[-1],)):
        return rms_norm_reference(x, weight, eps).unflatten(-1, (num_heads, -1))
    if x.stride(-1) != 1:
        x = x.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return _launch(x.unflatten(-1, (num_heads, -1)), weight, None, None, eps, out_dtype, False)[1]
