"""TAEHV: parity with the reference fixture, the full taew2_1 layout, streaming == parallel decode."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models.taehv import TAEHV, TAEHVConfig

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
FIXTURE = REFERENCE / "taehv_tiny_parity.safetensors"
LAYOUT = REFERENCE / "taehv_wan2.1_state_dict.json"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def fixture() -> dict[str, torch.Tensor]:
    if not FIXTURE.is_file():
        pytest.skip(f"reference fixture not present: {FIXTURE}")
    return load_file(str(FIXTURE))


@pytest.fixture(scope="module")
def lively_model() -> TAEHV:
    """Random weights scaled so decoded frames spread over [0, 1] (default init gives ~0 everywhere)."""
    torch.manual_seed(0)
    model = TAEHV().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 4:
                torch.nn.init.normal_(p, std=p[0].numel() ** -0.5)
            else:
                p.zero_()
        model.decoder[-1].bias.fill_(0.5)
    return model


# ---- reference parity ------------------------------------------------------------------------

def test_fixture_call_is_what_we_run(fixture):
    call = safe_open(str(FIXTURE), "pt").metadata()["call"]
    assert "float32" in call and "parallel" in call and "3 frames trimmed" in call


def test_parity_with_reference(fixture):
    model = TAEHV().eval()
    weights = {k.removeprefix("model."): v.float() for k, v in fixture.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        decoded = model.decode_video(fixture["input.latents"])
        encoded = model.encode_video(fixture["input.frames"])
    assert decoded.shape == fixture["output.decoded"].shape == (1, 9, 3, 48, 64)
    assert encoded.shape == fixture["output.encoded"].shape == (1, 2, 16, 6, 8)
    assert rel_err(decoded, fixture["output.decoded"]) < 1e-4
    assert rel_err(encoded, fixture["output.encoded"]) < 1e-4


def test_full_size_layout():
    if not LAYOUT.is_file():
        pytest.skip(f"reference layout not present: {LAYOUT}")
    ref = json.loads(LAYOUT.read_text())
    with torch.device("meta"):
        model = TAEHV()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    cfg = model.config
    assert (cfg.t_downscale, cfg.t_upscale, cfg.frames_to_trim) == (ref["t_downscale"], ref["t_upscale"],
                                                                    ref["frames_to_trim"])


# ---- streaming -------------------------------------------------------------------------------

def _stream(model: TAEHV, latents: torch.Tensor, chunks: list[int]) -> list[torch.Tensor]:
    stream = model.stream_decoder()
    starts = [sum(chunks[:i]) for i in range(len(chunks))]
    return [stream.push(latents[:, s:s + n]) for s, n in zip(starts, chunks)]


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1], [1, 2, 2], [2, 3], [5]])
def test_stream_equals_parallel(lively_model, chunks):
    latents = torch.randn(2, 5, 16, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = lively_model.decode_video(latents)
    outs = _stream(lively_model, latents, chunks)
    assert [o.shape[1] for o in outs] == [4 * chunks[0] - 3] + [4 * n for n in chunks[1:]]
    assert rel_err(torch.cat(outs, 1), whole) < 1e-5


def test_stream_carries_history(lively_model):
    # a stream reset between pushes forgets latent 0 and decodes latent 1 differently: the equality above is not vacuous
    latents = torch.randn(1, 2, 16, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = lively_model.decode_video(latents)
    stream = lively_model.stream_decoder()
    stream.push(latents[:, :1])
    stream.reset()
    restarted = stream.push(latents[:, 1:2])
    assert restarted.shape[1] == 1  # the start-up trim applies again
    assert rel_err(restarted, whole[:, -1:]) > 1e-2


def test_stream_matches_fixture(fixture):
    model = TAEHV().eval()
    model.load_state_dict({k.removeprefix("model."): v.float() for k, v in fixture.items() if k.startswith("model.")})
    outs = _stream(model, fixture["input.latents"], [1, 2])
    assert [o.shape[1] for o in outs] == [1, 8]
    assert rel_err(torch.cat(outs, 1), fixture["output.decoded"]) < 1e-4


# ---- API edge --------------------------------------------------------------------------------

@pytest.mark.parametrize("call, shape", [
    ("decode_video", (1, 2, 4, 4, 6)),
    ("decode_video", (2, 16, 4, 6)),
    ("encode_video", (1, 4, 4, 32, 32)),
    ("encode_video", (4, 3, 32, 32)),
    ("push", (1, 2, 3, 4, 6)),
])
def test_bad_shapes_raise(call, shape):
    model = TAEHV()
    fn = model.stream_decoder().push if call == "push" else getattr(model, call)
    with pytest.raises(ValueError, match=rf"^{call} expects .*got shape") as e:
        fn(torch.zeros(shape))
    assert "\n" not in str(e.value)


def test_stream_rejects_changed_size():
    stream = TAEHV().stream_decoder()
    stream.push(torch.zeros(1, 1, 16, 4, 6))
    with pytest.raises(ValueError, match="call reset"):
        stream.push(torch.zeros(1, 1, 16, 4, 8))


def test_encode_pads_to_whole_latents():
    model = TAEHV(TAEHVConfig())
    frames = torch.rand(1, 5, 3, 16, 16)
    with torch.no_grad():
        padded = model.encode_video(torch.cat([frames, frames[:, -1:].expand(-1, 3, -1, -1, -1)], 1))
        assert torch.equal(model.encode_video(frames), padded)
    assert padded.shape == (1, 2, 16, 2, 2)


def test_frames_and_latents_convert_in_the_dits_layout():
    """frames_to_latents: uint8 [T, H, W, 3] -> [C, F, h, w]; latents_to_frames: [B, C, F, h, w] -> uint8
    [B, 4F - 3, H, W, 3], each the codec's encode / decode with only layout and scaling around it."""
    import numpy as np
    from models.taehv import frames_to_latents, latents_to_frames
    torch.manual_seed(0)
    tae = TAEHV(TAEHVConfig(encoder_width=8, decoder_widths=(8, 8, 8, 8), pad_start=True)).eval()
    frames = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    z = frames_to_latents(tae, frames)
    with torch.no_grad():
        want_z = tae.encode_video(torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float() / 255)[0]
        torch.testing.assert_close(z, want_z.permute(1, 0, 2, 3))
        out = latents_to_frames(tae, torch.stack([z, 2 * z]))
        dec = tae.decode_video(torch.stack([z, 2 * z]).permute(0, 2, 1, 3, 4))
    assert out.shape == (2, 9, 32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out, (dec.permute(0, 1, 3, 4, 2) * 255 + 0.5).to(torch.uint8).numpy())
    assert not np.array_equal(out[0], out[1])          # each latent its own frames
