"""The DiT against Wan2.1's reference outputs and layouts, and the invariants training and streaming
rely on (block-causal whole sequence == chunk by chunk with an explicit key/value context)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, infer_dit_config, load_dit, load_into, save_model, strip_prefix
from models.config import PRESETS, DiTConfig, ModelConfig, _tuples
from models.dit import DiT

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TINY = PRESETS["tiny"]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference is not present")
    return REFERENCE


@pytest.fixture(scope="module")
def parity(reference):
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = reference / "wan_dit_tiny_parity.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["config"])
    assert cfg.pop("model_type") == "t2v"
    return _tuples(cfg), load_file(str(path))


def tiny_model(seed=0, cfg: DiTConfig = TINY.dit, scramble=True) -> DiT:
    """The tiny DiT with every weight random (zero-initialised outputs would hide bugs)."""
    torch.manual_seed(seed)
    m = DiT(cfg)
    if scramble:
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.1)
    return m.eval()


def speech(audio, start, stop, cfg: DiTConfig = TINY.dit):
    """The speech features latent frames [start, stop) read: their own and their context's."""
    return audio[:, start:stop + sum(cfg.audio_context)]


def tiny_inputs(F=6, B=2, seed=1, cfg: DiTConfig = TINY.dit):
    g = torch.Generator().manual_seed(seed)
    h = w = 8
    return dict(
        x=torch.randn(B, cfg.in_dim, F, h, w, generator=g),
        t=torch.rand(B, F, generator=g) * 1000,
        context=torch.randn(B, 7, cfg.text_dim, generator=g),
        audio=torch.randn(B, F + sum(cfg.audio_context), 16, cfg.audio_dim, generator=g),
        audio_latent=torch.randn(B, F, cfg.audio_latent_tokens, cfg.audio_latent_dim, generator=g),
        ref=torch.randn(B, cfg.in_dim, 1, h, w, generator=g),
    )


def test_wan_parity_fixture(parity):
    cfg, sd = parity
    model = DiT(cfg)
    load_into(model, strip_prefix({k: v for k, v in sd.items() if k.startswith("model.")}), "parity fixture")
    assert set(model.state_dict()) == {k[len("model."):] for k in sd if k.startswith("model.")}
    with torch.no_grad():
        y = model(sd["input.x"][None], sd["input.t"], sd["input.context"][None]).video[0]
    assert y.shape == sd["output.y"].shape
    assert rel(y, sd["output.y"]) < 1e-4


def test_full_size_layout_matches_wan_1_3b(reference):
    ref = json.loads((reference / "wan2.1_t2v_1.3b_state_dict.json").read_text())
    with torch.device("meta"):
        model = DiT(PRESETS["wan2.1-1.3b"].dit)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == ref["state_dict"]
    assert model.num_params() == ref["num_params"] == 1_418_996_800


def test_block_causal_sequence_equals_chunk_by_chunk_with_kv_context():
    m = tiny_model()
    inp = tiny_inputs(F=6)
    cf = 2
    with torch.no_grad():
        whole = m(**inp, mask="causal", chunk_frames=cf)
        kv, videos, audios = None, [], []
        for c in range(0, 6, cf):
            s = slice(c, c + cf)
            out = m(inp["x"][:, :, s], inp["t"][:, s], inp["context"], audio=speech(inp["audio"], s.start, s.stop),
                    audio_latent=inp["audio_latent"][:, s], ref=inp["ref"] if c == 0 else None,
                    kv=kv, return_kv=True)
            kv = out.kv if kv is None else kv.cat(out.kv)
            videos.append(out.video)
            audios.append(out.audio)
    assert rel(torch.cat(videos, 2), whole.video) < 1e-5
    assert rel(torch.cat(audios, 1), whole.audio) < 1e-5
    assert kv.pos[:, 0].unique().tolist() == list(range(7))    # ref at 0, frames 1..6
    assert len(kv) == 7 * TINY.tokens_per_frame()


def test_masks_differ_and_causal_hides_the_future():
    m = tiny_model()
    inp = tiny_inputs(F=4)
    with torch.no_grad():
        full = m(**inp, mask="full").video
        causal = m(**inp, mask="causal", chunk_frames=2).video
        later = dict(inp, x=inp["x"].clone())
        later["x"][:, :, 2:] += 1.0
        causal2 = m(**later, mask="causal", chunk_frames=2).video
    assert rel(full, causal) > 1e-3
    assert torch.equal(causal[:, :, :2], causal2[:, :, :2])       # the first chunk cannot see chunk 2
    assert rel(causal2[:, :, 2:], causal[:, :, 2:]) > 1e-3


