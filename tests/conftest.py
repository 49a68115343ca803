"""Shared fixtures: ../shared/media when present, generated media with known facts, and helpers
that run the `vidu` app: in this process (`cli`, typer's CliRunner) or as a real process (`vidu`,
for pipes, signals and torchrun)."""
from __future__ import annotations

import os

# Triton kernels run in Triton's interpreter on the CPU (vidu_kernels/_triton.py); set before any kernel module is
# imported, because triton.jit reads it when it decorates. TRITON_INTERPRET=0 tests them on a GPU instead.
os.environ.setdefault("TRITON_INTERPRET", "1")
import subprocess
import sys
import traceback
from contextlib import chdir
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from stages.sense.media import ffmpeg_exe
from stages.synth.media import talking_video, transcode

SHARED_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


@pytest.fixture(scope="session")
def shared_media() -> Path:
    if not SHARED_MEDIA.is_dir():
        pytest.skip("../shared/media is not present")
    return SHARED_MEDIA


@pytest.fixture(scope="session")
def gen_media(tmp_path_factory) -> dict:
    """Small generated files: a talking video with two hard cuts, its re-encode at another size,
    one without audio, a damaged one, a truncated faststart one, an empty file, a text file."""
    d = tmp_path_factory.mktemp("gen")
    rng = np.random.default_rng(7)
    facts = talking_video(d / "talk with cuts.mp4", rng, [4.0, 4.0, 4.0], size=(320, 180))
    transcode(d / "talk with cuts.mp4", d / "talk_small.mp4", 256, 144)
    talking_video(d / "silent.mp4", rng, [4.0], size=(320, 180), with_audio=False)
    data = (d / "talk with cuts.mp4").read_bytes()
    (d / "damaged.mp4").write_bytes(data[: len(data) // 2])  # moov atom is at the end: cut off
    faststart = d.parent / "faststart.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(d / "talk with cuts.mp4"), "-c", "copy", "-movflags",
                    "+faststart", str(faststart)], check=True)
    fs = faststart.read_bytes()
    (d / "truncated.mp4").write_bytes(fs[: len(fs) // 2])
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.txt").write_text("hello\n")
    return {"dir": d, "facts": facts}


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, cwd: Path | None = None, input: str | None = None, check: bool = True,
        env: dict[str, str | None] | None = None) -> CliResult:
    """Run `vidu ARGS` in this process with typer's CliRunner: stdin is `input` (empty and not a
    terminal when None, as with the closed stdin of `vidu`), stdout and stderr are captured apart,
    `env` entries are set (None: unset) for the call only. An uncaught exception is exit code 1
    with its traceback on stderr, as from a real process."""
    from typer.testing import CliRunner

    from vidu_cli.app import app

    with chdir(cwd or Path.cwd()):
        res = CliRunner().invoke(app, list(args), input=input, env=env, catch_exceptions=True)
    stderr = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        stderr += "".join(traceback.format_exception(res.exception))
    if check and res.exit_code != 0:
        raise AssertionError(f"vidu {' '.join(args)} exited {res.exit_code}:\n{stderr[-3000:]}")
    return CliResult(res.exit_code, res.stdout, stderr)


def vidu(*args: str, cwd: Path | None = None, input: str | None = None, check: bool = True,
         timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (stdin closed unless `input` is given)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "vidu_cli", *args], cwd=cwd, input=input, capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"vidu {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """A random Qwen2.5-VL (one vision block, one text layer) saved offline with save_pretrained,
    with the MiniLM tokenizer plus Qwen's vision tokens: the architecture and processor of the real
    model at a size that loads in a second. Its answers are random words."""
    import torch
    from transformers import (AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    from models.encoders import minilm_path

    path = tmp_path_factory.mktemp("vlm") / "qwen2.5-vl-tiny-random"
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": special})
    ids = dict(zip(special, tok.convert_tokens_to_ids(special)))
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(path)
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112), tokenizer=tok,
                        video_processor=Qwen2VLVideoProcessor(), chat_template=template).save_pretrained(path)
    return path


def scramble_stream_models(dit, decoder, seed: int = 1) -> None:
    """Random weights for a streaming test, from a generator of their own: a DiT large enough for the text,
    speech and noise to change the frames (std 0.1) and a decoder whose frames are not flat (fan-in
    scaled weights, biases around 0.5)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5 if p.ndim > 1 else 10)
                    + (0.5 if p.ndim == 1 else 0))


def write_face(path: Path, color: tuple[int, int, int] = (200, 150, 120)) -> Path:
    """The streaming tests' reference image: a 60 x 50 skin-coloured block on black, 100 x 120 pixels."""
    from PIL import Image
    img = np.zeros((120, 100, 3), np.uint8)
    img[30:90, 25:75] = color
    Image.fromarray(img).save(path)
    return path


def write_speech_tone(path: Path, seconds: float, seed: int, sr: int = 16000) -> Path:
    """Speech-like audio: a 180 Hz tone modulated at 3 Hz with faint noise, 16-bit mono wav."""
    import wave
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    x = x + 0.05 * np.random.default_rng(seed).standard_normal(t.size)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


HOPPER_PREAMBLE = """
def ptxas_info(ptx):
    # the bundled ptxas's -v report (registers, spills) of ptx built for sm_90a
    import os, subprocess, tempfile
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        return subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True,
                              text=True, check=True).stderr
    finally:
        os.unlink(f.name)
"""


def compile_for_hopper(script: str) -> str:
    """Run `script` (Python that compiles Triton kernels for sm_90 and runs the bundled ptxas on them with
    HOPPER_PREAMBLE's ptxas_info, printing what it found) in a fresh process without TRITON_INTERPRET, from the repository root; its stdout. Skips where this
    Triton has no bundled ptxas: the kernels' build for the GPU checked on a machine without one."""
    import importlib.util
    ptxas = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton has no bundled ptxas")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", HOPPER_PREAMBLE + script], capture_output=True, text=True, env=env,
                         cwd=root, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def count_launches(monkeypatch, module, names: dict[str, str]) -> list[str]:
    """The launches (kernel[grid](...)) of the Triton kernels `names` ({attribute of `module`: label}), recorded
    in order into the returned list while the test runs."""
    launches: list[str] = []

    class Count:
        def __init__(self, label, kernel):
            self.label, self.kernel = label, kernel

        def __getitem__(self, grid):
            launches.append(self.label)
            return self.kernel[grid]

    for attr, label in names.items():
        monkeypatch.setattr(module, attr, Count(label, getattr(module, attr)))
    return launches
