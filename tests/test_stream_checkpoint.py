"""A checkpoint carries the sampling and streaming settings it was trained with, `vidu stream --ckpt`
uses them with no other flag, and refuses settings the model never saw."""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import checkpoint_config, checkpoint_sampling
from models.config import PRESETS
from models.flow import SHIFT, sigmas, step_at_level
from stages.stream.engine import StreamSettings
from stages.stream.events import StreamError
from stages.train.sample import CAUSAL_STEPS, sampling_record
from stages.train.objectives import ObjectiveSettings
from tests.conftest import vidu

TINY = PRESETS["tiny"]                   # 5 latent frames, chunks of 1
CODEC = {"kind": "taehv", "file": "../codec.safetensors", "channels": 16}    # and the file's sha256


TRAIN_SHIFT = ObjectiveSettings().shift    # what `vidu train` records (2: benchmarks/noise_schedule.py)


def trained_tiny(noisy_level=0.5, cf=1, codec=CODEC, shift=SHIFT) -> dict:
    return sampling_record(TINY.replace(chunk_frames=cf), "causal", shift, cf, noisy_level, codec)


def test_the_record_holds_what_training_saw():
    rec = trained_tiny()
    # ref + sink + window + chunk = 1 + 1 + 3 + 1 = the 1 + 5 positions of a training clip
    assert rec == {"stage": "causal", "shift": SHIFT, "steps": CAUSAL_STEPS, "chunk_frames": 1, "window": 3,
                   "sink": True, "twin": True, "noisy_step": 14, "noisy_level": 0.5, "codec": CODEC,
                   "sampler": "renoise", "guidance": 3.0, "guide": "text"}
    assert sigmas(CAUSAL_STEPS)[14] <= 0.5 < sigmas(CAUSAL_STEPS)[13]     # the first step at most tau_max
    assert trained_tiny(noisy_level=None)["twin"] is False             # teacher forcing only: clean history
    two = trained_tiny(cf=2)                                           # 5 frames: no room for a sink of 2
    assert (two["chunk_frames"], two["sink"], two["window"]) == (2, False, 2)


def test_resolve_uses_the_record_and_refuses_what_training_never_saw():
    rec = trained_tiny()
    assert StreamSettings.resolve(TINY, rec) == StreamSettings(chunk_frames=1, steps=16, shift=SHIFT, window=3,
                                                               sink=True, twin=True, noisy_step=14, sampler="renoise",
                                                               guidance=3.0, guide="text")
    old = {k: v for k, v in rec.items() if k not in ("sampler", "guidance")}      # recorded before them
    assert (StreamSettings.resolve(TINY, old).sampler, StreamSettings.resolve(TINY, old).guidance) == ("renoise", 1.0)
    assert StreamSettings.resolve(TINY, old, sampler="euler", guidance=3.0, recache=True).guidance == 3.0
    assert StreamSettings.resolve(TINY, rec, window=2, twin=None).window == 2          # less history: seen
    assert StreamSettings.resolve(TINY, rec, window=4, sink=False).positions == 6     # same span, no sink
    few = StreamSettings.resolve(TINY, rec, steps=3)           # sigmas 1, .909, .714: none within 0.5
    assert (few.steps, few.twin, few.noisy_step) == (3, False, 0)
    for given, message in [(dict(chunk_frames=2), "trained with chunks of 1 latent frames"),
                           (dict(window=4), "span 7 latent frames, training saw 6"),
                           (dict(steps=3, twin=True), "noisy cache at noise 1.000"),
                           (dict(noisy_step=2), "it saw history noise up to 0.5"),
                           (dict(sampler="heun"), "the sampler is one of: renoise, euler"),
                           (dict(guidance=-1.0), "guidance must be in 0..100")]:
        with pytest.raises(StreamError, match=message):
            StreamSettings.resolve(TINY, rec, **given)
    with pytest.raises(StreamError, match="clean history only"):
        StreamSettings.resolve(TINY, trained_tiny(noisy_level=None), twin=True, noisy_step=14)


def test_without_a_record_the_preset_chunk_size_is_the_default():
    assert StreamSettings.resolve(TINY) == StreamSettings()
    wan = StreamSettings.resolve(PRESETS["wan2.1-1.3b"])
    assert (wan.chunk_frames, wan.window) == (3, 6)            # ModelConfig.chunk_frames, window a multiple
    assert StreamSettings.resolve(TINY, None, chunk_frames=2, window=8).chunk_frames == 2


@pytest.fixture(scope="module")
def causal_ckpt(tmp_path_factory) -> Path:
    from stages.train.loop import TrainSettings, train
    out = tmp_path_factory.mktemp("causal")
    train(TrainSettings(stage="causal", preset="tiny", steps=2, batch=2, samples=4, save_every=2, warmup=1,
                        objective=ObjectiveSettings(p_teacher_forcing=0.5, tau_max=0.5)), out)
    return out / "step-000002" / "ema.safetensors"