def test_per_frame_timesteps():
    m = tiny_model()
    inp = tiny_inputs(F=4)
    t_scalar = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        a = m(**dict(inp, t=t_scalar)).video
        b = m(**dict(inp, t=t_scalar[:, None].expand(2, 4))).video
        t_frames = t_scalar[:, None].repeat(1, 4)
        t_frames[:, 3] = 0.0
        c = m(**dict(inp, t=t_frames), mask="causal", chunk_frames=1).video
        d = m(**dict(inp, t=t_scalar), mask="causal", chunk_frames=1).video
    assert torch.equal(a, b)
    assert torch.equal(c[:, :, :3], d[:, :, :3])                   # earlier frames do not see frame 3
    assert rel(c[:, :, 3], d[:, :, 3]) > 1e-3


def test_audio_and_reference_conditioning_change_output_and_may_be_absent():
    m = tiny_model()
    inp = tiny_inputs(F=3)
    with torch.no_grad():
        base = m(**inp).video
        no_audio = m(**dict(inp, audio=None)).video
        other_audio = m(**dict(inp, audio=torch.randn_like(inp["audio"]))).video
        no_ref = m(**dict(inp, ref=None)).video
        other_ref = m(**dict(inp, ref=torch.randn_like(inp["ref"]))).video
    for changed in (no_audio, other_audio, no_ref, other_ref):
        assert changed.shape == base.shape and torch.isfinite(changed).all()
        assert rel(changed, base) > 1e-3


def test_audio_adapter_hears_its_speech_in_order_within_a_bounded_context():
    """Mel steps are ordered (RoPE along time): permuting a frame's steps changes its output. Frame i
    hears speech frames i - before .. i + after and nothing later (bounded lookahead)."""
    m = tiny_model()
    before, after = TINY.dit.audio_context
    assert (before, after) == (2, 1)
    inp = tiny_inputs(F=4, B=1)
    frame = lambda out, i: out.video[:, :, i]  # noqa: E731
    with torch.no_grad():
        base = m(**inp)
        a = inp["audio"].clone()
        a[:, before + 1] = a[:, before + 1].flip(1)        # frame 1's own steps, time-reversed
        permuted = m(**dict(inp, audio=a))
        assert rel(frame(permuted, 1), frame(base, 1)) > 1e-5           # float noise is ~1e-7
        # the mechanism, one adapter alone: without RoPE the steps are a set (a negative control)
        attn = m.blocks[0].audio_attn
        x, ctx = torch.randn(1, 5, TINY.dit.dim), torch.randn(1, 16, TINY.dit.dim)
        tokens_rope = m.embed_audio(inp["audio"][:, :4], 1, "cpu")[1]
        rope = (*tokens_rope[:2], tokens_rope[2][:16], tokens_rope[3][:16])
        flipped = ctx.flip(1)
        assert rel(attn.cross_attend(x, flipped), attn.cross_attend(x, ctx)) < 1e-6
        assert rel(attn.cross_attend(x, flipped, rope), attn.cross_attend(x, ctx, rope)) > 1e-3
        a = inp["audio"].clone()
        a[:, before + 2 + after] = torch.randn_like(a[:, 0])  # the lookahead frame of frame 2 ...
        ahead = m(**dict(inp, audio=a))
        assert rel(frame(ahead, 2), frame(base, 2)) > 1e-3
        # ... is past what frames 0 and 1 hear: only attention between frames carries it there,
        # so with the full mask it may; under the causal mask (chunk 1) it may not
        causal = m(**inp, mask="causal", chunk_frames=1)
        causal_ahead = m(**dict(inp, audio=a), mask="causal", chunk_frames=1)
        assert torch.equal(causal_ahead.video[:, :, :2], causal.video[:, :, :2])
        assert rel(causal_ahead.video[:, :, 2], causal.video[:, :, 2]) > 1e-3
    with pytest.raises(ValueError, match="need 7"):
        m(**dict(inp, audio=inp["audio"][:, :4]))


