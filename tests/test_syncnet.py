"""SyncNet (`vidu eval --syncnet PATH`): the network's state-dict layout against the official
syncnet_v2.model (joonson/syncnet_python SyncNetModel.py), the offset / Sync-C / Sync-D protocol on
embeddings with a known shift, the face crop rule, and the whole path on a real talking-head clip
with random-init weights (the official weights cannot be downloaded here)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from stages.eval.metrics import EvalError
from stages.eval.metrics import syncnet as S
from stages.eval.video import decode_video
from tests.conftest import cli


def _conv(name, shape):
    return [(f"{name}.weight", shape), (f"{name}.bias", shape[:1])]


def _bn(name, c):
    return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,)), (f"{name}.running_mean", (c,)),
            (f"{name}.running_var", (c,)), (f"{name}.num_batches_tracked", ())]


# The official state dict, read off SyncNetModel.py (class S): Sequential indices count the ReLU and
# MaxPool layers, which hold no tensors; registration order netcnnaud, netfcaud, netfclip, netcnnlip.
OFFICIAL = (
    _conv("netcnnaud.0", (64, 1, 3, 3)) + _bn("netcnnaud.1", 64)
    + _conv("netcnnaud.4", (192, 64, 3, 3)) + _bn("netcnnaud.5", 192)
    + _conv("netcnnaud.8", (384, 192, 3, 3)) + _bn("netcnnaud.9", 384)
    + _conv("netcnnaud.11", (256, 384, 3, 3)) + _bn("netcnnaud.12", 256)
    + _conv("netcnnaud.14", (256, 256, 3, 3)) + _bn("netcnnaud.15", 256)
    + _conv("netcnnaud.18", (512, 256, 5, 4)) + _bn("netcnnaud.19", 512)
    + _conv("netfcaud.0", (512, 512)) + _bn("netfcaud.1", 512) + _conv("netfcaud.3", (1024, 512))
    + _conv("netfclip.0", (512, 512)) + _bn("netfclip.1", 512) + _conv("netfclip.3", (1024, 512))
    + _conv("netcnnlip.0", (96, 3, 5, 7, 7)) + _bn("netcnnlip.1", 96)
    + _conv("netcnnlip.4", (256, 96, 1, 5, 5)) + _bn("netcnnlip.5", 256)
    + _conv("netcnnlip.8", (256, 256, 1, 3, 3)) + _bn("netcnnlip.9", 256)
    + _conv("netcnnlip.11", (256, 256, 1, 3, 3)) + _bn("netcnnlip.12", 256)
    + _conv("netcnnlip.14", (256, 256, 1, 3, 3)) + _bn("netcnnlip.15", 256)
    + _conv("netcnnlip.18", (512, 256, 1, 6, 6)) + _bn("netcnnlip.19", 512)
)
CLIP = "retalking_5.mp4"  # the shortest clip: 4.88 s, 122 grid frames


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    net = S.build()
    with torch.no_grad():  # non-trivial batch-norm statistics, so a wrong copy would show
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                t.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("syncnet") / "syncnet_v2.model"
    torch.save(net.state_dict(), path)
    return path


def test_state_dict_matches_the_official_layout():
    got = [(k, tuple(v.shape)) for k, v in S.build().state_dict().items()]
    assert got == OFFICIAL
    # the towers map the reference's input sizes to 1024-d embeddings
    net = S.build().eval()
    with torch.no_grad():
        assert net.audio(torch.zeros(2, 1, 13, 20)).shape == (2, 1024)
        assert net.lips(torch.zeros(2, 3, 5, 224, 224)).shape == (2, 1024)


def test_loading_is_strict_and_fails_in_one_line(weights, tmp_path):
    state = torch.load(weights, weights_only=True)
    net = S.load(weights)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    # saved by PyTorch < 0.4.1: no num_batches_tracked, still a SyncNet state dict
    old = tmp_path / "old.model"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, old)
    assert torch.equal(S.load(old).state_dict()["netcnnlip.18.weight"], state["netcnnlip.18.weight"])

    cases = {
        "missing": ({k: v for k, v in state.items() if k != "netfclip.3.bias"}, "key netfclip.3.bias is missing"),
        "shape": ({**state, "netcnnaud.8.weight": torch.zeros(384, 192, 3, 4)},
                  "key netcnnaud.8.weight has shape (384, 192, 3, 4), SyncNet's is (384, 192, 3, 3)"),
        "extra": ({**state, "netcnnaud.21.weight": torch.zeros(3)}, "unexpected key netcnnaud.21.weight"),
        "prefixed": ({f"module.{k}": v for k, v in state.items()}, "key netcnnaud.0.weight is missing"),
        "not_a_dict": ([1, 2], "a list, not a dict of tensors"),
    }
    for name, (obj, message) in cases.items():
        path = tmp_path / f"{name}.model"
        torch.save(obj, path)
        with pytest.raises(EvalError) as e:
            S.load(path)
        assert message in str(e.value) and "not a SyncNet state dict" in str(e.value)
        assert len(str(e.value).splitlines()) == 1
    png = tmp_path / "image.png"
    cv2.imwrite(str(png), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(EvalError, match=r"not a SyncNet state dict \(torch.load: "):
        S.load(png)
    with pytest.raises(EvalError, match="none.model: no such file"):
        S.load(tmp_path / "none.model")


def _shifted(k: int, n: int = 80, dim: int = 64, seed: int = 0):
    """Video embeddings (zero in the first and last 15 frames) and the audio ones that carry video
    frame t's embedding at frame t + k (audio late by k)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    v[:S.MAX_OFFSET] = v[n - S.MAX_OFFSET:] = 0
    a = np.zeros_like(v)
    for t in range(n):
        if 0 <= t + k < n:
            a[t + k] = v[t]
    return v, a


