"""PCM's perceptual distances (stages/distill/perceptual.py): "codec" (the run's autoencoder decodes, its
encoder's features compare), "lpips" (LPIPS with the user's weight files) and "latent" (as before)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models.config import PRESETS
from models.taehv import TAEHV
from stages.distill.perceptual import CodecDistance, LPIPSDistance, build, latent_distance, load_lpips
from tests.test_distill import CHUNKS, OBJ, ST, TINY, conditions, draw, params, same, scrambled


def tiny_codec(seed=0) -> TAEHV:
    """An untrained TAEHV of the tiny preset (PyTorch's default init)."""
    torch.manual_seed(seed)
    return TAEHV(PRESETS["tiny"].taehv).eval()


def latents(seed, batch=2, frames=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, TINY.dit.in_dim, frames, TINY.height // 8, TINY.width // 8, generator=g)


def test_the_codec_distance_is_zero_for_identical_latents_only():
    d = CodecDistance(tiny_codec())
    z = latents(1, frames=2)
    assert float(d(z, z.clone())) == 0.0
    near, far = (float(d(z + s * latents(2, frames=2), z)) for s in (0.1, 1.0))
    assert 0.0 < near < far
    assert latent_distance(z, z) == 0.0 and float(latent_distance(z + 1, z)) == 1.0


def world_clip(seed, size=32, frames=5, start=0):
    """Frames [1, frames, 3, size, size] in [0, 1] of synthetic world clip `seed` from frame `start`."""
    from stages import synth
    fps = PRESETS["tiny"].audio.fps
    s = synth.make_sample(seed, width=size, height=size, fps=fps, seconds=(start + frames) / fps)
    return torch.from_numpy(s.frames[start:start + frames].copy()).permute(0, 3, 1, 2).float()[None] / 255


def degraded(x):
    """(x with Gaussian noise of std 0.05, x blurred by a 3 x 3 box)."""
    noise = 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    blur = F.avg_pool2d(x.flatten(0, 1), 3, 1, 1, count_include_pad=False).unflatten(0, x.shape[:2])
    return (x + noise).clamp(0, 1), blur


def test_the_codec_distance_ranks_decoded_content_like_a_perceptual_distance():
    """On the shipped starter's autoencoder (trained on the world) and real world frames coded by it: the
    latents of a mildly noised or blurred clip decode 250x closer to the clip's than another character's
    do, and latent noise of growing size ranks in order. An untrained TAEHV's encoder ranks pixels alike
    (noise levels in order, another character 30x farther: measured), but through an untrained codec the
    latents barely depend on the frames (differences ~1e-7), so decoded content needs the trained one."""
    from models.checkpoint import load_taehv
    from models.starter import CODEC
    codec = load_taehv(CODEC)
    d = CodecDistance(codec)
    a, other = world_clip(0), world_clip(1)
    noisy, blur = degraded(a)
    with torch.no_grad():
        z = {k: codec.encode_video(x).permute(0, 2, 1, 3, 4) for k, x in
             [("a", a), ("noisy", noisy), ("blur", blur), ("other", other)]}
        got = {k: float(d(z[k], z["a"])) for k in z}
        levels = [float(d(z["a"] + s * torch.randn(z["a"].shape, generator=torch.Generator().manual_seed(2)),
                          z["a"])) for s in (0.03, 0.3, 1.0)]
    assert got["a"] == 0.0
    # measured at 32 x 32 through the world codec (the starter's since session 55): 0.0021 (noise), 0.0097
    # (blur: it keeps more fine detail than the session-30 codec, which gave 0.0023), 2.7 (another character)
    assert 0 < got["noisy"] < got["other"] / 250 and 0 < got["blur"] < got["other"] / 250, got
    assert levels[0] < levels[1] < levels[2], levels
    # the untrained encoder on the frames themselves: noise levels in order, the other character far
    raw = CodecDistance(tiny_codec())
    steps = [float(raw.compare((a[:, :4] + s * torch.randn(a[:, :4].shape, generator=torch.Generator().manual_seed(1)))
                               .clamp(0, 1), a[:, :4])) for s in (0.01, 0.1, 0.3)]
    assert steps[0] < steps[1] < steps[2] < float(raw.compare(other[:, :4], a[:, :4])), steps


def test_the_gradient_reaches_the_students_branch_only():
    codec = tiny_codec()
    d = CodecDistance(codec)
    pred, target = latents(3).requires_grad_(), latents(4).requires_grad_()
    d(pred, target).backward()
    assert float(pred.grad.abs().sum()) > 0 and target.grad is None
    assert all(not p.requires_grad and p.grad is None for p in codec.parameters())


def test_the_distance_taken_a_few_samples_at_a_time_equals_the_whole_batchs():
    """Decoded's pieces (the memory bound of a large batch) against the definition on the whole batch at once:
    equal value and gradient with pieces of 1, 2 (one of them short) and more than the batch; a wrong share per
    piece (the negative control: each piece's own mean, summed) is detectably not the same value."""
    from stages.distill.perceptual import decode_chunk, feature_distance
    codec = tiny_codec()
    pred0, target = latents(3, batch=5, frames=2), latents(4, batch=5, frames=2)
    ref_d = CodecDistance(codec)
    pred = pred0.clone().requires_grad_()
    want = ref_d.features(decode_chunk(codec, target).detach())
    whole = feature_distance(ref_d.features(decode_chunk(codec, pred)), [w.detach() for w in want], 2)
    (whole * 3).backward()
    for piece in (1, 2, 8):
        got = pred0.clone().requires_grad_()
        d = CodecDistance(codec, piece=piece)(got, target)
        (d * 3).backward()
        assert torch.allclose(d, whole.detach(), rtol=1e-5, atol=0)
        assert torch.allclose(got.grad, pred.grad, rtol=1e-4, atol=1e-9)
    with torch.no_grad():
        assert torch.allclose(CodecDistance(codec, piece=2)(pred0, target), whole.detach(), rtol=1e-5, atol=0)
        unshared = sum(CodecDistance(codec)(pred0[a:a + 2], target[a:a + 2]) for a in (0, 2, 4))
    assert abs(float(unshared) - float(whole)) > 0.1 * float(whole)


def test_through_pcm_the_student_gets_the_gradient_and_the_ema_none():
    """pcm_loss with the codec distance: the student's weights get a gradient through the decoder and the
    encoder; the EMA's weights (made leaves that could collect one), the teacher's and the codec's none."""
    from stages.distill.dmd import DMDSettings
    from stages.distill.pcm import WithWeights, pcm_loss, phase_edges
    from stages.distill.rollout import self_rollout
    teacher = scrambled()
    ref, text, audio = conditions(batch=2)
    with torch.no_grad():
        v, a = self_rollout(teacher, TINY, ST, ref, text, audio, CHUNKS, seed=2)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = {k: p.detach().clone().requires_grad_() for k, p in student.named_parameters()}
    codec = tiny_codec()
    loss, parts = pcm_loss(student, WithWeights(student, ema), teacher, {"ref": ref, "text": text, "audio": audio}, v, a, OBJ,
                           phase_edges(ST.steps, OBJ.shift), DMDSettings(guidance=3.0), 4, draw(5), CodecDistance(codec))
    loss.backward()
    assert float(parts["loss_pcm_video"]) > 0
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    assert all(t.grad is None for t in ema.values())
    assert all(p.grad is None for p in [*teacher.parameters(), *codec.parameters()])


def distiller(tmp_path, teacher, name, codec, **settings):
    """test_distill's Distiller (batch 1, 2 chunks, lr 1e-3), given `codec`."""
    from stages.distill.loop import DistillSettings, Distiller
    from stages.train.sample import sampling_record
    ref, text, audio = conditions(chunks=2)
    batch = {"ref": ref, "text": text, "audio": audio}
    st = DistillSettings(**{"steps": 4, "batch": 1, "chunks": 2, "warmup": 0, "lr": 1e-3, **settings})
    return Distiller(teacher, TINY, sampling_record(TINY, "causal", 2.0, 1, 0.5, None), st, tmp_path / name,
                     lambda step: batch, codec=codec)


def test_the_codec_distance_changes_the_distillers_update_and_latent_stays_as_it_was(tmp_path):
    """One Distiller step with PCM: "codec" (the default given the codec) and "latent" give the same DMD
    term and other PCM terms and updates; at pcm_weight 0 the two settings update alike (the control)."""
    teacher, codec = scrambled(), tiny_codec()
    auto = distiller(tmp_path, teacher, "auto", codec, pcm_weight=1.0)
    assert auto.pcm_distance == "codec" and isinstance(auto.distance, CodecDistance)
    plain = distiller(tmp_path, teacher, "plain", None, pcm_weight=1.0)        # no codec: latent, as before
    assert plain.pcm_distance == "latent" and plain.distance is latent_distance
    runs = {"codec": auto, "latent": distiller(tmp_path, teacher, "latent", codec, pcm_weight=1.0,
                                                pcm_distance="latent")}
    logged = {k: r.train_step() for k, r in runs.items()}
    assert logged["codec"]["loss_dmd"] == logged["latent"]["loss_dmd"]
    assert logged["codec"]["loss_pcm_video"] > 0 and logged["codec"]["loss_pcm_video"] != logged["latent"]["loss_pcm_video"]
    assert logged["codec"]["loss_pcm_audio"] == logged["latent"]["loss_pcm_audio"]
    assert not same(params(runs["codec"].student), params(runs["latent"].student))
    off = {k: distiller(tmp_path, teacher, f"off-{k}", codec, pcm_distance=k) for k in ("codec", "latent")}
    for r in off.values():
        r.train_step()
    assert same(params(off["codec"].student), params(off["latent"].student))
    with pytest.raises(ValueError, match="--pcm-distance codec decodes the chunks with the teacher's autoencoder"):
        distiller(tmp_path, teacher, "none", None, pcm_weight=1.0, pcm_distance="codec")


# --- LPIPS with the user's weights -----------------------------------------------------------------------

CHANNELS = (64, 192, 384, 256, 256)          # AlexNet's relu1..relu5


def lpips_files(tmp_path, seed=0):
    """(a randomly initialised torchvision AlexNet's state dict, its `features` part: the backbone LPIPS
    reads; random LPIPS linear layers in the lpips package's format), saved to tmp_path."""
    import torchvision
    torch.manual_seed(seed)
    net = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(CHANNELS)}
    torch.save(net, tmp_path / "alexnet.pth")
    torch.save(lin, tmp_path / "lin.pth")
    return tmp_path / "alexnet.pth", tmp_path / "lin.pth"


def test_lpips_with_user_weights_is_zero_for_identical_inputs(tmp_path, monkeypatch):
    import importlib.util
    net, lin = lpips_files(tmp_path)
    model = load_lpips(str(net), str(lin))
    assert torch.equal(model.lins[2].weight, torch.load(lin)["lin2.model.1.weight"])
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert float(model(x, x.clone())) == 0.0 and float(model(x, x.flip(0))) > 0
    name, d = build("auto", tiny_codec(), str(net), str(lin))              # --lpips given: "lpips"
    assert name == "lpips" and isinstance(d, LPIPSDistance)
    z = latents(5)
    assert float(d(z, z.clone())) == 0.0 and float(d(z + latents(6), z)) > 0
    # wrong files, one line each; no lin file and no lpips package
    with pytest.raises(ValueError, match="is not a torchvision AlexNet or VGG16 state dict"):
        load_lpips(str(lin), str(lin))
    with pytest.raises(ValueError, match=r"size mismatch for 1.weight"):
        torch.save({f"lin{k}.model.1.weight": torch.rand(1, 8, 1, 1) for k in range(5)}, tmp_path / "bad.pth")
        load_lpips(str(net), str(tmp_path / "bad.pth"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="give --lpips-lin PATH or install the lpips package"):
        load_lpips(str(net))


def test_vidu_distill_refuses_lpips_weights_it_cannot_use_in_one_line(tmp_path):
    from models.checkpoint import save_model
    from models.dit import DiT
    from stages.train.sample import sampling_record
    from tests.conftest import cli
    cfg = PRESETS["tiny"]
    teacher = tmp_path / "causal" / "ema.safetensors"
    teacher.parent.mkdir()
    save_model(teacher, DiT(cfg.dit).state_dict(), cfg, [], {"sampling": sampling_record(cfg, "causal", 2.0, 1, 0.5, None)})
    net, lin = lpips_files(tmp_path)
    base = ("distill", "--from", str(teacher), "--out", str(tmp_path / "out"), "--steps", "1", "--pcm-weight", "1",
            "--workdir", str(tmp_path / "work"), "--quiet")
    for flags, says in [(("--lpips", str(tmp_path / "missing.pth")), f"--lpips {tmp_path / 'missing.pth'}: no such weights file"),
                        (("--pcm-distance", "lpips"), "--pcm-distance lpips needs the backbone's weights"),
                        (("--lpips", str(lin), "--lpips-lin", str(lin)), "is not a torchvision AlexNet"),
                        (("--lpips", str(net), "--pcm-distance", "codec"), "--lpips is read by --pcm-distance lpips")]:
        res = cli(*base, *flags, check=False)
        assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "out").exists()                                # refused before anything was written


def test_distill_run_gives_the_distiller_the_teachers_codec_so_pcm_compares_decoded_frames(tmp_path, monkeypatch):
    """`vidu distill` with PCM and no --pcm-distance: the Distiller gets the codec the teacher was trained with
    (the data's) and PCM's d is "codec" on it; --pcm-distance latent keeps the latents' squared difference."""
    import stages.distill.loop as loop
    from models.checkpoint import save_model, save_taehv
    from models.dit import DiT
    from stages.train.sample import sampling_record
    cfg = PRESETS["tiny"]
    save_taehv(tmp_path / "codec.safetensors", tiny_codec(), cfg.taehv)
    teacher = tmp_path / "causal" / "ema.safetensors"
    teacher.parent.mkdir()
    rec = sampling_record(cfg, "causal", 2.0, 1, 0.5, {"kind": "taehv", "file": "../codec.safetensors",
                                                        "channels": cfg.dit.in_dim})
    save_model(teacher, DiT(cfg.dit).state_dict(), cfg, [], {"sampling": rec})
    built = []
    monkeypatch.setattr(loop, "distill", lambda dst, *a: built.append(dst) or {"resumed_from": None})
    for name, kw in [("auto", {}), ("latent", {"pcm_distance": "latent"})]:
        loop.distill_run(loop.DistillSettings(init_from=str(teacher), steps=1, batch=1, chunks=2, samples=1,
                                              pcm_weight=1.0, **kw), tmp_path / name)
    auto, latent = built
    assert auto.pcm_distance == "codec" and isinstance(auto.distance, CodecDistance)
    assert auto.distance.codec.config == cfg.taehv and not any(p.requires_grad for p in auto.distance.codec.parameters())
    assert latent.pcm_distance == "latent" and latent.distance is latent_distance
