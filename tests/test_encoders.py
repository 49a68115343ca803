"""Condition encoders and the audio latent: alignment to latent frames, the way back to a waveform,
the offline text encoder, the reference image, and `vidu model info`."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models.audio import (AudioStream, audio_features, audio_latent, latent_frames_for, latent_to_logmel,
                          lookahead_ms, to_waveform)
from models.config import PRESETS, AudioConfig
from tests.conftest import cli

A = AudioConfig()


def tone_burst(seconds: float, start: float, stop: float, hz: float = 440.0) -> torch.Tensor:
    n = int(seconds * A.sample_rate)
    t = torch.arange(n) / A.sample_rate
    wave = 0.5 * torch.sin(2 * math.pi * hz * t)
    wave[(t < start) | (t >= stop)] = 0
    return wave


def test_audio_timeline_matches_latent_frames():
    assert (A.hop, A.mel_per_latent, A.samples_per_latent) == (160, 16, 2560)
    # 17 video frames at 25 fps = 0.68 s -> 5 latent frames (1 + 4k)
    assert latent_frames_for(int(0.68 * A.sample_rate)) == 5
    # sound only during video frames 5..8 (0.2 s .. 0.36 s) = latent frame 2 (frames 5..8)
    wave = tone_burst(0.68, 0.2, 0.36)
    feats = audio_features(wave, 5)
    assert feats.shape == (5, 16, A.n_mels)
    energy = feats.amax(dim=2).mean(dim=1)             # loudest mel bin, averaged over the window
    assert int(energy.argmax()) == 2
    silence = float(feats[0, :12].mean())               # latent 0's lead-in is padding
    assert torch.allclose(feats[0, :12], torch.full_like(feats[0, :12], silence))
    assert float(energy[2]) > float(energy[1]) + 1.0 and float(energy[2]) > float(energy[3]) + 1.0


def test_audio_latent_round_trip_keeps_the_envelope():
    wave = tone_burst(0.68, 0.2, 0.5)
    lat = audio_latent(wave, 5, tokens=PRESETS["tiny"].dit.audio_latent_tokens)
    assert lat.shape == (5, 2, PRESETS["tiny"].dit.audio_latent_dim)
    mel = latent_to_logmel(lat)
    from torchaudio.transforms import MelSpectrogram      # the oracle: steps centred on j * hop, zeros outside
    ref = MelSpectrogram(A.sample_rate, n_fft=A.n_fft, win_length=A.win_length, hop_length=A.hop, n_mels=A.n_mels,
                         center=True, pad_mode="constant")(wave).clamp_min(1e-5).log().T
    assert torch.allclose(mel, ref[: mel.shape[0]], atol=1e-4)
    back = to_waveform(lat, n_iter=8)
    assert back.shape[0] >= wave.shape[0] - A.hop
    rms = lambda w, a, b: float(w[int(a * A.sample_rate): int(b * A.sample_rate)].square().mean().sqrt())
    assert rms(back, 0.25, 0.45) > 20 * rms(back, 0.55, 0.65)   # loud where the tone was, quiet after
    spec = np.abs(np.fft.rfft(back[int(0.25 * A.sample_rate): int(0.45 * A.sample_rate)].numpy()))
    peak_hz = spec.argmax() * A.sample_rate / (0.2 * A.sample_rate)
    assert abs(peak_hz - 440) < 70                               # about one mel band at 440 Hz


def test_features_reject_multichannel():
    with pytest.raises(ValueError, match="mono"):
        audio_features(torch.zeros(2, 100), 1)


def test_speech_context_frames_and_lookahead():
    """With context (before, after), F frames get before + F + after rows: silence before the clip,
    the clip's own continuation after; the lookahead is `after` latent frames + half a window."""
    wave = tone_burst(1.0, 0.0, 1.0)
    plain, ctx = audio_features(wave, 5), audio_features(wave, 5, context=(2, 1))
    assert ctx.shape == (8, 16, A.n_mels)
    assert torch.equal(ctx[2:7], plain)                       # same framing, shifted by `before`
    silence = (math.log(1e-5) + 4.0) / 4.0
    assert torch.allclose(ctx[:2], torch.full_like(ctx[:2], silence), atol=1e-6, rtol=0)
    assert float(ctx[7].amax()) > silence + 1.0               # frame 5 of the tone: heard as lookahead
    assert lookahead_ms(A, (2, 1)) == 166.0                   # 160 ms + (256 - 160) samples


