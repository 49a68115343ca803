"""`vidu stream` faults end in one clear line (exit 2) before any model loads, or are handled: SIGTERM
finalises the mp4, stdin instructions survive invalid UTF-8, reference images of any common kind
are read as what they show, and the stream's settings come from the checkpoint it was trained with."""
from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from stages.stream.events import MAX_INSTRUCTION_CHARS, EventQueue, Instruction, instruction_text
from stages.sense.image import ImageError, read_image
from stages.stream.io import read_instructions
from tests.conftest import vidu


@pytest.fixture(scope="module")
def face(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("face")
    img = np.zeros((80, 64, 3), np.uint8)
    img[20:60, 16:48] = (200, 150, 120)
    Image.fromarray(img).save(d / "face.png")
    (d / "notes.txt").write_text("not a checkpoint")
    return d / "face.png"


def one_error_line(res: subprocess.CompletedProcess, message: str) -> str:
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and message in lines[0], res.stderr[-2000:]
    return lines[0]


def decoded_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(c.streams.video[0]))


# ---- SIGTERM

def _working_bytes(folder: Path) -> int:
    """Bytes in Mp4Sink's hidden working folder (it grows by ~10 KB of audio per chunk)."""
    return sum(f.stat().st_size for d in folder.iterdir() if d.name.startswith(".") and d.is_dir()
               for f in d.rglob("*") if f.is_file())