def test_a_text_per_frame_equals_chunk_by_chunk_calls_with_each_chunks_text():
    """Per-chunk instructions in training: a block-causal forward where each chunk reads its own text
    equals streaming the chunks one by one, each with its text (the ref frame reads the first one's);
    one text repeated on every frame equals the shared-text forward."""
    m = tiny_model()
    inp = tiny_inputs(F=4, B=1)
    g = torch.Generator().manual_seed(5)
    texts = [inp["context"], torch.randn(1, 7, TINY.dit.text_dim, generator=g)]   # chunk 0, chunk 1
    per_frame = torch.stack([texts[0][:, :]] * 2 + [texts[1]] * 2, 1)            # [B, F, L, D]
    with torch.no_grad():
        whole = m(**dict(inp, context=per_frame), mask="causal", chunk_frames=2)
        first = m(inp["x"][:, :, :2], inp["t"][:, :2], texts[0], audio=speech(inp["audio"], 0, 2),
                  audio_latent=inp["audio_latent"][:, :2], ref=inp["ref"], return_kv=True, mask="full")
        second = m(inp["x"][:, :, 2:], inp["t"][:, 2:], texts[1], audio=speech(inp["audio"], 2, 4),
                   audio_latent=inp["audio_latent"][:, 2:], kv=first.kv)
        shared = m(**inp, mask="causal", chunk_frames=2)
        repeated = m(**dict(inp, context=torch.stack([texts[0]] * 4, 1)), mask="causal", chunk_frames=2)
    assert rel(torch.cat([first.video, second.video], 2), whole.video) < 1e-5
    assert rel(repeated.video, shared.video) < 1e-6
    assert rel(whole.video[:, :, 2:], shared.video[:, :, 2:]) > 1e-3        # the second text acts
    with pytest.raises(ValueError, match="per-frame text covers 3 frames"):
        m(**dict(inp, context=per_frame[:, :3]))


def test_pooled_text_reads_each_frames_text_without_its_padding_and_starts_as_identity():
    """cfg.pooled_text: the mean of a text's token features drives adaLN. Zero padding (how encoders
    and the stream pad) changes nothing; a frame's text reaches that frame through the pooled path
    even with cross-attention's output switched off; a fresh model's pooled path adds nothing (it loads
    into the same output as a model without it)."""
    m = tiny_model()
    inp = tiny_inputs(F=4, B=1)
    D = TINY.dit.text_dim
    padded = torch.cat([inp["context"], torch.zeros(1, 5, D)], 1)
    with torch.no_grad():
        assert torch.equal(m(**inp).video, m(**dict(inp, context=padded)).video)
        naive = m.text_pool(padded.mean(1))                  # negative control: a mean over the padding too
        assert rel(naive, m.pool_text(padded)) > 1e-2 and rel(m.pool_text(inp["context"]), m.pool_text(padded)) == 0
        for b in m.blocks:
            b.cross_attn.o.weight.zero_()
            b.cross_attn.o.bias.zero_()
        g = torch.Generator().manual_seed(3)
        other = torch.stack([inp["context"]] * 3 + [torch.randn(1, 7, D, generator=g)], 1)   # frame 3 told otherwise
        same = torch.stack([inp["context"]] * 4, 1)
        a = m(**dict(inp, context=same), mask="causal", chunk_frames=1).video
        b = m(**dict(inp, context=other), mask="causal", chunk_frames=1).video
        assert torch.equal(a[:, :, :3], b[:, :, :3]) and rel(a[:, :, 3:], b[:, :, 3:]) > 1e-3
        m.text_pool[2].weight.zero_()
        m.text_pool[2].bias.zero_()
        c = m(**dict(inp, context=other), mask="causal", chunk_frames=1).video
        d = m(**dict(inp, context=same), mask="causal", chunk_frames=1).video
        assert torch.equal(c, d)                             # with cross-attention off, the pooled path was it
    torch.manual_seed(0)
    fresh = DiT(TINY.dit).eval()
    plain = DiT(DiTConfig(**{**TINY.dit.__dict__, "pooled_text": False})).eval()
    plain.load_state_dict({k: v for k, v in fresh.state_dict().items() if not k.startswith("text_pool.")})
    with torch.no_grad():
        for net in (fresh, plain):
            net.head.head.weight.copy_(torch.ones_like(net.head.head.weight) * 0.1)
        assert torch.equal(fresh(**inp).video, plain(**inp).video)
    assert infer_dit_config(fresh.state_dict()).pooled_text and not infer_dit_config(plain.state_dict()).pooled_text


