"""The training-sample shard format: what `vidu embed` writes and `vidu train` reads.

A shard is a safetensors file <clip id>.NNN.safetensors holding several samples of one clip under
keys "<clip id>_sNNN/{video,ref,audio,wave}" and the clip's text features under "text"; a samples
manifest row points at its shard and key prefix. Shards are written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch


def to_video(frames: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [1, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0


def shard_name(clip_id: str, index: int) -> str:
    """The file name of a clip's shard `index` (ids may hold any character: unsafe ones become _ plus a hash)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", clip_id)
    if safe != clip_id:
        safe += "-" + hashlib.blake2b(clip_id.encode(), digest_size=4).hexdigest()
    return f"{safe}.{index:03d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Atomic: a uniquely named temp file in the same folder, renamed over the target."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={k: json.dumps(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_sample(row: dict) -> dict[str, torch.Tensor]:
    """The tensors of one samples-manifest row: video, ref (latent kinds), audio, wave, text."""
    from safetensors import safe_open
    path = Path(row["shard"])
    if not path.is_file():
        raise FileNotFoundError(f"shard of sample {row['id']} not found: {path}")
    p = row["key_prefix"]
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        names = {"video": f"{p}/video", "ref": f"{p}/ref", "audio": f"{p}/audio", "wave": f"{p}/wave",
                 "text": "text"}
        return {name: f.get_tensor(key) for name, key in names.items() if key in keys}
