"""LayerNorm + adaLN modulation and the gated residual add of a DiT block, fused in Triton (issue 18).

Block.forward (models/dit.py) spends these element-wise passes around every GEMM:

    h = self.norm1(x).float() * (1 + m[1]) + m[0]          -> norm_modulate(x, m[0], m[1], out_dtype=linear dtype)
    x = x + y.unflatten(1, (F, S)).float() * m[2]          -> gated_residual(x, y, m[2])
    both, back to back (residual then the next norm)        -> gated_residual_norm_modulate(x, y, m[2], ...)

x: [B, F, S, dim] (the float32 residual stream); the modulations shift/scale/gate: [B, F, 1, dim] (one row per
frame, broadcast over its S tokens), or any shape that broadcasts to x's ([B, 1, 1, dim], [dim], ...). The kernels
read them through their (broadcast) strides, never materialising the broadcast, and read x and y through their
strides too (no copy for a non-contiguous view); the outputs are new contiguous tensors. One program handles ROWS
rows of dim (BLOCK = the power of two >= dim, masked), accumulating in float32.

The `*_reference` functions are the model's own expressions (tests/test_kernel_adaln.py checks them against
Block.forward); the launchers run the Triton kernel where `runs_triton` says one can run (CUDA, or the CPU under
TRITON_INTERPRET=1, not where autograd records through an input nor under torch.compile's tracing) and the
reference anywhere else, and also for dtypes other than float32/float16/bfloat16 or for more than 4 dims.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vidu_kernels._triton import HAVE_TRITON, runs_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from vidu_kernels._triton import rounded

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- references

def norm_modulate_reference(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None,
                            eps: float = 1e-6, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`LayerNorm(x).float() * (1 + scale) + shift`, as Block.forward computes it: the LayerNorm over the last dim in
    float32 (affine with weight/bias when given), its result cast to x's dtype (models/dit.py LayerNorm's
    `type_as`), then modulated in float32. shift/scale: broadcastable to x ([B, F, 1, dim]); None leaves that step
    out (both None: the plain LayerNorm, e.g. norm3's). Returns the expression's own dtype (float32 when modulated,
    x's dtype when not) unless out_dtype is given, e.g. the next linear's bf16."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    h = F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).type_as(x)
    if scale is not None or shift is not None:
        h = h.float()
        if scale is not None:
            h = h * (1 + scale)
        if shift is not None:
            h = h + shift
    return h if out_dtype is None else h.to(out_dtype)


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """`x + y.float() * gate` (Block.forward's residual add; gate None: `x + y.float()`). x: [B, F, S, dim] float32,
    y: same shape, any float dtype; gate: broadcastable to x ([B, F, 1, dim])."""
    return x + y.float() if gate is None else x + y.float() * gate


def gated_residual_norm_modulate_reference(x, y, gate, shift, scale, eps: float = 1e-6, weight=None, bias=None,
                                           out_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add then the next norm of the new stream: (x_new, h) with x_new = gated_residual_reference(x, y,
    gate) and h = norm_modulate_reference(x_new, shift, scale, eps, weight, bias, out_dtype)."""
    x_new = gated_residual_reference(x, y, gate)
    return x_new, norm_modulate_reference(x_new, shift, scale, eps, weight, bias, out_dtype)


# ----------------------------------------------------------------------------------------------- the kernel

if HAVE_TRITON:
    @triton.jit
    def _adaln_kernel(x_ptr, sx0, sx1, sx2, sx3,
                      y_ptr, sy0, sy1, sy2, sy3,
                      g_ptr, sg0, sg1, sg2, sg3,
                      sh_ptr, ssh0, ssh1, ssh2, ssh3,
                      sc_ptr, ssc0, ssc1, ssc2, ssc3,
                      w_ptr, b_ptr, res_ptr, out_ptr,
                      N, NF, NS, D, eps,
                      HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
                      ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Rows r of the [N = B*F*S, D] token grid, (b, f, s) = unravel(r, (B, F, S)); every operand is read at
        b*s0 + f*s1 + s*s2 + d*s3 (stride 0 on a broadcast axis). HAS_Y: v = x + y * gate (gate 1 without
        HAS_GATE), stored to res (contiguous [N, D]); else v = x. NORM: out = LN(v) (affine by w/b), rounded to the
        normalised tensor's dtype, then * (1 + scale) + shift, stored to out (contiguous [N, D]) in its dtype."""
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        rmask = rows < N
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        r = rows.to(tl.int64)
        s = r % NS
        f = (r // NS) % NF
        b = r // (NS * NF)
        c = cols.to(tl.int64)

        v = tl.load(x_ptr + (b * sx0 + f * sx1 + s * sx2)[:, None] + (c * sx3)[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        flat = r[:, None] * D + c[None, :]
        if HAS_Y:
            yv = tl.load(y_ptr + (b * sy0 + f * sy1 + s * sy2)[:, None] + (c * sy3)[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            if HAS_GATE:
                gv = tl.load(g_ptr + (b * sg0 + f * sg1 + s * sg2)[:, None] + (c * sg3)[None, :], mask=mask,
                             other=0.0).to(tl.float32)
                yv = yv * gv
            v = v + yv
            v = rounded(v, res_ptr.dtype.element_ty)            # the stored stream is what the norm reads
            tl.store(res_ptr + flat, v.to(res_ptr.dtype.element_ty), mask=mask)
        if NORM:
            mean = tl.sum(v, axis=1) / D
            diff = tl.where(mask, v - mean[:, None], 0.0)
            var = tl.sum(diff * diff, axis=1) / D
            h = diff * tl.rsqrt(var + eps)[:, None]
            if HAS_W:
                h = h * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                h = h + tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if HAS_Y:                                               # LayerNorm's type_as(its input)
                h = rounded(h, res_ptr.dtype.element_ty)
            else:
                h = rounded(h, x_ptr.dtype.element_ty)
            if HAS_SCALE:
                sc = tl.load(sc_ptr + (b * ssc0 + f * ssc1 + s * ssc2)[:, None] + (c * ssc3)[None, :], mask=mask,
                             other=0.0).to(tl.float32)
                h = h * rounded(1.0 + sc, sc_ptr.dtype.element_ty)     # torch's `1 + scale` keeps scale's dtype
            if HAS_SHIFT:
                sh = tl.load(sh_ptr + (b * ssh0 + f * ssh1 + s * ssh2)[:, None] + (c * ssh3)[None, :], mask=mask,
                             other=0.0).to(tl.float32)
                h = h + sh
            tl.store(out_ptr + flat, rounded(h, out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty), mask=mask)


def _kernel_can_run(shape4, out_dtypes, *tensors) -> bool:
    ts = [t for t in tensors if t is not None]
    return (shape4 is not None and runs_triton(*ts) and all(t.dtype in _KERNEL_DTYPES for t in ts)
            and all(d in _KERNEL_DTYPES for d in out_dtypes))


def _shape4(*tensors) -> tuple[int, ...] | None:
    """The broadcast shape of the operands as 4 dims (leading 1s), or None when it has more than 4."""
    shape = torch.broadcast_shapes(*(t.shape for t in tensors if t is not None))
    if len(shape) > 4 or len(shape) == 0:
        return None
    return (1,) * (4 - len(shape)) + tuple(shape)


def _view4(t: torch.Tensor | None, shape4) -> tuple[torch.Tensor | None, tuple[int, int, int, int]]:
    """t broadcast to shape4 as a view (stride 0 on broadcast axes; nothing copied) and its 4 strides."""
    if t is None:
        return None, (0, 0, 0, 0)
    v = t.reshape((1,) * (4 - t.ndim) + tuple(t.shape)).expand(shape4)
    return v, tuple(v.stride())


def _row_vec(t: torch.Tensor | None, D: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).expand(D).contiguous()


def _launch(shape4, x, y, gate, shift, scale, weight, bias, eps, res_dtype, out_dtype, norm: bool):
    """Run _adaln_kernel over the broadcast shape4; returns (res or None, out or None), contiguous, shape4."""
    B, NF, NS, D = shape4
    N = B * NF * NS
    dev = x.device
    res = torch.empty(shape4, dtype=res_dtype, device=dev) if y is not None else None
    out = torch.empty(shape4, dtype=out_dtype, device=dev) if norm else None
    if N == 0 or D == 0:
        return res, out
    xv, sx = _view4(x, shape4)
    yv, sy = _view4(y, shape4)
    gv, sg = _view4(gate, shape4)
    shv, ssh = _view4(shift, shape4)
    scv, ssc = _view4(scale, shape4)
    w, b = _row_vec(weight, D), _row_vec(bias, D)
    BLOCK = max(16, triton.next_power_of_2(D))
    ROWS = max(1, min(16, 4096 // BLOCK))
    warps = 4 if BLOCK * ROWS <= 2048 else 8 if BLOCK * ROWS <= 8192 else 16
    dummy = xv                                     # never read: its HAS_* flag is off
    _adaln_kernel[(triton.cdiv(N, ROWS),)](
        xv, *sx, yv if yv is not None else dummy, *sy, gv if gv is not None else dummy, *sg,
        shv if shv is not None else dummy, *ssh, scv if scv is not None else dummy, *ssc,
        w if w is not None else dummy, b if b is not None else dummy,
        res if res is not None else dummy, out if out is not None else dummy,
        N, NF, NS, D, float(eps),
        HAS_Y=y is not None, HAS_GATE=gate is not None, NORM=norm, HAS_W=w is not None, HAS_B=b is not None,
        HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, ROWS=ROWS, BLOCK=BLOCK, num_warps=warps)
    return res, out


def _norm_dtype(x_dtype: torch.dtype, shift, scale) -> torch.dtype:
    """The dtype norm_modulate_reference returns without out_dtype."""
    if shift is None and scale is None:
        return x_dtype
    d = torch.float32
    for t in (scale, shift):
        if t is not None:
            d = torch.promote_types(d, t.dtype)
    return d


def _res_dtype(x, gate) -> torch.dtype:
    """The dtype of x + y.float() * gate."""
    d = torch.promote_types(x.dtype, torch.float32)
    return d if gate is None else torch.promote_types(d, gate.dtype)


# ----------------------------------------------------------------------------------------------- launchers

def norm_modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float = 1e-6,
                  weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """norm_modulate_reference in one pass: x [B, F, S, dim] (any strides), shift/scale broadcastable to it
    ([B, F, 1, dim]) or None. Returns a new contiguous tensor of x's shape in out_dtype (default: the reference's
    dtype, float32 when modulated; pass the next linear's dtype to fuse the cast)."""
    out_dtype = out_dtype or _norm_dtype(x.dtype, shift, scale)
    shape4 = _shape4(x, shift, scale)
    if not _kernel_can_run(shape4, [out_dtype], x, shift, scale, weight, bias):
        return norm_modulate_reference(x, shift, scale, eps, weight, bias, out_dtype)
    out_shape = torch.broadcast_shapes(x.shape, *(t.shape for t in (shift, scale) if t is not None))
    return _launch(shape4, x, None, None, shift, scale, weight, bias, eps, None, out_dtype, True)[1].view(out_shape)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """gated_residual_reference in one pass: x + y.float() * gate, x/y [B, F, S, dim] (any strides, any float
    dtypes), gate broadcastable ([B, F, 1, dim]) or None (plain add). Returns a new contiguous tensor in the
    reference's dtype (float32 for float32/bf16/fp16 operands)."""
    res_dtype = _res_dtype(x, gate)
    shape4 = _shape4(x, y, gate)
    if not _kernel_can_run(shape4, [res_dtype], x, y, gate):
        return gated_residual_reference(x, y, gate)
    out_shape = torch.broadcast_shapes(*(t.shape for t in (x, y, gate) if t is not None))
    return _launch(shape4, x, y, gate, None, None, None, None, 0.0, res_dtype, None, False)[0].view(out_shape)


def gated_residual_norm_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None,
                                 shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float = 1e-6,
                                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gated_residual then norm_modulate of its result, in one pass (x read once, the new stream written once):
    returns (x_new = x + y.float() * gate, h = LN(x_new) [* (1 + scale) + shift] in out_dtype). gate None: plain
    add (Block's `x + y.float()` before norm2); shift/scale None: the plain (affine) LayerNorm (norm3)."""
    res_dtype = _res_dtype(x, gate)
    out_dtype = out_dtype or _norm_dtype(res_dtype, shift, scale)
    shape4 = _shape4(x, y, gate, shift, scale)
    if shape4 != _shape4(x, y, gate):              # shift/scale broadcasting past x_new's shape: the reference's
        shape4 = None
    if not _kernel_can_run(shape4, [res_dtype, out_dtype], x, y, gate, shift, scale, weight, bias):
        return gated_residual_norm_modulate_reference(x, y, gate, shift, scale, eps, weight, bias, out_dtype)
    out_shape = torch.broadcast_shapes(*(t.shape for t in (x, y, gate, shift, scale) if t is not None))
    res, out = _launch(shape4, x, y, gate, shift, scale, weight, bias, eps, res_dtype, out_dtype, True)
    return res.view(out_shape), out.view(out_shape)
