"""Both teacher stages on the tiny preset and the synthetic avatar world: the loss falls, a stopped
run resumes exactly, stage 2 starts from stage 1, and two torchrun processes (FSDP2, gloo) compute
the same losses as one process on the same global batch."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from manifests import catalog
from stages.train.loop import TrainSettings, train
from stages.train.objectives import ObjectiveSettings
from tests.conftest import cli

FAST = dict(preset="tiny", batch=4, samples=16, lr=2e-3, warmup=10)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("work")
    out = root / "bi"
    summary = train(TrainSettings(stage="bidirectional", steps=300, save_every=100, **FAST), out, root)
    return root, out, summary


def test_bidirectional_loss_falls(stage1):
    root, out, summary = stage1
    ls = losses(out)
    assert len(ls) == 300 and summary["steps"] == 300
    first, last = sum(ls[:20]) / 20, sum(ls[-50:]) / 50
    assert last < 0.75 * first, (first, last)
    # whitened codec latents: predicting x0 = 0 scores 1.0 on video; the model must do better
    video = [json.loads(line)["loss_video"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert sum(video[-50:]) / 50 < 0.8
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "step-000300" / "ema.safetensors").is_file() and (out / "codec.safetensors").is_file()
    (run,) = [r for r in catalog.runs(root) if r["stage"] == "train-bidirectional"]
    params = json.loads(run["params"]) if isinstance(run["params"], str) else run["params"]
    assert run["state"] == "done" and params["model"]["dit"]["dim"] == 64 and params["train"]["steps"] == 300


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    st = TrainSettings(stage="bidirectional", steps=16, save_every=5, **FAST)
    straight = tmp_path / "straight"
    train(st, straight)

    stopped = tmp_path / "stopped"

    def stop_at_12(logged):
        if logged["step"] == 12:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(st, stopped, progress=stop_at_12)
    assert (stopped / "latest").read_text().strip() == "step-000010"
    summary = train(dataclasses.replace(st, minutes=30.0), stopped)   # a new time limit: it stops runs, computes nothing
    assert summary["resumed_from"] == 10
    a, b = losses(straight), losses(stopped)
    assert len(a) == len(b) == 16
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    sa = torch.load(straight / "step-000016" / "state.pt", weights_only=False)
    sb = torch.load(stopped / "step-000016" / "state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 16
    # the 1e-6 match means something: no two steps' losses are that close
    assert min(abs(x - y) for i, x in enumerate(a) for y in a[i + 1:]) > 1e-6


def test_a_run_that_cannot_resume_says_so_before_its_data_and_a_deadline_stops_it(tmp_path, monkeypatch):
    import time
    import stages.train.loop as loop
    st = TrainSettings(stage="bidirectional", steps=16, save_every=5, **FAST)
    first = train(st, tmp_path / "run", deadline=time.perf_counter())    # already past: one step, checkpointed
    assert first["steps"] == 1 and (tmp_path / "run" / "latest").read_text().strip() == "step-000001"
    assert first["data_s"] > 0

    def no_data(*a, **k):
        raise AssertionError("the data were built for a run that cannot resume")
    monkeypatch.setattr(loop, "build_dataset", no_data)
    with pytest.raises(ValueError, match="other settings"):
        train(dataclasses.replace(st, lr=1e-3), tmp_path / "run")
    with pytest.raises(AssertionError, match="data were built"):     # the control: a resumable run builds them
        train(dataclasses.replace(st, minutes=5.0), tmp_path / "run")


def test_a_run_written_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """A setting added to vidu after a run was written (here --eyes-weight) counts as its default there:
    the run resumes under today's defaults, and is refused once the new setting differs from it."""
    from stages.train.machinery import latest_state
    st = TrainSettings(stage="causal", steps=4)
    old = st.to_dict()
    del old["objective"]["eyes_weight"]
    step = tmp_path / "step-000002"
    step.mkdir()
    torch.save({"settings": old, "step": 2}, step / "state.pt")
    (tmp_path / "latest").write_text("step-000002")
    path, state = latest_state(tmp_path, st)
    assert path == step and state["step"] == 2
    assert latest_state(tmp_path, dataclasses.replace(st, minutes=3.0))[0] == step      # RUN_CONTROL may change
    with pytest.raises(ValueError, match="other settings"):     # the new setting away from its default
        latest_state(tmp_path, dataclasses.replace(st, objective=dataclasses.replace(st.objective, eyes_weight=3.0)))
    with pytest.raises(ValueError, match="other settings"):     # control: a setting the run has, changed
        latest_state(tmp_path, dataclasses.replace(st, lr=1e-3))


