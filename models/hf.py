"""transformers models from local folders (nothing is ever downloaded), shared by the stages that
take one: a model folder check with one-line errors, a vision-language model asked about video
frames, and the JSON object in a model's answer.

A folder is what `save_pretrained` writes (config.json + weights + processor files). `what` in the
messages is the option that named the folder (e.g. "--vlm"), so the user sees which one is wrong.
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

T = TypeVar("T")


def model_dir(path: str | Path, what: str) -> Path:
    """The folder, or FileNotFoundError / ValueError with a one-line message."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} {p}: no such file or directory (models are never downloaded)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{what} {p} is not a transformers model directory (no config.json)")
    return p


def check_model(path: str | Path, what: str) -> Path:
    """A model folder whose config transformers can read (cheap: the weights load later)."""
    from transformers import AutoConfig

    p = model_dir(path, what)
    load(what, p, lambda: AutoConfig.from_pretrained(str(p), local_files_only=True))
    return p.resolve()


def load(what: str, path: Path, loader: Callable[[], T]) -> T:
    """Run a transformers loader; its errors become one line naming the option and folder."""
    quiet()
    try:
        return loader()
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load {what} from {path}: {msg}") from None


def quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class VisionLanguageModel:
    """AutoModelForImageTextToText + AutoProcessor (Qwen2.5-VL, LLaVA, ...) from a local folder,
    asked one question about a few frames; greedy decoding, so the answer is reproducible."""

    def __init__(self, path: str | Path, what: str, max_new_tokens: int = 256):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.path = model_dir(path, what)
        self.processor = load(what, self.path, lambda: AutoProcessor.from_pretrained(str(self.path), local_files_only=True))
        self.model = load(what, self.path, lambda: AutoModelForImageTextToText.from_pretrained(
            str(self.path), local_files_only=True).eval())
        self.name = f"{self.model.config.model_type}({self.path.name})"
        self.max_new_tokens = max_new_tokens
        self._accepts = set(inspect.signature(self.model.forward).parameters)

    def __call__(self, frames: np.ndarray, prompt: str) -> str:
        import torch
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        messages = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=images, return_tensors="pt")
        inputs = {k: v for k, v in inputs.items() if k in self._accepts}  # e.g. a tokenizer's token_type_ids
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def first_json_object(text: str) -> dict | None:
    """The first JSON object in a model's answer (code fences and surrounding prose allowed), with
    lower-cased keys; None when there is none."""
    text = re.sub(r"```(?:json)?", "", text)
    for m in re.finditer(r"\{", text):
        depth = 0
        for j in range(m.start(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                try:
                    obj = json.loads(text[m.start():j + 1])
                except json.JSONDecodeError:
                    break
                if isinstance(obj, dict):
                    return {str(k).strip().lower(): v for k, v in obj.items()}
                break
    return None


def as_label(v) -> str | None:
    """A model's value as a short string: lists comma-joined, dicts as JSON, empty -> None."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        v = ", ".join(str(x) for x in v)
    elif isinstance(v, dict):
        v = json.dumps(v, sort_keys=True)
    s = str(v).strip()
    return s or None
