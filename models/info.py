"""What a checkpoint file is: format, architecture, parameter count, conditioning branches, lineage.

    from models.info import describe
    describe("causal.safetensors")   # -> dict, printed by `vidu model info`
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import torch

from models.checkpoint import (CheckpointError, checkpoint_file, infer_dit_config, is_new_branch, layout,
                               mismatches, read_metadata, read_state_dict)


def describe(path: str | Path, preset: str | None = None) -> dict:
    path = checkpoint_file(path)
    sd = read_state_dict(path)
    meta = read_metadata(path)
    dtypes = Counter(str(v.dtype).replace("torch.", "") for v in sd.values())
    info: dict = {"path": str(path), "format": _format(path, meta), "kind": _kind(sd),
                  "parameters": sum(v.numel() for v in sd.values()), "tensors": len(sd),
                  "dtypes": dict(dtypes), "lineage": meta.get("lineage", [])}
    if info["kind"] != "dit":
        return info
    from models.config import ModelConfig, preset as get_preset
    stored = meta.get("config") if meta.get("format") == "vidu" else None
    cfg = ModelConfig.from_dict(stored) if isinstance(stored, dict) else None
    dit = cfg.dit if cfg else infer_dit_config(sd)
    info["config_source"] = "checkpoint metadata" if cfg else "inferred from shapes (heads = dim / 128)"
    info["architecture"] = {k: v for k, v in dataclasses.asdict(dit).items()}
    if cfg:
        info["model"] = {"name": cfg.name, "resolution": f"{cfg.width}x{cfg.height}", "latent_frames": cfg.latent_frames,
                         "chunk_frames": cfg.chunk_frames, "text_encoder": cfg.text_encoder,
                         "audio_encoder": cfg.audio_encoder}
    info["conditioning"] = {
        "text": f"{dit.text_dim}-d features, {dit.text_len} tokens",
        "audio_adapter": f"{dit.audio_dim}-d features per latent frame" if dit.audio_dim else "absent",
        "joint_audio": (f"{dit.audio_latent_tokens} tokens x {dit.audio_latent_dim} per latent frame"
                        if dit.joint_audio else "absent"),
        "reference_frame": "supported (clean latent frame at t=0)",
    }
    info["new_branches_present"] = any(is_new_branch(k) for k in sd)
    if preset:
        info["fits_preset"] = _fits(sd, get_preset(preset))
    return info


def _fits(sd: dict, cfg) -> str:
    from models.dit import DiT
    with torch.device("meta"):
        model = DiT(cfg.dit)
    expected = {k: s for k, s in layout(model).items() if not is_new_branch(k) or k in sd}
    problem = mismatches(expected, layout(sd))
    return f"yes ({cfg.name})" if not problem else f"no: {problem}"


def _format(path: Path, meta: dict) -> str:
    sharded = path.name.endswith(".index.json")
    if meta.get("format") == "vidu":
        return "vidu safetensors" + (" (sharded)" if sharded else "")
    if sharded:
        return "sharded safetensors"
    if path.suffix == ".safetensors":
        return "safetensors"
    try:
        obj = torch.load(str(path), map_location="meta", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - read_state_dict already succeeded; this is only a label
        return "torch"
    if isinstance(obj, dict):
        nested = [k for k in ("generator_ema", "generator", "state_dict", "model") if isinstance(obj.get(k), dict)]
        if nested:
            return f"torch ({' + '.join(nested)})"
    return "torch state dict"


def _kind(sd: dict) -> str:
    if "patch_embedding.weight" in sd and "blocks.0.self_attn.q.weight" in sd:
        return "dit"
    if "encoder.conv1.weight" in sd and "decoder.conv1.weight" in sd:
        return "wan-vae"
    if "encoder.0.weight" in sd and "decoder.1.weight" in sd:
        return "taehv"
    raise CheckpointError("unrecognised checkpoint: neither a Wan-style DiT, the Wan VAE nor TAEHV")