def test_causal_stage_starts_from_the_teacher(stage1, tmp_path):
    root, bi, _ = stage1
    stream = ObjectiveSettings(p_teacher_forcing=0.5, chunk_frames=1, clip_frames=13)   # tiny: context 5 frames
    st = TrainSettings(stage="causal", steps=20, save_every=20, init_from=str(bi / "step-000300" / "ema.safetensors"),
                       objective=stream, **FAST)
    summary = train(st, tmp_path / "causal", root)
    ls = losses(tmp_path / "causal")
    assert len(ls) == 20 and all(x == x for x in ls)
    rows = [json.loads(line) for line in (tmp_path / "causal" / "loss.jsonl").read_text().splitlines()]
    assert max(r["chunk"] for r in rows) > 4 and all(r["context_frames"] == min(r["chunk"], 4) for r in rows)
    assert all(r["mouth_share"] > 0 for r in rows)          # world clips carry the mouth region
    from models.checkpoint import read_metadata
    meta = read_metadata(Path(summary["checkpoint"]) / "ema.safetensors")
    assert [s["stage"] for s in meta["lineage"]] == ["bidirectional", "causal"]
    assert (meta["sampling"]["window"], meta["sampling"]["sink"]) == (3, True)     # what stage 2 streamed with
    # starting from the teacher beats starting from scratch on the causal objective
    scratch = train(TrainSettings(stage="causal", steps=20, save_every=20, objective=stream, **FAST),
                    tmp_path / "scratch")
    assert sum(ls) < sum(losses(tmp_path / "scratch"))  # the same 20 steps (data, noise) from random weights
    assert scratch["steps"] == 20


def test_torchrun_fsdp_two_processes_match_one(tmp_path):
    args = ["train", "--stage", "bidirectional", "--preset", "tiny", "--steps", "6", "--batch", "4", "--samples", "8",
            "--save-every", "3", "-q", "--workdir", str(tmp_path / "work")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cli(*args, "--out", str(tmp_path / "one"))  # one process: this one
    # the same codec, given: rank 0 copies it instead of training the quick inline one again (most of
    # the two processes' time); what is compared is the DiT's training, one process against two
    codec = tmp_path / "one" / "codec.safetensors"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "vidu_cli",
                          *args, "--codec", str(codec), "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert not (tmp_path / "two" / "codec-run").exists()                     # given, not trained inline
    assert (tmp_path / "two" / "codec.safetensors").read_bytes() == codec.read_bytes()
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x), (a, b)
    assert json.loads(two.stdout.strip().splitlines()[-1])["world_size"] == 2


def test_trains_on_a_synth_manifest(tmp_path):
    res = cli("synth", "--n", "3", "--out", str(tmp_path / "synth"), "--size", "64x64", "--seconds", "1",
              "--workdir", str(tmp_path / "work"), "-q")
    manifest = res.stdout.strip().splitlines()[-1]
    st = TrainSettings(stage="bidirectional", steps=4, save_every=4, data=manifest, **FAST)
    summary = train(st, tmp_path / "bi")
    ls = losses(tmp_path / "bi")
    assert len(ls) == 4 and all(x == x and x > 0 for x in ls)
    from models.checkpoint import read_metadata
    assert read_metadata(Path(summary["checkpoint"]) / "model.safetensors")["lineage"][-1]["data"] == manifest
    with pytest.raises(ValueError, match="reads synth manifests"):
        clips = cli("prefilter", str(tmp_path / "synth"), "--workdir", str(tmp_path / "work"), "-q").stdout
        train(TrainSettings(stage="bidirectional", steps=2, data=clips.strip().splitlines()[-1], **FAST),
              tmp_path / "bad")


