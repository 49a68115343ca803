"""Loading the files users bring: the Wan VAE .pth and taew2_1.pth (as the reference fixtures'
weights written in those formats), and the local-path encoders (umT5, wav2vec2) on tiny models
saved by transformers itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, load_taehv, load_vae

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def fixture(name: str):
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference is not present")
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = REFERENCE / name
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return meta, load_file(str(path))


def model_part(sd: dict) -> dict:
    return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_wan_vae_pth_loads_and_matches(tmp_path):
    from models.wan_vae import VAEConfig
    meta, sd = fixture("wan_vae_tiny_parity.safetensors")
    torch.save(model_part(sd), tmp_path / "Wan2.1_VAE.pth")
    cfg = VAEConfig.from_dict({**json.loads(meta["config"]), "latent_mean": sd["input.mean"].tolist(),
                               "latent_std": sd["input.std"].tolist()})
    vae = load_vae(tmp_path / "Wan2.1_VAE.pth", cfg)
    with torch.no_grad():
        assert rel(vae.encode(sd["input.video"]), sd["output.mu"]) < 1e-4
    with pytest.raises(CheckpointError, match="VAE checkpoint .* does not fit"):
        load_vae(tmp_path / "Wan2.1_VAE.pth")                    # the full-size architecture


def test_taew2_1_pth_loads_and_matches(tmp_path):
    _, sd = fixture("taehv_tiny_parity.safetensors")
    torch.save(model_part(sd), tmp_path / "taew2_1.pth")         # fp16, as distributed
    tae = load_taehv(tmp_path / "taew2_1.pth")
    with torch.no_grad():
        assert rel(tae.decode_video(sd["input.latents"]), sd["output.decoded"]) < 1e-4


def test_umt5_encoder_from_a_local_directory(tmp_path):
    from transformers import UMT5Config, UMT5EncoderModel
    from models.encoders import TextEncoder, minilm_path
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                     relative_attention_num_buckets=8)
    UMT5EncoderModel(cfg).save_pretrained(tmp_path / "umt5")
    tok.save_pretrained(tmp_path / "umt5")
    enc = TextEncoder("umt5", tmp_path / "umt5", max_len=8)
    assert enc.dim == 32
    feats = enc(["make a heart", "blink"])
    assert feats.shape == (2, 5, 32)                              # [CLS] make a heart [SEP]
    assert torch.all(feats[1, 3:] == 0) and torch.all(feats[1, :3].abs().sum(-1) > 0)


def test_wav2vec2_features_from_a_local_directory(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model
    from models.audio import Wav2Vec2Features, audio_features
    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2)
    Wav2Vec2Model(cfg).save_pretrained(tmp_path / "w2v")
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(tmp_path / "w2v")
    enc = Wav2Vec2Features(tmp_path / "w2v")
    wave = torch.randn(int(0.68 * 16000)) * 0.1
    feats = audio_features(wave, 5, encoder=enc)
    assert feats.shape == (5, 16, 32) and enc.dim == 32
    assert torch.all(feats[0, :12] == 0) and feats[1:].abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="wav2vec2 model directory not found"):
        Wav2Vec2Features(tmp_path / "missing")