def test_new_branches_start_as_identity_and_wan_models_have_none():
    torch.manual_seed(0)
    m = DiT(TINY.dit).eval()
    with torch.no_grad():
        for b in m.blocks:                      # make the Wan path non-trivial; adapter stays at its init
            b.ffn[2].weight.normal_(0, 0.1)
        m.head.head.weight.normal_(0, 0.1)
        inp = tiny_inputs(F=2)
        assert torch.equal(m(**inp).video, m(**dict(inp, audio=None)).video)
    with torch.device("meta"):
        wan = DiT(PRESETS["wan2.1-1.3b"].dit)
    assert not any("audio" in k for k in wan.state_dict())
    with pytest.raises(ValueError, match="audio_latent"):
        m(**dict(inp, audio_latent=None))


def test_kv_context_matches_whole_sequence_for_full_mask_per_chunk():
    """The streaming form: a chunk attending to an explicit context equals the same tokens in a
    full forward where the context tokens come first (context built from a clean history)."""
    m = tiny_model()
    inp = tiny_inputs(F=4)
    t = inp["t"].clone()
    t[:, :2] = 0.0
    with torch.no_grad():
        whole = m(**dict(inp, t=t), mask="causal", chunk_frames=2)
        hist = m(inp["x"][:, :, :2], t[:, :2], inp["context"], audio=speech(inp["audio"], 0, 2),
                 audio_latent=inp["audio_latent"][:, :2], ref=inp["ref"], return_kv=True, mask="full")
        cur = m(inp["x"][:, :, 2:], t[:, 2:], inp["context"], audio=speech(inp["audio"], 2, 4),
                audio_latent=inp["audio_latent"][:, 2:], kv=hist.kv)
    assert rel(cur.video, whole.video[:, :, 2:]) < 1e-5


def test_forward_backward_and_gradient_checkpointing():
    m = tiny_model().train()
    inp = tiny_inputs(F=3)
    out = m(**inp, mask="causal")
    loss = out.video.square().mean() + out.audio.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(int(g.abs().sum() > 0) for g in grads.values()) == len(grads)
    m.zero_grad()
    m.gradient_checkpointing = True
    out = m(**inp, mask="causal")
    (out.video.square().mean() + out.audio.square().mean()).backward()
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), n


def test_checkpoint_round_trip_keeps_config_lineage_and_outputs(tmp_path):
    m = tiny_model()
    lineage = [{"stage": "bidirectional", "steps": 10}]
    path = save_model(tmp_path / "tiny.safetensors", m, TINY, lineage=lineage)
    loaded, cfg = load_dit(path)
    assert cfg == TINY
    inp = tiny_inputs(F=2)
    with torch.no_grad():
        assert torch.equal(loaded(**inp).video, m(**inp).video)
    from models.checkpoint import read_metadata
    assert read_metadata(path)["lineage"] == lineage


def test_self_forcing_pt_and_sharded_wan_files_load(tmp_path, parity):
    cfg, sd = parity
    weights = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    mcfg = ModelConfig(name="parity", dit=cfg)
    # CausVid / Self-Forcing: {"generator_ema": {"model.<name>": ...}, "generator": ...}
    pt = tmp_path / "sf.pt"
    torch.save({"generator": {"model." + k: torch.zeros_like(v) for k, v in weights.items()},
                "generator_ema": {"model." + k: v for k, v in weights.items()}}, pt)
    # Wan: diffusion_pytorch_model.safetensors.index.json + shards
    from safetensors.torch import save_file
    names = sorted(weights)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(tmp_path / shard))
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    x, t, c = sd["input.x"][None], sd["input.t"], sd["input.context"][None]
    for path in (pt, index):
        model, _ = load_dit(path, mcfg)
        with torch.no_grad():
            assert rel(model(x, t, c).video[0], sd["output.y"]) < 1e-4, path.name