@pytest.mark.parametrize("k", [0, 3, -5, 12])
def test_offset_search_finds_a_known_shift(k):
    v, a = _shifted(k)
    curve = S.distance_curve(v, a)
    assert curve.shape == (31,)
    f = S.offset_fields(curve)
    assert f["sync_offset_frames"] == k  # positive: audio late
    assert f["sync_distance"] < 1e-4 and f["sync_distance"] == curve.min()
    assert f["sync_confidence"] == pytest.approx(np.median(curve) - curve.min())
    assert f["sync_confidence"] > 5  # unrelated 64-d normal pairs are ~11 apart
    fields = S.sync_fields([(curve, 60)])
    assert fields["sync_method"] == "syncnet" and fields["sync_offset_frames"] == k and fields["sync_pieces"] == 1


def test_shifted_out_pairs_count_against_zero_padding():
    rng = np.random.default_rng(1)
    v, a = rng.normal(size=(40, 16)), rng.normal(size=(40, 16))
    curve = S.distance_curve(v, a)
    for d in (-15, -4, 0, 7, 15):
        pairs = [np.linalg.norm(v[i] - (a[i + d] if 0 <= i + d < 40 else 0) + 1e-6) for i in range(40)]
        assert curve[d + 15] == pytest.approx(np.mean(pairs), rel=1e-5)


def test_unrelated_embeddings_have_low_confidence():
    pos = min(S.offset_fields(S.distance_curve(*_shifted(k)))["sync_confidence"] for k in (0, 3, -5, 12))
    rng = np.random.default_rng(2)
    neg = S.offset_fields(S.distance_curve(rng.normal(size=(80, 64)), rng.normal(size=(80, 64))))
    assert neg["sync_confidence"] < 0.1 * pos
    assert neg["sync_distance"] > 5


