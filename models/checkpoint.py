"""Checkpoint IO: read state dicts from any of the formats we meet, check them against a module
with a message that names the first mismatched keys and shapes, and write our own safetensors
checkpoints with the config, lineage and the sampling settings of training in their metadata.

Formats read: .safetensors (single file, or a `*.safetensors.index.json` of shards), torch .pt/.pth/.bin
(a bare state dict, or one under `generator_ema` / `generator` / `state_dict` / `model`, with or
without a `model.` prefix on every key, as CausVid and Self-Forcing write them).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

NESTED_KEYS = ("generator_ema", "generator", "state_dict", "model", "module")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the architecture (message is one line)."""


def read_state_dict(path: str | Path, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at `path`, keys as the architecture names them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    name = path.name
    try:
        if name.endswith(".safetensors.index.json"):
            sd = _read_sharded(path)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        elif path.is_dir():
            return read_state_dict(_find_in_dir(path), prefer_ema)
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            sd = _unnest(obj, prefer_ema)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file to the user
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    return strip_prefix(sd)


def _find_in_dir(path: Path) -> Path:
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.pt", "*.pth"):
        found = sorted(path.glob(pattern))
        if len(found) == 1 or (found and pattern.endswith("index.json")):
            return found[0]
        if found:
            raise CheckpointError(f"{path} holds several {pattern} files; name one of them")
    raise CheckpointError(f"no checkpoint file (.safetensors, .pt, .pth) in {path}")


def _read_sharded(index: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    weight_map = json.loads(index.read_text())["weight_map"]
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.exists():
            raise CheckpointError(f"shard {shard} named by {index.name} is missing")
        sd.update(load_file(str(shard_path)))
    return sd


def _unnest(obj, prefer_ema: bool) -> dict[str, torch.Tensor]:
    order = NESTED_KEYS if prefer_ema else ("generator",) + tuple(k for k in NESTED_KEYS if k != "generator")
    while isinstance(obj, dict) and not _is_state_dict(obj):
        key = next((k for k in order if k in obj and isinstance(obj[k], dict)), None)
        if key is None:
            raise CheckpointError(f"no state dict in checkpoint (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    return obj


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefix(sd: dict[str, torch.Tensor], prefixes=("model.", "module.", "_orig_mod.")) -> dict[str, torch.Tensor]:
    """Drop a prefix that every key carries (FSDP, torch.compile, CausVid wrappers)."""
    changed = True
    while changed and sd:
        changed = False
        for p in prefixes:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def mismatches(expected: dict[str, tuple], given: dict[str, tuple], show: int = 3) -> str:
    """'' when the two layouts {name: shape} agree, else a one-line description of the first differences."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [k for k in expected if k in given and tuple(expected[k]) != tuple(given[k])]
    parts = []
    if wrong:
        parts.append("shape mismatch " + ", ".join(
            f"{k} (checkpoint {list(given[k])}, model {list(expected[k])})" for k in wrong[:show])
            + (f" and {len(wrong) - show} more" if len(wrong) > show else ""))
    if missing:
        parts.append(f"missing {len(missing)} keys: " + ", ".join(missing[:show]))
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys: " + ", ".join(unexpected[:show]))
    return "; ".join(parts)


def layout(module_or_sd) -> dict[str, tuple]:
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, nn.Module) else module_or_sd
    return {k: tuple(v.shape) for k, v in sd.items()}


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], what: str = "checkpoint",
              optional: tuple[str, ...] = ()) -> nn.Module:
    """Load `sd` into `module` strictly. Keys starting with a prefix in `optional` may be absent
    (new branches a Wan checkpoint does not have keep their initialisation)."""
    expected = layout(module)
    given = layout(sd)
    required = {k: s for k, s in expected.items() if not k.startswith(optional) or k in given}
    problem = mismatches(required, given)
    if problem:
        raise CheckpointError(f"{what} does not fit the architecture: {problem}")
    module.load_state_dict(sd, strict=False, assign=_on_meta(module))
    return module


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def save_safetensors(path: str | Path, sd: dict[str, torch.Tensor], metadata: dict[str, object]) -> Path:
    """Write tensors atomically with JSON-encoded metadata values."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def checkpoint_file(path: str | Path) -> Path:
    """The file `path` names: itself, or for a folder the one checkpoint in it (a shards' index first),
    so that what lies beside a checkpoint (its codec) is found from the file's folder."""
    path = Path(path)
    return _find_in_dir(path) if path.is_dir() else path


def read_metadata(path: str | Path) -> dict[str, object]:
    """The metadata of a safetensors file, JSON values decoded ({} for other formats); of a
    `*.safetensors.index.json` its first shard's (each shard vidu writes carries the whole of it), of a
    folder its checkpoint's."""
    path = checkpoint_file(path)
    if path.name.endswith(".safetensors.index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"cannot read the shards' index {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
        if not shards or not (path.parent / shards[0]).is_file():
            raise CheckpointError(f"shard {shards[0] if shards else '(none)'} named by {path.name} is missing")
        return read_metadata(path.parent / shards[0])
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {e}".splitlines()[0]) from None
    out: dict[str, object] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


# -- the DiT and the autoencoders ------------------------------------------------------------------

def is_new_branch(key: str) -> bool:
    """Parameters vidu adds to Wan's DiT (absent from Wan / CausVid / Self-Forcing files)."""
    return key.startswith(("audio_", "text_pool.")) or ".audio_attn." in key or ".norm_audio." in key


def infer_dit_config(sd: dict[str, torch.Tensor]):
    """A DiTConfig read off a state dict's shapes (heads assume Wan's head size of 128)."""
    from models.config import DiTConfig
    try:
        pe = sd["patch_embedding.weight"]                 # [dim, in_dim, pt, ph, pw]
        dim = pe.shape[0]
        layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        kw = dict(patch_size=tuple(pe.shape[2:]), in_dim=pe.shape[1], dim=dim,
                  ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], freq_dim=sd["time_embedding.0.weight"].shape[1],
                  text_dim=sd["text_embedding.0.weight"].shape[1],
                  out_dim=sd["head.head.weight"].shape[0] // math.prod(pe.shape[2:]),
                  num_heads=max(1, dim // 128), num_layers=layers,
                  qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
                  cross_attn_norm="blocks.0.norm3.weight" in sd)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a Wan-style DiT state dict (missing {e})") from None
    if "audio_embedding.0.weight" in sd:
        kw["audio_dim"] = sd["audio_embedding.0.weight"].shape[1]
    if "audio_patch.weight" in sd:
        kw["audio_latent_dim"] = sd["audio_patch.weight"].shape[1]
        kw["audio_latent_tokens"] = sd["audio_ref_tokens"].shape[2]
    kw["pooled_text"] = "text_pool.0.weight" in sd
    return DiTConfig(**kw)


def save_model(path: str | Path, model: nn.Module | dict, cfg, lineage: list[dict] | None = None,
               extra: dict | None = None) -> Path:
    """A vidu checkpoint: the DiT's weights (a module or its state dict) with the ModelConfig and
    training lineage in the metadata."""
    meta = {"format": "vidu", "config": cfg.to_dict(), "lineage": lineage or []}
    meta.update(extra or {})
    return save_safetensors(path, model.state_dict() if isinstance(model, nn.Module) else model, meta)


def checkpoint_config(path: str | Path):
    """The ModelConfig stored in a vidu checkpoint, or None for other formats."""
    from models.config import ModelConfig
    meta = read_metadata(path)
    if meta.get("format") == "vidu" and isinstance(meta.get("config"), dict):
        return ModelConfig.from_dict(meta["config"])
    return None


def checkpoint_sampling(path: str | Path) -> dict | None:
    """The sampling and streaming settings a vidu checkpoint was trained for (its "sampling" metadata:
    shift, steps, chunk_frames, window, sink, twin, noisy_step, noisy_level, codec), or None for other
    formats and for vidu checkpoints written before they were recorded."""
    meta = read_metadata(path)
    sampling = meta.get("sampling") if meta.get("format") == "vidu" else None
    return sampling if isinstance(sampling, dict) else None


def load_dit(path: str | Path, cfg=None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(DiT, ModelConfig) from any supported file. `cfg` (a ModelConfig) fixes the architecture;
    without it a vidu checkpoint's own config is used, else one inferred from the shapes."""
    from models.config import ModelConfig
    from models.dit import DiT
    sd = read_state_dict(path)
    if cfg is None:
        cfg = checkpoint_config(path) or ModelConfig(name=f"inferred:{Path(path).name}", dit=infer_dit_config(sd))
    with torch.device("meta"):
        model = DiT(cfg.dit)
    load_into(model, sd, what=f"checkpoint {Path(path).name}", optional=_new_branches(model))
    _materialise(model)
    model.to(device=device, dtype=dtype)
    return model.eval(), cfg


def _new_branches(model: nn.Module) -> tuple[str, ...]:
    return tuple(k for k in model.state_dict() if is_new_branch(k))


def _materialise(model: nn.Module) -> None:
    """Parameters still on the meta device (new branches absent from the file) get their initialisation."""
    if not any(p.is_meta for p in model.parameters()):
        return
    fresh = type(model)(model.cfg)
    own = fresh.state_dict()
    model.load_state_dict({k: (own[k] if v.is_meta else v) for k, v in model.state_dict().items()}, assign=True)


def load_vae(path: str | Path, cfg=None, device="cpu"):
    """The Wan2.1 VAE from Wan2.1_VAE.pth (or a safetensors file) for the architecture `cfg`."""
    from models.wan_vae import VAEConfig, WanVAE
    sd = read_state_dict(path)
    vae = WanVAE(cfg or VAEConfig())            # not on meta: the latent statistics are buffers
    load_into(vae, sd, what=f"VAE checkpoint {Path(path).name}")
    return vae.to(device).eval()


def save_taehv(path: str | Path, model: nn.Module | dict, config, extra: dict | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """An autoencoder trained here: TAEHV weights (in `dtype`, e.g. bf16 to ship) with its TAEHVConfig
    (widths, frame layout, latent statistics) in the metadata."""
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return save_safetensors(path, sd, {"format": "vidu-taehv", "config": config.to_dict(), **(extra or {})})


def load_taehv(path: str | Path, device="cpu"):
    """TAEHV from taew2_1.pth (fp16 weights) or from an autoencoder trained here (`save_taehv`, its
    own config); run in float32."""
    from models.taehv import TAEHV, TAEHVConfig
    meta = read_metadata(path)
    cfg = TAEHVConfig.from_dict(meta["config"]) if meta.get("format") == "vidu-taehv" else TAEHVConfig()
    sd = {k: v.float() for k, v in read_state_dict(path).items()}
    tae = TAEHV(cfg)
    load_into(tae, sd, what=f"TAEHV checkpoint {Path(path).name}")
    return tae.to(device).eval()