def test_wan_weights_load_into_a_model_with_audio_branches(tmp_path, parity):
    cfg, sd = parity
    weights = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    from safetensors.torch import save_file
    save_file(weights, str(tmp_path / "wan.safetensors"))
    branched = ModelConfig(name="p", dit=DiTConfig(**{**cfg.__dict__, "audio_dim": 8}))
    model, _ = load_dit(tmp_path / "wan.safetensors", branched)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.blocks[0].self_attn.q.weight, weights["blocks.0.self_attn.q.weight"])
    x, t, c = sd["input.x"][None], sd["input.t"], sd["input.context"][None]
    audio = torch.randn(1, x.shape[2], 4, 8)
    with torch.no_grad():                       # zero-initialised adapter: Wan's output is unchanged
        assert rel(model(x, t, c, audio=audio).video[0], sd["output.y"]) < 1e-4


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    path = save_model(tmp_path / "tiny.safetensors", tiny_model(scramble=False), TINY)
    with pytest.raises(CheckpointError) as e:
        load_dit(path, PRESETS["small"])
    msg = str(e.value)
    assert "\n" not in msg
    assert "patch_embedding.weight (checkpoint [64, 16, 1, 2, 2], model [320, 16, 1, 2, 2])" in msg
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_dit(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_dit(tmp_path / "missing.safetensors")


def test_cached_masks_and_audio_rope_serve_training_after_an_inference_mode_stream():
    """The mask, the audio adapter's RoPE and the tokens' positions and RoPE tables (models.rope.grid_tables)
    are built once per shape and cached; built first under torch.inference_mode (a stream), they must still be
    usable in a backward pass."""
    from models import dit as dit_mod
    from models import rope as rope_mod
    dit_mod._token_mask.cache_clear()
    dit_mod._audio_rope.cache_clear()
    rope_mod.grid_tables.cache_clear()
    rope_mod._device_freqs.cache_clear()
    m = tiny_model()
    inp = tiny_inputs(F=3)
    with torch.inference_mode():
        m(**inp, mask="causal", chunk_frames=1)
    m.train()
    m(**inp, mask="causal", chunk_frames=1).video.square().mean().backward()
    assert m.blocks[0].audio_attn.q.weight.grad is not None


def test_starter_preset_fits_the_shipping_budget():
    """`small` is what the starter model and the distilled student ship: DiT + TAEHV decoder <= 40 MB in
    bf16, video-only (joint audio has no training target yet)."""
    from models.taehv import TAEHV
    cfg = PRESETS["small"]
    dit = DiT(cfg.dit).num_params()
    dec = sum(p.numel() for p in TAEHV(cfg.taehv).decoder.parameters())
    assert 2 * (dit + dec) <= 40e6 and dit > 10e6
    assert not cfg.dit.joint_audio and cfg.dit.audio_dim == cfg.audio.n_mels


def test_the_position_tables_a_forward_reads_are_built_once_per_layout_and_equal_fresh_ones():
    """models.rope.grid_tables: the positions and RoPE tables of a layout (frame positions, grid, joint audio
    row), on the device, built once (a stream's chunks repeat a few layouts: no host-to-device copy per forward)
    and equal to building them anew; a forward over them is the forward over fresh tables (the oracle: the same
    forward with the cache bypassed)."""
    from models import rope as rope_mod
    from models.rope import grid_positions, grid_tables, rope_angles
    frames = (0, 5, 6, 7)
    pos, cos, sin = grid_tables(frames, 4, 6, 2, 32, torch.device("cpu"))
    fresh = grid_positions(torch.tensor(frames), 4, 6, 2)
    assert torch.equal(pos, fresh) and pos.shape == (4 * (4 * 6 + 2), 3)
    assert all(torch.equal(a, b) for a, b in zip((cos, sin), rope_angles(fresh, 32)))
    assert grid_tables(frames, 4, 6, 2, 32, torch.device("cpu"))[1] is cos          # built once
    assert not torch.equal(grid_tables((0, 5, 6, 8), 4, 6, 2, 32, torch.device("cpu"))[1], cos)   # another layout
    m = tiny_model()
    inp = tiny_inputs(F=3)
    with torch.no_grad():
        cached = m(**inp, mask="causal", chunk_frames=1, frame_pos=[4, 5, 6], return_kv=True)
        rope_mod.grid_tables.cache_clear()
        hits = grid_tables.cache_info().hits
        m(**inp, mask="causal", chunk_frames=1, frame_pos=[4, 5, 6])
        assert grid_tables.cache_info().hits == hits                             # first build of this layout
        m(**inp, mask="causal", chunk_frames=1, frame_pos=[4, 5, 6])
        assert grid_tables.cache_info().hits == hits + 1                         # then read
    import models.dit as dit_mod
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(dit_mod, "grid_tables", grid_tables.__wrapped__)             # fresh tables every forward
        fresh_out = m(**inp, mask="causal", chunk_frames=1, frame_pos=[4, 5, 6], return_kv=True)
        moved = m(**inp, mask="causal", chunk_frames=1, frame_pos=[4, 5, 7])
    assert torch.equal(cached.video, fresh_out.video) and torch.equal(cached.kv.pos, fresh_out.kv.pos)
    assert (moved.video - cached.video).abs().max() > 1e-4                       # positions matter (control)
