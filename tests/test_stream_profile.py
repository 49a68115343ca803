"""benchmarks/stream_profile.py: the tiny stream profiled on the CPU, its buckets adding up to the chunk's wall time
and the named ranges gone afterwards; the CUDA bookkeeping (kernels by the ops that launched them) on made-up events."""
import importlib.util
from pathlib import Path

import pytest
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

_spec = importlib.util.spec_from_file_location(
    "stream_profile", Path(__file__).resolve().parents[1] / "benchmarks" / "stream_profile.py")
sp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sp)


def test_tiny_stream_profile_adds_up(tmp_path, monkeypatch):
    originals = (dict(sp.dit.SELF_ATTENTION), sp.adaln.norm_modulate, sp.qk_rope.rope, sp.dit.apply_rope)
    monkeypatch.setenv("OUT", str(tmp_path))
    r = sp.main(["--preset", "tiny", "--size", "32x32", "--chunks", "2", "--timed", "2"])
    b = r["buckets_ms"]
    assert set(b) == set(sp.BUCKETS)
    assert all(v >= 0 for v in b.values()), b              # host = wall - time in ops: ops never counted twice
    assert sum(b.values()) == pytest.approx(r["chunk_ms"])
    assert sum(v for k, v in b.items() if k != "host") <= r["chunk_ms"]
    for k in ("self_attn", "cross_text", "cross_audio", "ffn", "linear", "norm", "rope", "taehv"):
        assert b[k] > 0, k                                 # the tiny preset has every part, the speech adapter too
    assert any("scaled_dot_product" in op for op in r["top_items_ms"]["self_attn"])
    assert r["chunks"] == 2 and r["frames_per_chunk"] > 0 and r["chunk_ms_unprofiled"] > 0
    assert {p.name for p in tmp_path.iterdir()} >= {"stream_profile.json", "ops.txt", "trace.json"}
    # the ranges were the script's alone, for the profile only
    assert (dict(sp.dit.SELF_ATTENTION), sp.adaln.norm_modulate, sp.qk_rope.rope, sp.dit.apply_rope) == originals


def _event(i, name, start, end, parent=None, kernels=(), device=DeviceType.CPU, annotation=False):
    e = FunctionEvent(i, name, 1, start, end, device_type=device, is_user_annotation=annotation)
    if parent is not None:
        e.set_cpu_parent(parent)
        parent.append_cpu_child(e)
    for k, us in kernels:
        e.append_kernel(k, 0, us)
    return e


def test_cuda_attribution_counts_each_kernel_once():
    """Kernels go to the bucket of their launching op's ranges; a range's own GPU annotation and kernels outside the
    profiled chunks are not counted (negative controls), nor is the chunk's closing sync a mid-chunk wait."""
    chunk = _event(1, "vidu::chunk", 0, 1000)
    dit = _event(2, "vidu::dit", 0, 800, chunk)
    attn = _event(3, "vidu::attn_core", 10, 100, dit, kernels=[("vidu::attn_core", 90)])   # its GPU annotation
    sdpa = _event(4, "aten::_scaled_dot_product_flash_attention", 20, 90, attn, kernels=[("flash_fwd_kernel", 60)])
    text = _event(5, "vidu::cross_text", 100, 200, dit)
    mm = _event(6, "aten::mm", 110, 150, text, kernels=[("nvjet_gemm", 30)])
    ffn = _event(7, "vidu::ffn", 200, 300, dit)
    addmm = _event(8, "aten::addmm", 210, 290, ffn, kernels=[("nvjet_gemm", 50)])
    cat = _event(9, "aten::cat", 300, 320, dit, kernels=[("CatArrayBatchedCopy", 5)])
    cast = _event(10, "aten::_to_copy", 320, 340, dit)
    copy = _event(11, "aten::copy_", 322, 338, cast, kernels=[("elementwise_kernel", 4)])
    wait = _event(12, "cudaStreamSynchronize", 400, 450, dit)
    taehv = _event(13, "vidu::taehv", 800, 900, chunk)
    conv = _event(14, "aten::cudnn_convolution", 810, 880, taehv, kernels=[("sm90_conv", 70)])
    closing = _event(15, "cudaDeviceSynchronize", 900, 1000, chunk)
    outside = _event(16, "aten::mm", 2000, 2100, kernels=[("nvjet_gemm", 999)])               # not in a chunk
    gpu = [_event(20 + i, k, 0, us, device=DeviceType.CUDA)
           for i, (k, us) in enumerate([("flash_fwd_kernel", 60), ("nvjet_gemm", 30), ("nvjet_gemm", 50),
                                        ("CatArrayBatchedCopy", 5), ("elementwise_kernel", 4), ("sm90_conv", 70)])]
    gpu.append(_event(30, "vidu::attn_core", 0, 90, device=DeviceType.CUDA, annotation=True))
    events = [chunk, dit, attn, sdpa, text, mm, ffn, addmm, cat, cast, copy, wait, taehv, conv, closing, outside, *gpu]
    a = sp.attribute(events, cuda=True)
    assert a["device_us"] == {"self_attn": 60, "cross_text": 30, "ffn": 50, "cache": 5, "elementwise": 4, "taehv": 70}
    assert sum(a["device_us"].values()) == a["all_device_us"] == 219
    assert a["waits"] == 1 and a["waits_us"] == 50
    assert a["count"]["self_attn"] == 1 and "vidu::attn_core" not in a["items"]["self_attn"]