def test_sigterm_finalises_the_mp4_like_ctrl_c(face, tmp_path):
    out = tmp_path / "live.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "vidu_cli", "stream", "--preset", "tiny", "--image", str(face), "--out", str(out),
                             "--seconds", "600", "-q", "--summary", str(tmp_path / "s.json")],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _working_bytes(tmp_path) < 40_000 and time.monotonic() < deadline:   # a few chunks written
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)                     # what docker stop and systemd send: this process only
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["reason"] == "terminated" and summary["frames"] > 1
    assert decoded_frames(out) == summary["frames"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.mp4", "s.json"]     # no temporary folder left


# ---- stdin instructions

def test_instruction_text_replaces_invalid_utf8_and_caps_length():
    assert instruction_text(b"\xff\xfe smile \xc3\n") == "\ufffd\ufffd smile \ufffd"
    assert instruction_text("wave \udcff".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")) \
        == "wave \ufffd"                                  # a str that stdin decoded with surrogateescape
    assert instruction_text("  nod  \n") == "nod"
    assert instruction_text("x" * 5000) == "x" * MAX_INSTRUCTION_CHARS
    assert instruction_text("é" * 5000) == "é" * MAX_INSTRUCTION_CHARS        # characters, not bytes


def test_stdin_lines_are_read_as_bytes():
    events = EventQueue()
    read_instructions(io.BytesIO(b"\xff look left\n\n" + b"y" * 1500 + b"\nsmile"), events).join(5)
    assert events.drain() == [Instruction("\ufffd look left"), Instruction("y" * MAX_INSTRUCTION_CHARS),
                              Instruction("smile")]


def test_invalid_utf8_on_stdin_does_not_kill_the_stream(face, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vidu_cli", "stream", "--preset", "tiny", "--image", str(face), "--out",
                           str(tmp_path / "o.mp4"), "--seconds", "0.6", "-q", "--summary", str(tmp_path / "s.json")],
                          input=b"\xff\xfe raise a hand\n" + b"z" * 1200 + b"\n", capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    texts = [t for _, t in summary["instructions"]]
    assert texts[1:] == ["\ufffd\ufffd raise a hand", "z" * MAX_INSTRUCTION_CHARS], texts
    assert summary["reason"] == "duration reached"


# ---- reference images

def _saved(tmp_path, name, im, **kw) -> Path:
    im.save(tmp_path / name, **kw)
    return tmp_path / name


def test_16_bit_png_keeps_its_grey_levels(tmp_path):
    ramp = np.tile(np.array([0, 16384, 32768, 65535], np.uint16), (4, 1))
    rgb = read_image(_saved(tmp_path, "g16.png", Image.fromarray(ramp)))
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 64, 128, 255]          # Pillow's convert("RGB") gave 0, 255, 255, 255
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_palette_exif_rotation_and_alpha(tmp_path):
    pal = Image.new("P", (6, 4))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.paste(1, (0, 0, 3, 4))
    rgb = read_image(_saved(tmp_path, "pal.png", pal))
    assert rgb[0, 0].tolist() == [10, 200, 30] and rgb[0, 5].tolist() == [0, 0, 0]

    wide = np.zeros((10, 20, 3), np.uint8)
    wide[:, :10] = (255, 0, 0)                           # left half red
    exif = Image.Exif()
    exif[0x0112] = 6                                     # Orientation: rotate 90 degrees clockwise to view
    rgb = read_image(_saved(tmp_path, "rot.jpg", Image.fromarray(wide), exif=exif, quality=95))
    assert rgb.shape == (20, 10, 3)                      # shown upright: portrait
    assert rgb[2, 5, 0] > 200 and rgb[17, 5, 0] < 60     # red on top after the rotation
    plain = read_image(_saved(tmp_path, "plain.jpg", Image.fromarray(wide), quality=95))
    assert plain.shape == (10, 20, 3)                    # negative control: no tag, no rotation

    rgba = np.zeros((4, 4, 4), np.uint8)                 # hidden colour black, fully transparent ...
    rgba[:2, :, :] = (0, 0, 255, 255)                    # ... except the top half: opaque blue
    rgb = read_image(_saved(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    assert rgb[0, 0].tolist() == [0, 0, 255] and rgb[3, 3].tolist() == [255, 255, 255]


def test_pixel_limit(tmp_path):
    path = _saved(tmp_path, "big.png", Image.new("L", (300, 200)))
    assert read_image(path, max_pixels=60_000).shape == (200, 300, 3)
    with pytest.raises(ImageError, match=r"is 300x200 \(0 megapixels\), more than the limit"):
        read_image(path, max_pixels=59_999)


# ---- one line, exit 2, before the model loads

def test_decompression_bomb_is_one_line(face, tmp_path):
    Image.new("1", (14000, 14000)).save(tmp_path / "huge.png")
    res = vidu("stream", "--preset", "tiny", "--image", str(tmp_path / "huge.png"), "--out", str(tmp_path / "x.mp4"), check=False)
    one_error_line(res, "is 14000x14000 (196 megapixels), more than the limit")


@pytest.mark.parametrize("args, message", [
    (["--seconds", "0"], "is not greater than 0"),
    (["--seconds", "-5"], "--seconds"),
    (["--out", "{tmp}/o.avi"], "name it .mp4"),
    (["--out", "{tmp}/missing/o.mp4"], "does not exist"),
    (["--summary", "{tmp}/missing/s.json"], "does not exist"),
    (["--device", "cuda"], "no CUDA GPU is visible"),
    (["--device", "tpu"], "--device is auto, cpu, cuda or cuda:N"),
    (["--serve", "127.0.0.1:PORT_IN_USE"], "Address already in use"),
])
def test_bad_outputs_and_options_fail_before_the_model_loads(face, tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    with socket.socket() as busy:                          # a port another program listens on
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        args = [a.format(tmp=tmp_path).replace("PORT_IN_USE", str(busy.getsockname()[1])) for a in args]
        if "--out" not in args and "--serve" not in args:
            args += ["--out", str(tmp_path / "x.mp4")]
        # the checkpoint is unreadable: an error that came after loading would name it instead
        res = vidu("stream", "--image", str(face), "--ckpt", str(face.parent / "notes.txt"), *args, check=False)
    line = one_error_line(res, message)
    assert "checkpoint" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []             # nothing written


def test_the_unreadable_checkpoint_is_named_when_outputs_are_fine(face, tmp_path):
    res = vidu("stream", "--image", str(face), "--ckpt", str(face.parent / "notes.txt"), "--out",
               str(tmp_path / "x.mp4"), check=False)
    one_error_line(res, "cannot read checkpoint")           # the negative control of the test above
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_help_has_an_example():
    res = vidu("stream", "--help")
    assert "Example: vidu stream --image" in res.stdout