def test_training_writes_the_record(causal_ckpt):
    import hashlib
    codec_file = (causal_ckpt.parent / CODEC["file"]).resolve()
    assert codec_file.is_file()                           # no --codec: a quick one trained first
    codec = {**CODEC, "sha256": hashlib.sha256(codec_file.read_bytes()).hexdigest()[:16]}
    assert checkpoint_sampling(causal_ckpt) == trained_tiny(codec=codec, shift=TRAIN_SHIFT)
    assert checkpoint_sampling(causal_ckpt.with_name("model.safetensors")) == trained_tiny(codec=codec, shift=TRAIN_SHIFT)
    assert checkpoint_config(causal_ckpt).chunk_frames == 1


def test_stream_with_no_flags_uses_the_checkpoint_settings(causal_ckpt, tmp_path):
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 20:44] = (200, 150, 120)
    Image.fromarray(img).save(tmp_path / "face.png")
    res = vidu("stream", "--image", str(tmp_path / "face.png"), "--ckpt", str(causal_ckpt), "--out",
               str(tmp_path / "o.mp4"), "--seconds", "0.3", "--summary", str(tmp_path / "s.json"))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert step_at_level(0.5, 16, TRAIN_SHIFT) == 11                   # at shift 2, step 11 is at noise <= 0.5
    assert summary["settings"] == {"chunk_frames": 1, "steps": 16, "shift": TRAIN_SHIFT, "window": 3, "sink": True,
                                   "twin": True, "noisy_step": 11, "sampler": "renoise", "guidance": 3.0,
                                   "guide": "text", "recache": False}
    assert "random weights" not in res.stderr             # its weights, and the autoencoder it was trained with
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert sum(1 for _ in c.decode(c.streams.video[0])) == summary["frames"] == 9

    # the same checkpoint as shards and their index (what the recipe ships from a GPU run), in a folder beside
    # the step's: `--ckpt` names the folder, and the record, the weights and the codec beside it are the same
    sharded = shard(causal_ckpt, causal_ckpt.parent.parent / "sharded")
    vidu("stream", "--image", str(tmp_path / "face.png"), "--ckpt", str(sharded.parent), "--out",
         str(tmp_path / "o2.mp4"), "--seconds", "0.3", "--summary", str(tmp_path / "s2.json"))
    assert json.loads((tmp_path / "s2.json").read_text())["settings"] == summary["settings"]
    assert np.array_equal(frames(tmp_path / "o2.mp4"), frames(tmp_path / "o.mp4"))

    for flags, message in [(["--chunk-frames", "2"], "trained with chunks of 1 latent frames"),
                           (["--window", "8"], "training saw 6 (window <= 3)"),
                           (["--decoder-weights", str(tmp_path / "face.png")], "trained with its own autoencoder")]:
        bad = vidu("stream", "--image", str(tmp_path / "face.png"), "--ckpt", str(causal_ckpt), "--out",
                   str(tmp_path / "bad.mp4"), *flags, check=False)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
        lines = [ln for ln in bad.stderr.strip().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], bad.stderr[-2000:]
        assert not (tmp_path / "bad.mp4").exists()


def shard(ckpt: Path, dest: Path) -> Path:
    """`ckpt` as two safetensors shards in `dest`, each with the file's metadata, and their index."""
    from models.checkpoint import read_metadata, read_state_dict, save_safetensors
    sd, meta = read_state_dict(ckpt), read_metadata(ckpt)
    keys = sorted(sd)
    halves = {"ema-00001-of-00002.safetensors": keys[: len(keys) // 2], "ema-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_safetensors(dest / name, {k: sd[k] for k in part}, meta)
    index = dest / "ema.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: name for name, part in halves.items() for k in part}}))
    return index


def frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def test_a_sharded_checkpoint_reads_as_its_file(causal_ckpt, tmp_path):
    """The index (or its folder) gives the file's metadata, config and record, and the codec beside the
    shards; an index naming a missing shard, or one that is not an index, is one line."""
    from models.checkpoint import CheckpointError, checkpoint_file, load_dit, read_metadata
    from stages.train.data import teacher_codec
    index = shard(causal_ckpt, causal_ckpt.parent.parent / "sharded-read")
    for path in (index, index.parent):
        assert read_metadata(path) == read_metadata(causal_ckpt)
        assert checkpoint_sampling(path) == checkpoint_sampling(causal_ckpt) is not None
        assert checkpoint_config(path) == checkpoint_config(causal_ckpt)
        assert teacher_codec(str(path)).resolve() == teacher_codec(str(causal_ckpt)).resolve()
    assert checkpoint_file(index.parent) == index
    a, b = load_dit(index)[0].state_dict(), load_dit(causal_ckpt)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ema.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    (tmp_path / "bad.safetensors.index.json").write_text("[1, 2]")
    for path, message in [(broken, "shard gone.safetensors named by ema.safetensors.index.json is missing"),
                          (tmp_path / "bad.safetensors.index.json", "cannot read the shards' index")]:
        with pytest.raises(CheckpointError, match=message) as e:
            read_metadata(path)
        assert "\n" not in str(e.value)


def test_a_checkpoint_of_the_pca_codec_is_refused_in_one_line():
    from stages.stream.decoders import load_codec
    with pytest.raises(StreamError, match="PCA-codec latents, which vidu no longer decodes") as e:
        load_codec("old/step-000300/ema.safetensors", {"codec": {"kind": "pca", "file": "../codec.safetensors"}}, None)
    assert "\n" not in str(e.value)