def test_crop_rule():
    frame = np.zeros((400, 400, 3), np.uint8)
    frame[150:290, 130:270] = 255  # rows y - s .. y + 1.8 s, columns x - 1.4 s .. x + 1.4 s
    assert (S.cut(frame, 200, 200, 50) == 255).all()
    frame[150:290, 130:270] = 0
    frame[150:290, 131:269] = 255  # one column narrower each side: the crop's edge columns are darker
    assert S.cut(frame, 200, 200, 50)[:, 0].max() < 255
    edge = S.cut(np.full((400, 400, 3), 200, np.uint8), 20, 200, 50)  # columns -50 .. 90: 50 outside
    assert (edge[:, :78] == S.PAD_GREY).all() and (edge[:, 82:] == 200).all()
    # boxes: interpolated between detections, from the first to the last face; half-size max(w, h) / 2
    boxes = [None, (0, 0, 20, 10), None, (20, 0, 40, 10)] + [(20, 0, 40, 10)] * 20 + [None]
    first, xys = S.crop_track(boxes)
    assert first == 1 and xys.shape == (23, 3)
    assert xys[6:17].tolist() == [[30.0, 5.0, 10.0]] * 11  # the median filter's zero padding stays away


def test_eval_cli_runs_syncnet_on_a_real_clip(shared_media, weights, tmp_path, monkeypatch):
    clip = shared_media / "talking" / CLIP
    first, _ = decode_video(clip, 1)
    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), cv2.cvtColor(first[0], cv2.COLOR_RGB2BGR))
    seen = {}
    audio_windows, embed = S.audio_windows, S.embed

    def spy_audio(wave, n_frames):
        seen.update(wave=wave, n=n_frames, mfcc=S.mfcc(wave))
        return audio_windows(wave, n_frames)

    def spy_embed(net, clips, mfccs, batch=S.BATCH):
        seen.update(clips=clips, mfccs=mfccs)
        return embed(net, clips, mfccs, batch)

    monkeypatch.setattr(S, "audio_windows", spy_audio)
    monkeypatch.setattr(S, "embed", spy_embed)
    res = cli("eval", "--video", str(clip), "--reference", str(ref), "--syncnet", str(weights), "--json")
    out = json.loads(res.stdout)
    assert out["sync_method"] == "syncnet" and out["sync_pieces"] == 1
    off = out["sync_offset_frames"]
    assert isinstance(off, int) and -15 <= off <= 15
    curve = np.array(out["sync_curve"])
    assert curve.shape == (31,) and np.isfinite(curve).all()
    assert np.isfinite(out["sync_confidence"]) and np.isfinite(out["sync_distance"]) and out["sync_confidence"] >= 0
    assert curve[off + 15] == round(out["sync_distance"], 4) == curve.min()

    # the tensors fed to the network: 4 MFCC frames per video frame, 20 per 5-frame window
    n = seen["n"]
    assert 100 <= n <= 122 and len(seen["wave"]) == n * 640  # a face on (nearly) every frame of 4.88 s
    assert seen["mfcc"].shape == (13, 4 * n - 1)
    assert seen["mfccs"].shape == (n - 5, 1, 13, 20) and seen["mfccs"].dtype == torch.float32
    for i in (0, 7, n - 6):
        assert np.allclose(seen["mfccs"][i, 0].numpy(), seen["mfcc"][:, 4 * i:4 * i + 20])
    assert seen["clips"].shape == (n - 5, 3, 5, 224, 224)
    # the MFCC is python_speech_features' default on the int16-scale signal
    import python_speech_features

    pcm = np.clip(np.round(seen["wave"].astype(np.float64) * 32768), -32768, 32767).astype(np.int16)
    assert np.allclose(seen["mfcc"], python_speech_features.mfcc(pcm, 16000).T)
    assert np.abs(seen["wave"]).max() > 0.05  # speech, not silence


def test_lip_windows_are_bgr_frame_stacks():
    rng = np.random.default_rng(3)
    crops = rng.integers(0, 256, (12, 224, 224, 3), dtype=np.uint8)
    w = S.lip_windows(crops)
    assert w.shape == (7, 3, 5, 224, 224) and w.dtype == torch.uint8
    for i in (0, 6):
        for c, rgb in enumerate((2, 1, 0)):  # B, G, R
            assert np.array_equal(w[i, c].numpy(), crops[i:i + 5, :, :, rgb])
