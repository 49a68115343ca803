"""Wan2.1 VAE: parity with the reference fixture, the full-size layout, streaming decode, API edges."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from models.wan_vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WAN21_VAE, VAEConfig, WanVAE

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
FIXTURE = REFERENCE / "wan_vae_tiny_parity.safetensors"
LAYOUT = REFERENCE / "wan2.1_vae_state_dict.json"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(),
                                     reason="../shared/reference (Wan2.1 VAE fixtures) is not present")

# the fixture's architecture, with random weights and no latent statistics
TINY = VAEConfig(dim=16, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latent_mean=None, latent_std=None)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def fixture():
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
    return json.loads(meta["config"]), load_file(str(FIXTURE))


@pytest.fixture(scope="module")
def random_vae() -> WanVAE:
    torch.manual_seed(0)
    vae = WanVAE(TINY, latent_mean=torch.randn(4) * 0.5, latent_std=torch.rand(4) + 0.5)
    with torch.no_grad():  # default init zeroes attention's proj and sets gamma to 1: exercise both
        for name, p in vae.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.2)
            elif name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return vae.eval()


@needs_reference
@torch.no_grad()
def test_parity_with_reference_fixture(fixture):
    config, sd = fixture
    cfg = VAEConfig.from_dict(config)
    assert (cfg.dim, cfg.z_dim, cfg.dim_mult, cfg.temporal_downsample) == (16, 4, (1, 2, 2, 2), (False, True, True))
    vae = WanVAE(cfg).eval()
    weights = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
    result = vae.load_state_dict(weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    scale = (sd["input.mean"], 1.0 / sd["input.std"])

    mu = vae.encode(sd["input.video"], scale)
    assert mu.shape == sd["output.mu"].shape == (1, 4, 3, 4, 4)
    assert rel_err(mu, sd["output.mu"]) < 1e-4
    decoded = vae.decode(sd["output.mu"], scale)
    assert decoded.shape == sd["output.decoded"].shape == (1, 3, 9, 32, 32)
    assert rel_err(decoded, sd["output.decoded"]) < 1e-4

    # the same statistics given to the constructor instead of per call
    own = WanVAE(cfg, latent_mean=sd["input.mean"], latent_std=sd["input.std"]).eval()
    own.load_state_dict(weights, strict=True)
    assert torch.equal(own.encode(sd["input.video"]), mu)
    assert torch.equal(own.decode(sd["output.mu"]), decoded)


@needs_reference
def test_full_size_layout_matches_wan21():
    ref = json.loads(LAYOUT.read_text())
    with torch.device("meta"):
        vae = WanVAE()
    layout = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert set(layout) == set(ref["state_dict"]), set(layout) ^ set(ref["state_dict"])
    assert layout == ref["state_dict"]
    assert sum(p.numel() for p in vae.parameters()) == ref["num_params"]
    assert list(WAN21_LATENT_MEAN) == pytest.approx(ref["latent_mean"])
    assert list(WAN21_LATENT_STD) == pytest.approx(ref["latent_std"])
    assert vae.cfg == WAN21_VAE and tuple(vae.latent_mean.shape) == (16,)


@torch.no_grad()
@pytest.mark.parametrize("splits", [(1, 1, 1, 1), (1, 2, 1), (3, 1), (4,)])
def test_stream_decode_equals_whole_decode(random_vae, splits):
    torch.manual_seed(1)
    z = torch.randn(2, 4, sum(splits), 3, 5)
    whole = random_vae.decode(z)
    assert whole.shape == (2, 3, 1 + 4 * (z.shape[2] - 1), 24, 40)
    stream = random_vae.stream_decoder()
    pieces, start = [], 0
    for n in splits:
        out = stream.push(z[:, :, start:start + n])
        assert out.shape[2] == 4 * n - (3 if start == 0 else 0)
        pieces.append(out)
        start += n
    assert rel_err(torch.cat(pieces, 2), whole) < 1e-5
    assert torch.equal(random_vae.decode(z), whole)  # no state left behind between calls


@torch.no_grad()
def test_encode_shapes_and_bad_inputs(random_vae):
    for T in (1, 5, 9):
        mu = random_vae.encode(torch.rand(1, 3, T, 16, 24) * 2 - 1)
        assert mu.shape == (1, 4, 1 + (T - 1) // 4, 2, 3)
    with pytest.raises(ValueError, match=r"T = 1 \+ 4k"):
        random_vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        random_vae.encode(torch.zeros(1, 3, 5, 16, 12))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        random_vae.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match=r"latents must be \[B, 4"):
        random_vae.decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(ValueError, match="no latent mean/std"):
        WanVAE(TINY).encode(torch.zeros(1, 3, 1, 8, 8))


def test_config_roundtrip_and_checks():
    assert VAEConfig.from_dict(dataclasses.asdict(WAN21_VAE)) == WAN21_VAE
    assert VAEConfig.from_dict({"dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                "attn_scales": [], "temperal_downsample": [False, True, True]}) == WAN21_VAE
    assert (WAN21_VAE.spatial_factor, WAN21_VAE.temporal_factor) == (8, 4)
    with pytest.raises(ValueError, match="z_dim is 4"):
        VAEConfig(z_dim=4)
    with pytest.raises(ValueError, match="unknown VAE config fields: bogus"):
        VAEConfig.from_dict({"bogus": 1})
