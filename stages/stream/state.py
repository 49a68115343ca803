"""A stream's state in one file: `vidu stream --save-state FILE` writes it, `--resume FILE` continues it.

    ident = identity(parts, "face.png")               # what a state is valid with
    write_state("s.state", state, ident)              # state: Session.suspend(), at a stream's end
    state, saved = read_state("s.state")              # missing or corrupt: StreamError
    check_identity(saved, ident, "s.state")           # another model, image, size or settings: StreamError
    run_session(parts, events, sinks, opts, resume=state)

The state (Session.suspend) is a flat dict of tensors and JSON values: the engine's caches, ring
bookkeeping, kept chunks and noise generator, the decoder's memory, the speech-feature context, the
audio offset, the chunk and frame counts and the instructions. It is one safetensors file: tensors as
tensors, the rest and the identity as JSON in the header (models.checkpoint.save_safetensors, the
checkpoints' format: nothing is unpickled on load, and it is written to a temp name and renamed, so a
stream stopped mid-write leaves the previous state whole).

The identity is sha256 digests of the model's and the decoder's weights (as they run: random weights
of a preset are told apart by their seed, a file by its content, wherever it lies) and of the
reference image file, the frame size, the dtype and the stream settings. Hashing the weights reads
them once (about a second per GB); it happens only with --save-state or --resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from stages.stream.events import StreamError

FORMAT = "vidu stream state 2"      # 2: cached keys rotated at absolute positions, the ref and sink also before RoPE
META_KEY = "vidu_stream_state"


def identity(parts, image: str | Path) -> dict:
    """What a state of a stream of `parts` (stages.stream.session.Parts) from `image` is only valid with."""
    eng = parts.engine
    return {"image": hashlib.sha256(Path(image).read_bytes()).hexdigest(),
            "size": [parts.cfg.width, parts.cfg.height], "model": weights_digest(eng.model),
            "decoder": weights_digest(parts.decoder), "dtype": str(eng.dtype).removeprefix("torch."),
            "settings": dataclasses.asdict(eng.st), "fast_path": fast_path_flags(eng.model),
            "voice": None if eng.voice is None else int(eng.voice[0])}


def fast_path_flags(model) -> dict:
    """The fast path's options that change the frames (DiT.kernel_settings, as vidu stream's flags)."""
    got = model.kernel_settings()
    return {"kernels": "--kernels" if got["on"] else "--no-kernels", "attention": got["attention"]}


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def write_state(path: str | Path, state: dict, ident: dict) -> Path:
    from models.checkpoint import save_safetensors
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return save_safetensors(path, tensors, {META_KEY: {"format": FORMAT, "identity": ident, "values": values}})


def read_state(path: str | Path) -> tuple[dict, dict]:
    """(state, identity) from a --save-state file (tensors on the CPU); StreamError (one line) when it
    is missing, unreadable or not a stream state."""
    from safetensors import safe_open

    def fail(why: str) -> StreamError:
        return StreamError(f"cannot resume from {path}: {why}")

    path = Path(path)
    if not path.is_file():
        raise fail("no such file" if not path.exists() else "it is not a file")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        saved = json.loads(raw) if raw is not None else None
    except Exception as e:  # noqa: BLE001  -- safetensors and json raise several kinds for a damaged file
        raise fail(f"it is damaged or not a safetensors file ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(saved, dict) or not str(saved.get("format", "")).startswith(FORMAT.rsplit(" ", 1)[0]):
        raise fail("it is not a state written by vidu stream --save-state")
    if saved["format"] != FORMAT:
        raise fail(f"it was written by another version of vidu stream ({saved['format']!r}; this one reads {FORMAT!r})")
    return {**saved["values"], **tensors}, saved["identity"]


def check_identity(saved: dict, ours: dict, path: str | Path) -> None:
    """StreamError naming the first thing in which the stream the state was saved from differs from this one."""
    def fail(why: str) -> StreamError:
        return StreamError(f"cannot resume from {path}: {why}")

    if saved["image"] != ours["image"]:
        raise fail("it was saved from another --image")
    if saved["size"] != ours["size"]:
        raise fail(f"it was saved at {'x'.join(map(str, saved['size']))}, this stream is "
                   f"{'x'.join(map(str, ours['size']))}")
    if saved["model"] != ours["model"]:
        raise fail("it was saved from another model (another --ckpt, or --preset weights of another --seed)")
    if saved["decoder"] != ours["decoder"]:
        raise fail("it was saved with another decoder (--decoder-weights)")
    if saved["dtype"] != ours["dtype"]:
        raise fail(f"it was saved in {saved['dtype']}, this stream runs in {ours['dtype']} (--device)")
    saved_path = saved.get("fast_path")            # (absent from the states of versions before it was recorded)
    if saved_path is not None and saved_path["kernels"] != ours["fast_path"]["kernels"]:
        raise fail(f"it was saved with {saved_path['kernels']}, this stream has {ours['fast_path']['kernels']}")
    if saved_path is not None and saved_path["attention"] != ours["fast_path"]["attention"]:
        raise fail(f"it was saved with --attention {saved_path['attention']}, this stream has "
                   f"--attention {ours['fast_path']['attention']}")
    if saved.get("voice") != ours.get("voice"):    # a model with character voices: the one its reference speaks in
        raise fail(f"it was saved speaking in voice {saved.get('voice')}, this stream speaks in {ours.get('voice')} (--voice)")
    for name, value in ours["settings"].items():
        if saved["settings"].get(name) != value:
            raise fail(f"it was saved with {name.replace('_', '-')} {saved['settings'].get(name)}, "
                       f"this stream has {value}")