@pytest.mark.parametrize("chunk", [1, 3])
def test_streaming_features_equal_training_features_exactly(chunk):
    """A clip streamed chunk by chunk (the first chunk one video frame short, as `vidu stream` plays it;
    lookahead peeked from what has arrived) gets bit-for-bit the features training computes."""
    g = torch.Generator().manual_seed(3)
    n_latent, context = 1 + 3 * 4, (2, 1)
    wave = 0.1 * torch.randn(n_latent * A.samples_per_latent, generator=g)
    full = audio_features(wave, n_latent, context=context)
    stream, played, got = AudioStream(A, context), 0, []
    vf = A.sample_rate // A.fps
    for k in range(0, n_latent, chunk):
        n = (4 * chunk - (3 if k == 0 else 0)) * vf
        stream.push(wave[played:played + n])
        played += n
        count = chunk + sum(context)
        got.append(stream.features(k, count, wave[played:stream.needed(k, count)])[:chunk + 2][2:])
    assert torch.equal(torch.cat(got)[:n_latent], full[2:2 + n_latent])
    # a negative control: a stream that loses one sample gets different features
    stream = AudioStream(A, context)
    stream.push(wave[1:])
    assert not torch.equal(stream.features(0, 4), full[:4])


def test_minilm_text_encoder_is_offline_and_pads_with_zeros():
    from models.encoders import TextEncoder
    enc = TextEncoder("minilm", max_len=PRESETS["tiny"].dit.text_len)
    assert enc.dim == PRESETS["tiny"].dit.text_dim == 384
    feats = enc(["raise a tennis racket with the right hand", "blink"])
    assert feats.shape[0] == 2 and feats.shape[2] == 384 and feats.shape[1] <= 16
    n_blink = len(enc.tokenizer("blink").input_ids)
    assert torch.all(feats[1, n_blink:] == 0) and torch.all(feats[1, :n_blink].abs().sum(-1) > 0)
    again = enc(["blink"])
    assert torch.allclose(again[0], feats[1, : again.shape[1]], atol=1e-5)
    with pytest.raises(FileNotFoundError, match="local model directory"):
        TextEncoder("umt5")


def test_reference_image_is_cover_scaled_and_cropped(tmp_path):
    from PIL import Image
    from models.encoders import image_tensor
    from stages.sense.image import ImageError, read_image

    def load_image(path, height, width):
        return image_tensor(read_image(path), height, width)
    rgb = np.zeros((100, 300, 3), np.uint8)
    rgb[:, :100] = (255, 0, 0)                          # red left third, black elsewhere
    rgb[:, 100:200] = (0, 255, 0)                       # green middle third
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    img = load_image(tmp_path / "wide.png", 64, 64)
    assert img.shape == (1, 3, 1, 64, 64) and img.min() >= -1 and img.max() <= 1
    centre = img[0, :, 0, 32, 32]
    assert centre[1] > 0.9 and centre[0] < -0.9          # the centre crop is the green third
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path / "notes.png", 64, 64)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png", 64, 64)


def test_reference_latent_through_the_vae():
    from models.encoders import encode_reference, image_tensor
    from models.wan_vae import WanVAE
    cfg = PRESETS["tiny"]
    vae = WanVAE(cfg.vae).eval()
    img = image_tensor(np.full((80, 80, 3), 128, np.uint8), cfg.height, cfg.width)
    z = encode_reference(vae, img)
    assert z.shape == (1, cfg.dit.in_dim, 1, cfg.height // 8, cfg.width // 8)


def test_model_info_cli(tmp_path):
    from models.checkpoint import save_model
    from models.dit import DiT
    cfg = PRESETS["tiny"]
    path = save_model(tmp_path / "tiny.safetensors", DiT(cfg.dit), cfg,
                      lineage=[{"stage": "bidirectional", "steps": 3}])
    out = json.loads(cli("model", "info", str(path), "--preset", "tiny", "--json").stdout)
    assert out["format"] == "vidu safetensors" and out["kind"] == "dit"
    assert out["parameters"] == sum(p.numel() for p in DiT(cfg.dit).parameters())
    assert out["architecture"]["dim"] == 64 and out["fits_preset"] == "yes (tiny)"
    assert out["conditioning"]["joint_audio"].startswith("2 tokens")
    assert out["lineage"] == [{"stage": "bidirectional", "steps": 3}]
    table = cli("model", "info", str(path), "--preset", "small").stdout
    assert "lineage[0]" in table and "no: shape mismatch" in table
    from models.checkpoint import read_metadata, read_state_dict, save_safetensors
    sd, keys = read_state_dict(path), sorted(read_state_dict(path))        # the same as two shards + index, named by folder
    for name, part in (("a.safetensors", keys[:9]), ("b.safetensors", keys[9:])):
        save_safetensors(tmp_path / "sh" / name, {k: sd[k] for k in part}, read_metadata(path))
    (tmp_path / "sh" / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "a.safetensors" if i < 9 else "b.safetensors" for i, k in enumerate(keys)}}))
    sharded = json.loads(cli("model", "info", str(tmp_path / "sh"), "--json").stdout)
    assert sharded["format"] == "vidu safetensors (sharded)" and sharded["path"].endswith("m.safetensors.index.json")
    assert {k: sharded[k] for k in ("parameters", "lineage", "architecture")} == {k: out[k] for k in ("parameters", "lineage", "architecture")}
    bad = cli("model", "info", str(tmp_path / "nope.pt"), check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: checkpoint not found")
    assert "Traceback" not in bad.stderr
