"""Kernel cases for benchmarks/kernel_bench.py: W8A8 block-scaled GEMMs (vidu_kernels/w8a8.py) against bf16 F.linear,
at Wan 1.3B's linear shapes (issue 18).

Wan 1.3B: dim 1536, FFN 8960. A 960x544 chunk of one latent frame is 60 x 34 = 2040 tokens (patch 2x2 on the
120 x 68 latent), a chunk of three 6120. Per block: q, k, v, o (1536 -> 1536), FFN up (1536 -> 8960) and down
(8960 -> 1536). On the GPU M is the 6120 tokens of the preset's chunk of three frames (the stream's setting; a
1-frame chunk's 2040 is left out to keep the run short). For each shape:
  "<shape> M=<m> fp8 linear"      ours: `w8a8_linear` as the model calls it, two launches: activation quantization
                                  (Triton, one pass: absmax per token and 128 channels -> 8-bit values and scales)
                                  + the fp8 block-scaled GEMM
  "<shape> M=<m> int8 linear"     the same in int8 (int32 tl.dot partials)
  "<shape> M=<m> <fmt> gemm only" the GEMM alone on activations quantized beforehand
  "<shape> M=<m> scaled_mm fp8"   baseline: torch._scaled_mm rowwise fp8 (per-token x per-channel scales, the
                                  activations quantized by plain torch ops), where this torch and GPU have it
and for each K: "quantize K=<k> M=<m> <fmt>": the quantization pass alone, "torch" there being the torch-op
reference (quantize_act_reference; the outputs compared are the 8-bit values as floats and the scales).
"torch" is otherwise bf16 F.linear with bias; kernel_bench's graph columns time both in CUDA graphs (no host
launch overhead). The weights are quantized once, outside the timed call. "err" is the
relative L2 against the float32 product of the same bf16 inputs (the quantization error; the harness's
rel_l2_vs_torch is the same against the bf16 F.linear). Inputs are Gaussian: real activations have outlier
channels, which the per-128-channel scales absorb and a per-token-only scale (scaled_mm) does not.
On a device other than CUDA the cases shrink M to 64 tokens (a plumbing rehearsal on the torch references).
(benchmarks/kernel_bench.py puts the repository root on sys.path for the imports.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.config import PRESETS
from vidu_kernels.w8a8 import quantize_act, quantize_act_reference, quantize_weight, w8a8_gemm, w8a8_linear


def shapes() -> tuple[list[tuple[str, int, int]], list[int]]:
    """([(label, K, N)] of a block's linears, [M]: the tokens of a 1-frame chunk and of the preset's chunk)."""
    wan = PRESETS["wan2.1-1.3b"].replace(height=544, width=960)
    d, f = wan.dit.dim, wan.dit.ffn_dim
    linears = [(f"wan1.3b qkvo {d}x{d}", d, d), (f"wan1.3b ffn up {d}->{f}", d, f), (f"wan1.3b ffn down {f}->{d}", f, d)]
    return linears, [wan.tokens_per_frame(), wan.tokens_per_frame() * wan.chunk_frames]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _has_scaled_mm_rowwise(device: str) -> bool:
    return (device.startswith("cuda") and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(torch.device(device)) >= (9, 0))


def _scaled_mm_rowwise(w: torch.Tensor, bias: torch.Tensor):
    """torch._scaled_mm with one scale per token and per output channel: weights quantized here, once."""
    amax_w = w.float().abs().amax(1, keepdim=True).clamp_min(1e-12)
    wq = (w.float() * (448.0 / amax_w)).to(torch.float8_e4m3fn)          # [N, K] row-major = [K, N] column-major
    w_scale = (amax_w / 448.0).t().contiguous()                          # [1, N]

    def run(x: torch.Tensor) -> torch.Tensor:
        amax = x.float().abs().amax(1, keepdim=True).clamp_min(1e-12)
        xq = (x.float() * (448.0 / amax)).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, wq.t(), scale_a=amax / 448.0, scale_b=w_scale, bias=bias,
                                out_dtype=torch.bfloat16)
    return run


def cases(device: str) -> list[dict]:
    on_gpu = device.startswith("cuda")
    linears, tokens = shapes()
    m = tokens[-1] if on_gpu else 64
    out = []
    g = torch.Generator(device="cpu").manual_seed(0)
    quantized_k = set()
    for shape, k, n in linears:
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, torch.bfloat16)
        bias = (torch.randn(n, generator=g) * 0.1).to(device, torch.bfloat16)
        quant = {fmt: quantize_weight(w, fmt) for fmt in ("fp8", "int8")}
        scaled_mm = _scaled_mm_rowwise(w, bias) if _has_scaled_mm_rowwise(device) else None
        x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
        exact = x.float() @ w.float().t() + bias.float()
        torch_fn = lambda x=x, w=w, bias=bias: F.linear(x, w, bias)  # noqa: E731
        variants = [(f"{fmt} linear", lambda x=x, q=quant[fmt], fmt=fmt, bias=bias: w8a8_linear(x, q[0], q[1], bias, fmt))
                    for fmt in ("fp8", "int8")]
        for fmt in ("fp8", "int8"):
            xq, xs = quantize_act(x, fmt)
            variants.append((f"{fmt} gemm only", lambda xq=xq, xs=xs, q=quant[fmt], bias=bias:
                             w8a8_gemm(xq, xs, q[0], q[1], bias, torch.bfloat16)))
        if scaled_mm is not None:
            variants.append(("scaled_mm fp8", lambda x=x, f=scaled_mm: f(x)))
        for label, fn in variants:
            out.append({"name": f"{shape} M={m} {label}", "torch": torch_fn, "ours": fn,
                        "flops": 2 * m * n * k,
                        "err": lambda fn=fn, exact=exact: _rel_l2(fn(), exact)})
        if k not in quantized_k:                    # the quantization pass alone, once per K
            quantized_k.add(k)
            for fmt in ("fp8", "int8"):
                def ref(x=x, fmt=fmt):
                    q, s = quantize_act_reference(x, fmt)
                    return q.float(), s

                def ours(x=x, fmt=fmt):
                    q, s = quantize_act(x, fmt)
                    return q.float(), s
                out.append({"name": f"quantize K={k} M={m} {fmt}", "torch": ref, "ours": ours,
                            "bytes": m * k * (x.element_size() + 1) + m * -(-k // 128) * 4})
    return out