def test_a_written_clips_reference_is_a_frame_away_from_its_window(tmp_path):
    """read_clip (vidu synth manifests) takes the reference where vidu embed does: the middle of the clip
    after the window, or the window's last frame for a clip of one window; never the first frame."""
    from models.config import PRESETS
    from stages.samples import reference_time
    from stages.sense.media import write_video
    from stages.train.data import read_clip
    cfg = PRESETS["tiny"]
    T, fps = cfg.video_frames, cfg.audio.fps
    levels = [8 + 6 * k for k in range(40)]                            # frame k: a flat grey of its own

    def level(frame):                                                  # which frame a decoded one is
        return int(np.argmin([abs(float(frame.mean()) - v) for v in levels]))
    for total, want in ((40, 28), (T, T - 1)):                         # 40 frames: 1.14 s, frame 17 + 23 / 2 shown
        path = write_video(tmp_path / f"{total}.mp4", (np.full((64, 64, 3), levels[k], np.uint8) for k in range(total)),
                           fps, audio=np.zeros(total * 16000 // fps, np.float32))
        c = read_clip({"path": str(path)}, cfg)
        assert [level(f) for f in c["frames"]] == list(range(T))
        assert level(c["ref"]) == want and want not in (0, *([] if total == T else range(T))), (total, want)
    assert reference_time(0.0, 40 / fps, 0.0, T, fps) == pytest.approx(28.5 / fps)


def test_a_mid_clip_instruction_reaches_the_training_batch_at_its_latent_frame():
    """World clips carry a text per latent frame: an instruction given mid-clip is read by the frames
    shown from its onset on (the first latent frame whose first video frame comes at or after it), the
    neutral prompt before; the Dataset turns them into [F, L, D] features, one row per frame."""
    from models.config import NEUTRAL_TEXT, PRESETS
    from models.encoders import TextEncoder
    from stages.samples import latent_frame_start
    from stages.synth import make_sample
    from stages.train.data import ClipSource, Dataset, clip_seed, render_clip
    cfg = PRESETS["tiny"].replace(latent_frames=25)                 # 97 frames, 3.9 s
    seed = clip_seed(0, 0)
    table, index = render_clip(seed, cfg)["text"]
    texts = [table[i] for i in index]
    sample = make_sample(seed, cfg.width, cfg.height, cfg.audio.fps, cfg.video_frames / cfg.audio.fps)
    onset, _, _, name = sample.events[0]
    assert 0 < onset < 3.0 and texts[0] == NEUTRAL_TEXT
    first = next(k for k in range(25) if latent_frame_start(k) / cfg.audio.fps >= onset - 1e-6)
    assert texts.index(name) == first and texts[first - 1] == NEUTRAL_TEXT
    ds = Dataset(ClipSource(cfg, 0, 1), 0, None, TextEncoder("minilm", max_len=cfg.dit.text_len))
    feats = ds._frame_texts((table, index))
    assert feats.shape == (25, cfg.dit.text_len, cfg.dit.text_dim)
    assert torch.equal(feats[first], ds._text(name)) and torch.equal(feats[0], ds._text(NEUTRAL_TEXT))
    assert not torch.equal(feats[first - 1], feats[first])
    # one text for the whole clip is a view of a single copy, not 25
    one = ds._frame_texts(NEUTRAL_TEXT)
    assert one.shape == feats.shape and one.stride(0) == 0


def test_stacked_clips_give_the_same_batches_as_per_sample_stacking():
    """Dataset.stack_on (the GPU run's batches as one gather) gives exactly the batches the per-sample
    path gives, across epochs and for every key; over its byte budget it keeps nothing; it needs every clip."""
    from models.config import PRESETS
    from stages.train.data import ClipSource, Dataset
    ds = Dataset(ClipSource(PRESETS["tiny"], 0, 5), 3, None, None)
    g = torch.Generator().manual_seed(0)
    ds.cache = {i: {"video": torch.randn(4, 5, 8, 8, generator=g),
                    "text": torch.randn(1, 6, 16, generator=g).expand(5, -1, -1),   # one text: a view
                    "mouth_box": torch.randint(0, 8, (5, 2), generator=g)} for i in range(4)}
    with pytest.raises(RuntimeError, match="prefetch first"):
        ds.stack_on("cpu")
    ds.cache[4] = {k: v + 1 for k, v in ds.cache[0].items()}
    plain = [ds.batch(g0, 4, "cpu") for g0 in range(0, 15, 3)]
    assert not ds.stack_on("cpu", budget=100) and ds.stacked is None
    assert ds.stack_on("cpu")
    for g0, want in zip(range(0, 15, 3), plain):
        got = ds.batch(g0, 4, "cpu")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert not torch.equal(plain[0]["video"], plain[1]["video"])       # the batches do differ


def test_condition_dropout_hits_each_condition_at_its_rate():
    from stages.train.machinery import step_generator
    from stages.train.objectives import Draw, ObjectiveSettings, drop_conditions
    n = 4000
    batch = {"text": torch.randn(n, 3, 2) + 5, "audio": torch.randn(n, 4, 2, 3) + 5, "ref": torch.randn(n, 2, 1, 2, 2) + 5}
    st = ObjectiveSettings(p_drop_text=0.1, p_drop_audio=0.3, p_drop_ref=0.5)
    out, parts = drop_conditions(batch, st, Draw(step_generator(0, 0), 0, n, n))
    for name, p in (("text", 0.1), ("audio", 0.3), ("ref", 0.5)):
        dropped = (out[name].flatten(1) == 0).all(1)
        kept = (out[name] == batch[name]).flatten(1).all(1)
        assert bool((dropped ^ kept).all())                              # a row is nulled whole or untouched
        assert abs(float(dropped.float().mean()) - p) < 4 * (p * (1 - p) / n) ** 0.5
        assert float(parts[f"drop_{name}"]) == float(dropped.float().mean())
    drops = [(out[k].flatten(1) == 0).all(1) for k in ("text", "audio", "ref")]
    assert 0 < int((drops[0] & drops[2]).sum()) < int(drops[0].sum())   # independent, not one shared draw
    none, _ = drop_conditions(batch, ObjectiveSettings(p_drop_text=0, p_drop_audio=0, p_drop_ref=0),
                              Draw(step_generator(0, 0), 0, n, n))
    assert all(torch.equal(none[k], batch[k]) for k in batch)           # control: rate 0 drops nothing


def _one_layer_tiny(seed: int = 0):
    """The tiny DiT cut to one block, attention sharpened (q/k norm gains x4: logits x16) so that RoPE
    positions change its outputs well above the float32 floor. With one block a cached chunk's keys and
    values depend on its own tokens only, so the engine's cache of a chunk equals training's."""
    import dataclasses
    from models.config import PRESETS
    from models.dit import DiT
    tiny = PRESETS["tiny"]
    cfg = tiny.replace(dit=dataclasses.replace(tiny.dit, num_layers=1))
    torch.manual_seed(seed)
    model = DiT(cfg.dit).eval()
    with torch.no_grad():
        for p in model.parameters():                      # a trained-looking model: no zero-initialised head
            p.add_(0.05 * torch.randn_like(p))
        model.blocks[0].self_attn.norm_q.weight.mul_(4)
        model.blocks[0].self_attn.norm_k.weight.mul_(4)
    return cfg, model


def test_training_positions_equal_the_engines_for_the_same_chunk_index():
    """Stage 2's sequence for chunk i ([ref | context_chunks(i) | chunk i] at positions 0, 1..m, block-causal)
    gives chunk i the output StreamEngine computes for it from the same clean history, after the window
    has wrapped; the old layout (all previous frames at their clip positions) and a wrong history do not."""
    from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings
    from stages.train.objectives import causal_forward, stream_frames, stream_sequence
    cfg, model = _one_layer_tiny()
    d, (before, after) = cfg.dit, cfg.dit.audio_context
    c, window, sink, i = 1, 3, True, 7                     # chunk 7 attends to the sink 0 and ring 4, 5, 6
    assert stream_frames(i, c, window // c, sink).tolist() == [0, 4, 5, 6, 7]
    g = torch.Generator().manual_seed(1)
    F, h = i + 1, cfg.height // 8
    ref = torch.randn(1, d.in_dim, 1, h, h, generator=g)
    texts = torch.randn(1, F, d.text_len, d.text_dim, generator=g)           # a different text per chunk
    audio = torch.randn(1, before + F + after, cfg.audio.mel_per_latent, d.audio_dim, generator=g)
    noise = torch.randn(1, d.in_dim, c, h, h, generator=g)
    noise_a = torch.randn(1, c, d.audio_latent_tokens, d.audio_latent_dim, generator=g)
    eng = StreamEngine(model, cfg, StreamSettings(chunk_frames=c, steps=1, window=window, sink=sink, twin=False))
    eng.start(ref)
    video, audio_lat = [], []
    for k in range(F):
        last = k == i
        r = eng.step(ChunkInputs(texts[:, k], audio[:, k:k + c + before + after], noise if last else None,
                                 noise_a if last else None))
        video.append(r.video)
        audio_lat.append(r.audio)
    # training: the generated chunks are the clip's clean frames (teacher forcing); chunk i at noise 1.0
    batch = {"video": torch.cat(video, 2), "ref": ref, "text": texts, "audio": audio,
             "audio_latent": torch.cat(audio_lat, 1)}
    sigma_cur = eng.sig[0]

    def predict(frames, positions=None):
        seq = stream_sequence(batch, frames, before, after)
        m = len(frames)
        sig = torch.zeros(1, m)
        sig[:, -c:] = sigma_cur
        x_t = torch.cat([seq["video"][:, :, :-c], noise], 2)
        xa_t = torch.cat([seq["audio_latent"][:, :-c], noise_a], 1)
        with torch.no_grad():
            if positions is None:
                out = causal_forward(model, seq, x_t, xa_t, sig, c)
            else:
                out = model(x_t, sig * 1000.0, seq["text"], audio=seq["audio"], audio_latent=xa_t, ref=ref,
                            mask="causal", chunk_frames=c, frame_pos=positions)
        return (x_t - sigma_cur * out.video)[:, :, -c:]

    want = video[i]
    got = predict(stream_frames(i, c, window // c, sink))
    err = float((got - want).abs().max())
    assert err < 1e-5, err
    scale = float(want.abs().mean())
    old = predict(torch.arange(F), torch.arange(1, F + 1))                     # all history, clip positions
    right_frames_wrong_positions = predict(stream_frames(i, c, window // c, sink), torch.tensor([1, 5, 6, 7, 8]))
    no_sink = predict(stream_frames(i, c, window // c, False))
    stale = predict(torch.tensor([0, 3, 4, 5, 7]))                            # a ring one chunk behind
    for mutant in (old, right_frames_wrong_positions, no_sink, stale):
        gap = float((mutant - want).abs().max())
        assert gap > 0.05 * scale and gap > 1e4 * err, (gap, err, scale)     # measured: 0.18-0.24 vs 6e-7


def test_causal_loss_streams_the_drawn_chunk_in_the_engines_layout():
    """causal_loss scores the chunk it draws with the context stream_frames gives it (the window wraps on
    a long clip), the sink clean and the ring at one noise level under diffusion forcing; every chunk's
    sequence has one length (objectives.training_frames: the first chunks' are extended)."""
    from models.config import PRESETS
    from models.dit import DiT
    from stages.train.machinery import step_generator
    from stages.train.objectives import Draw, ObjectiveSettings, causal_loss, stream_frames
    cfg = PRESETS["tiny"]
    d, F, B = cfg.dit, 13, 2
    torch.manual_seed(0)
    model = DiT(d)
    shapes = []
    model.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    g = torch.Generator().manual_seed(0)
    batch = {"video": torch.randn(B, d.in_dim, F, 8, 8, generator=g), "ref": torch.randn(B, d.in_dim, 1, 8, 8, generator=g),
             "text": torch.randn(B, F, d.text_len, d.text_dim, generator=g),
             "audio": torch.randn(B, sum(d.audio_context) + F, 16, d.audio_dim, generator=g),
             "audio_latent": torch.randn(B, F, d.audio_latent_tokens, d.audio_latent_dim, generator=g)}
    st = ObjectiveSettings(chunk_frames=1, window=3, sink=True, clip_frames=F)
    seen = set()
    for step in range(12):
        _, parts = causal_loss(model, batch, st, Draw(step_generator(0, step), 0, B, B))
        i = int(parts["chunk"])
        seen.add(i)
        assert int(parts["context_frames"]) == len(stream_frames(i, 1, 3, True)) - 1 == min(i, 4)
    assert max(seen) >= 5 and min(seen) < 4                # chunks past the wrap (context 4 < i) and before it
    assert set(shapes) == {(B, d.in_dim, 5, 8, 8)}         # ref + sink + window 3 + chunk: one shape
    with pytest.raises(ValueError, match="needs chunk_frames, window and sink"):
        causal_loss(model, batch, ObjectiveSettings(chunk_frames=1), Draw(step_generator(0, 0), 0, B, B))


def test_stage2_window_and_sink_are_the_checkpoint_record():
    from models.config import PRESETS
    from stages.train.loop import stream_objective
    from stages.train.sample import sampling_record
    small = PRESETS["small"]
    ob = stream_objective(ObjectiveSettings(chunk_frames=1), small)
    rec = sampling_record(small, "causal", ob.shift, 1, None, {})
    assert (ob.window, ob.sink) == (rec["window"], rec["sink"]) == (7, True)
    assert 1 + 1 + ob.window + 1 == 1 + small.latent_frames           # training's positions, no more
    with pytest.raises(ValueError, match="not recordable"):
        stream_objective(ObjectiveSettings(chunk_frames=1, window=8), small)
    with pytest.raises(ValueError, match="window wraps"):
        stream_objective(ObjectiveSettings(chunk_frames=1, clip_frames=9), small)
    assert stream_objective(ObjectiveSettings(chunk_frames=1, window=7, clip_frames=10), small).clip_frames == 10


def test_mouth_weight_changes_the_gradient_exactly_in_the_mouth():
    from stages.train.losses import video_loss
    g = torch.Generator().manual_seed(0)
    B, C, F, h = 2, 4, 5, 6
    x0 = torch.randn(B, C, 3, h, h, generator=g)
    mouth = torch.zeros(B, F, h, h)
    mouth[0, 2, 1:3, 2:4] = 1.0
    mouth[1, 4, 0, 5] = 0.5                                # partial coverage weighs 1 + (5 - 1) * 0.5
    frames = torch.tensor([2, 3, 4])                       # the scored frames' places in the clip
    sigma = torch.rand(B, 3, generator=g) + 0.1

    def grad(weight, batch, kind="x0"):
        x = torch.randn(B, C, 3, h, h, generator=torch.Generator().manual_seed(1)).requires_grad_()
        loss, _ = video_loss(x, x0, sigma, batch, frames, ObjectiveSettings(mouth_weight=weight, loss_weight=kind))
        loss.backward()
        return x.grad
    g1, g5 = grad(1.0, {"mouth": mouth}), grad(5.0, {"mouth": mouth})
    changed = (g5 != g1).any(1)                             # [B, 3, h, h]
    assert torch.equal(changed, mouth[:, frames] > 0)
    torch.testing.assert_close(g5, g1 * (1 + 4 * mouth[:, frames])[:, None], rtol=1e-6, atol=0)
    assert torch.equal(grad(5.0, {}), g1)                  # control: a clip without masks weighs 1
    gv = grad(1.0, {}, "v")                                 # the v loss: x0 error / sigma^2
    torch.testing.assert_close(gv, g1 / sigma[:, None, :, None, None] ** 2, rtol=1e-5, atol=0)
    # the eyes region weighs the same way, and on pixels of both regions the weights multiply
    eyes = torch.zeros(B, F, h, h)
    eyes[0, 2, 2, 3:6] = 1.0                               # overlaps the mouth at (2, 3)
    eyes[1, 3, 4, 4] = 0.25
    x = torch.randn(B, C, 3, h, h, generator=torch.Generator().manual_seed(1)).requires_grad_()
    loss, parts = video_loss(x, x0, sigma, {"mouth": mouth, "eyes": eyes}, frames,
                             ObjectiveSettings(mouth_weight=5.0, eyes_weight=3.0, loss_weight="x0"))
    loss.backward()
    w = (1 + 4 * mouth[:, frames]) * (1 + 2 * eyes[:, frames])
    torch.testing.assert_close(x.grad, g1 * w[:, None], rtol=1e-6, atol=0)
    assert float(w[0, 0, 2, 3]) == 15.0 and set(parts) >= {"mouth_share", "eyes_share"}
    assert ObjectiveSettings(mouth_weight=1.0, eyes_weight=3.0).needs_masks
    assert not ObjectiveSettings(mouth_weight=1.0).needs_masks   # nothing asks for regions: none rendered


def test_world_clips_carry_the_mouth_at_latent_resolution():
    from models.config import PRESETS
    from stages.train.data import clip_seed, latent_regions, render_clip
    mask = np.zeros((9, 32, 32), np.float32)               # 9 video frames: latent frames {0}, {1-4}, {5-8}
    mask[6, 17, 9] = 0.75
    lat = latent_regions(mask, 4, 8)
    assert lat.shape == (3, 4, 4) and float(lat[2, 2, 1]) == 0.75 and float(lat.sum()) == 0.75
    with pytest.raises(ValueError, match="do not group"):
        latent_regions(mask[:8], 4, 8)
    cfg = PRESETS["tiny"].replace(latent_frames=9)
    c = render_clip(clip_seed(0, 0), cfg, masks=True)
    m = c["mouth"]
    assert m.shape == (9, cfg.height // 8, cfg.width // 8)
    assert 0 < float((m > 0).float().mean()) < 0.25        # a mouth, not the frame
    e = c["eyes"]                                           # the eyes: as small, elsewhere in the frame
    assert e.shape == m.shape and 0 < float((e > 0).float().mean()) < 0.25
    rows = lambda r: torch.nonzero(r.amax((0, 2)) > 0).flatten().float().mean()   # noqa: E731  mean row covered
    assert rows(e) < rows(m)                                # above the mouth
    assert "mouth" not in render_clip(clip_seed(0, 0), cfg)  # control: no masks asked, none rendered
    assert c["mouth_box"].shape == (9, 2)                   # and the sync loss's crop corners, in the latent
    assert int(c["mouth_box"].min()) >= 0 and int(c["mouth_box"].max()) <= cfg.height // 8 - 4


def test_the_sync_loss_adds_the_discriminators_term_on_rows_that_hear_speech(tmp_path):
    """video_loss with sync_weight w = the plain loss + w * lipsync.sync_loss (the oracle), computed
    only on rows that hear speech: a row whose speech was dropped changes nothing; asking for it
    without a discriminator or without mouth boxes is an error, not a silent no-op."""
    from models.config import PRESETS
    from stages.train.lipsync import LipSync, LipSyncConfig, save_lipsync, sync_loss
    from stages.train.losses import video_loss
    cfg = PRESETS["tiny"]
    lc = LipSyncConfig.for_model(cfg)
    torch.manual_seed(0)
    path = str(save_lipsync(tmp_path / "lipsync.safetensors", LipSync(lc)))
    g = torch.Generator().manual_seed(0)
    B, F, h = 3, 5, cfg.height // 8
    before, after = cfg.dit.audio_context
    x0 = torch.randn(B, 16, F, h, h, generator=g)
    x = torch.randn(B, 16, F, h, h, generator=g)
    audio = torch.randn(B, before + F + after, 16, 80, generator=g)
    audio[2] = 0                                            # row 2's speech was dropped
    boxes = torch.randint(0, h - lc.crop + 1, (B, F, 2), generator=g)
    sigma, frames = torch.full((B, F), 0.3), torch.arange(F)
    batch = {"audio": audio, "mouth_box": boxes}
    plain, _ = video_loss(x, x0, sigma, batch, frames, ObjectiveSettings())
    st = ObjectiveSettings(sync_weight=0.5, lipsync=path)
    synced, parts = video_loss(x, x0, sigma, batch, frames, st)
    from stages.train.losses import discriminator
    oracle = sync_loss(x[:2], audio[:2], boxes[:2], discriminator(path, "cpu"), frames)
    torch.testing.assert_close(synced, plain + 0.5 * oracle, rtol=1e-6, atol=0)
    torch.testing.assert_close(parts["loss_sync"], oracle)
    assert float(oracle) > 0
    x2 = x.clone()
    x2[2] += 1.0                                            # the deaf row: only its video term moves
    moved, _ = video_loss(x2, x0, sigma, batch, frames, st)
    plain2, _ = video_loss(x2, x0, sigma, batch, frames, ObjectiveSettings())
    torch.testing.assert_close(moved - plain2, synced - plain, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs a lip-sync discriminator"):
        video_loss(x, x0, sigma, batch, frames, ObjectiveSettings(sync_weight=0.5))
    with pytest.raises(ValueError, match="mouth boxes"):
        video_loss(x, x0, sigma, {"audio": audio}, frames, st)


def test_a_mid_stream_instruction_in_a_long_clip_reaches_the_stage2_sequence():
    """An 8 s world clip (stage 2's clip_frames) with its instruction given mid-clip: the sequence of the
    chunk where it starts reads it in the chunk and the neutral prompt in the sink; a later chunk, whose
    window has wrapped past the onset, reads it in the ring too."""
    from models.config import NEUTRAL_TEXT, PRESETS
    from stages.train.data import ClipSource, Dataset
    from stages.train.objectives import stream_frames, stream_sequence
    cfg = PRESETS["tiny"]
    st = ObjectiveSettings()
    data_cfg = cfg.replace(latent_frames=st.clip_frames)
    assert data_cfg.video_frames / cfg.audio.fps >= 8.0
    def encode(texts):                                                     # distinct features per text
        return [torch.tensor(list(t.encode()), dtype=torch.float32)[:, None].expand(-1, cfg.dit.text_dim) for t in texts]
    source = ClipSource(data_cfg, 0, 2)
    ds = Dataset(source, 0, None, encode)
    table, index = source(0)["text"]
    k = next(f for f in range(1, len(index)) if index[f] != index[0])     # first frame of a mid-clip text
    assert table[index[0]] == NEUTRAL_TEXT and 4 < k < st.clip_frames - 8
    name = table[index[k]]
    text = ds._frame_texts((table, index))[None]                            # [1, F, L, D], as Dataset.sample
    batch = {"video": torch.zeros(1, 1, st.clip_frames, 1, 1), "ref": None, "text": text}
    at = stream_sequence(batch, stream_frames(k, 1, 3, True), 0, 0)["text"][0]
    assert not torch.equal(ds._text(name), ds._text(NEUTRAL_TEXT))
    assert torch.equal(at[-1], ds._text(name)) and torch.equal(at[0], ds._text(NEUTRAL_TEXT))
    assert torch.equal(at[-2], ds._text(NEUTRAL_TEXT))                       # the frame before the onset
    later = stream_sequence(batch, stream_frames(k + 3, 1, 3, True), 0, 0)["text"][0]
    assert torch.equal(later[0], ds._text(NEUTRAL_TEXT))                     # the sink: before the onset
    assert all(torch.equal(later[j], ds._text(name)) for j in (2, 3, 4))     # ring k+1, k+2 and the chunk


def test_ema_warm_up_follows_its_formula():
    from stages.train.machinery import ema_decay, ema_update
    assert [ema_decay(s, 0.999) for s in (0, 1, 10, 990, 10000)] == [0.1, 2 / 11, 11 / 20, 991 / 1000, 0.999]
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = {"weight": torch.ones(1, 1)}                      # the init
    for step in range(200):
        ema_update(ema, model, ema_decay(step, 0.999))
    init_share = float(ema["weight"])                       # what is left of the init after 200 steps
    assert abs(init_share - torch.tensor([ema_decay(s, 0.999) for s in range(200)], dtype=torch.float64).prod()) < 1e-6
    assert init_share < 0.01 and 0.999 ** 200 > 0.8          # control: a fixed 0.999 would keep 82 % of it


def test_a_run_with_the_sync_loss_renders_mouth_boxes_and_logs_it(tmp_path):
    from models.config import PRESETS
    from stages.train.lipsync import LipSync, LipSyncConfig, save_lipsync
    torch.manual_seed(0)
    path = save_lipsync(tmp_path / "lipsync.safetensors", LipSync(LipSyncConfig.for_model(PRESETS["tiny"])))
    ob = ObjectiveSettings(sync_weight=0.1, lipsync=str(path), mouth_weight=1.0)   # boxes for the sync loss alone
    train(TrainSettings(stage="bidirectional", steps=2, save_every=2, objective=ob, **{**FAST, "samples": 4}),
          tmp_path / "run", tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(r["loss_sync"] > 0 for r in logged)


def test_prefetched_clips_equal_the_ones_coded_one_at_a_time():
    """Dataset.prefetch (workers render the clips and their audio features; this process codes them,
    uint8 frames moved to the codec's device before conversion) gives exactly `sample`'s tensors."""
    from models.config import PRESETS
    from models.taehv import TAEHV
    from stages.train.data import ClipSource, Dataset
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    codec = TAEHV(cfg.taehv).eval()

    def texts(batch):
        return [torch.full((3, cfg.dit.text_dim), float(len(t))) for t in batch]
    one = Dataset(ClipSource(cfg, 5, 2, masks=True), 0, codec, texts)
    want = [one.sample(i) for i in range(2)]
    ahead = Dataset(ClipSource(cfg, 5, 2, masks=True), 0, codec, texts)
    ahead.prefetch(1)
    assert sorted(ahead.cache) == [0, 1]
    for i, w in enumerate(want):
        got = ahead.cache[i]
        assert got.keys() == w.keys() and {"video", "audio", "mouth", "text"} <= set(got)
        for k in w:
            assert torch.equal(got[k], w[k]), k
    assert not torch.equal(want[0]["audio"], want[1]["audio"])      # two different clips: the check can fail


def test_overlapped_prefetch_trains_on_clips_due_and_its_batches_depend_on_g_alone(monkeypatch):
    """Dataset.prefetch(background=True) returns once the first clips are coded and renders the rest in a
    thread; with `fill`, sample g is drawn from the clips due by g (first, then one more every `overlap` samples) and a
    late clip is waited for, so the batches equal those of clips coded one at a time with the same
    schedule; after the fill, the epochs' permutations resume. A failing clip is reported, not hung on."""
    from models.config import PRESETS
    from models.taehv import TAEHV
    from stages.train import data as data_mod
    from stages.train.data import ClipSource, Dataset
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    codec = TAEHV(cfg.taehv).eval()

    def texts(batch):
        return [torch.full((3, cfg.dit.text_dim), float(len(t))) for t in batch]
    n, first, per = 6, 2, 3
    filling = (n - first) * per
    plain = Dataset(ClipSource(cfg, 5, n, masks=True), 4, codec, texts)
    one = Dataset(ClipSource(cfg, 5, n, masks=True), 4, codec, texts)
    one.fill = (first, per)
    drawn = [one.index(g) for g in range(filling)]
    assert all(0 <= i < first + g // per for g, i in enumerate(drawn))          # only clips due by g
    assert len(set(drawn)) >= 4 and max(drawn) >= first                         # late clips are drawn too
    assert [one.index(filling + g) for g in range(2 * n)] == [plain.index(g) for g in range(2 * n)]
    ahead = Dataset(ClipSource(cfg, 5, n, masks=True), 4, codec, texts)
    ahead.fill = (first, per)
    ahead.prefetch(1, background=True)
    try:
        assert {0, 1} <= set(ahead.cache) and ahead.fill == (first, per)
        for g0 in range(0, filling + n, 4):
            got, want = ahead.batch(g0, 4, "cpu"), one.batch(g0, 4, "cpu")
            # the same clips (coded in a thread beside this one, the codec's last float bits may differ)
            same = [torch.allclose(got[k].float(), want[k].float(), rtol=0, atol=1e-5) for k in want]
            assert all(same), (g0, [k for k, ok in zip(want, same) if not ok])
        ahead.wait(n - 1)
        assert ahead.rendered()
    finally:
        ahead.close()
    # a clip that fails in the thread is told to the loop waiting for it
    real = data_mod.encode_clip
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("clip 2 broke")
        return real(*a, **k)
    monkeypatch.setattr(data_mod, "encode_clip", flaky)
    broken = Dataset(ClipSource(cfg, 5, 4, masks=True), 4, codec, texts)
    broken.prefetch(1, background=True)
    try:
        with pytest.raises(RuntimeError, match="rendering the training clips failed: clip 2 broke"):
            broken.sample(3)
    finally:
        broken.close()


def test_a_run_training_while_its_clips_render_equals_the_same_schedule_coded_in_process(tmp_path):
    """TrainSettings.render_overlap: the loop starts once a batch of clips is coded and trains while
    the rest render; the draws are the schedule's, so the run equals one with no workers (every clip
    coded here when first drawn), and differs from the run that renders every clip first."""
    st = TrainSettings(stage="bidirectional", steps=6, save_every=6, render_overlap=2, **dict(FAST, samples=8))
    beside = train(st, tmp_path / "beside", prefetch=1)
    here = train(st, tmp_path / "here")
    first = train(dataclasses.replace(st, render_overlap=0), tmp_path / "first", prefetch=1)
    a, b, c = losses(tmp_path / "beside"), losses(tmp_path / "here"), losses(tmp_path / "first")
    assert beside["steps"] == here["steps"] == first["steps"] == 6
    # (relative: clips coded in a worker or here may differ in the last float bits; render-first: ~11 %)
    assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) < 1e-5
    assert max(abs(x - y) / abs(y) for x, y in zip(a, c)) > 1e-2


def test_a_ref_pose_share_of_clips_gets_a_posed_reference_and_nothing_else_changes():
    from models.config import PRESETS
    from stages import synth
    from stages.train.data import ClipSource, clip_seed, reference_state, render_clip
    assert all(reference_state(s, 0.0) == synth.State() for s in range(200))       # the default: neutral, as before
    posed = [reference_state(s, 1.0) for s in range(200)]
    assert all(p != synth.State() for p in posed) and posed == [reference_state(s, 1.0) for s in range(200)]
    yaw = np.array([p.yaw for p in posed])
    assert yaw.min() < -0.8 and yaw.max() > 0.8 and all(0 <= p.mouth <= 1 and 0.3 <= p.eyes <= 1 for p in posed)
    share = np.mean([reference_state(s, 0.3) != synth.State() for s in range(1000)])
    assert 0.25 < share < 0.35                                                       # its share of the seeds
    cfg = PRESETS["tiny"].replace(latent_frames=3)
    seed = next(s for s in range(100) if abs(reference_state(clip_seed(0, s), 1.0).yaw) > 0.5)
    a, b = render_clip(clip_seed(0, seed), cfg), ClipSource(cfg, 0, seed + 1, ref_pose=1.0)(seed)
    assert np.array_equal(a["frames"], b["frames"]) and np.array_equal(a["audio"], b["audio"]) and a["text"] == b["text"]
    s = synth.make_sample(clip_seed(0, seed), width=cfg.width, height=cfg.height, fps=cfg.audio.fps,
                          seconds=cfg.video_frames / cfg.audio.fps, cut_actions=True)
    assert np.array_equal(a["ref"], synth.render(s.identity, synth.State(), cfg.width, cfg.height, s.scene))
    assert np.abs(a["ref"].astype(int) - b["ref"]).mean() > 1.0                    # the posed reference differs
    with pytest.raises(ValueError, match="manifest's clips bring their own"):
        ClipSource(cfg, 0, 1, manifest="clips.parquet", ref_pose=0.5)               # refused before reading it
    state = reference_state(clip_seed(0, seed), 1.0)                               # the world reads its turn
    m = synth.analyze(np.stack([synth.render(s.identity, x, 256, 256, s.scene) for x in (synth.State(), state)]),
                      s.identity)
    assert np.sign(m["yaw"][1] - m["yaw"][0]) == np.sign(state.yaw) and abs(m["yaw"][1] - m["yaw"][0]) > 0.3


def test_the_objectives_ref_pose_reaches_the_runs_clips(tmp_path, monkeypatch):
    import stages.train.loop as loop
    seen = []

    def built(cfg, st, out, d, prepare_codec, masks=False, ref_pose=0.0):
        seen.append(ref_pose)
        raise RuntimeError("built")
    monkeypatch.setattr(loop, "build_dataset", built)
    for share in (0.4, 0.0):
        with pytest.raises(RuntimeError, match="built"):
            train(TrainSettings(stage="bidirectional", preset="tiny", steps=1, objective=ObjectiveSettings(ref_pose=share)),
                  tmp_path / str(share))
    assert seen == [0.4, 0.0]
