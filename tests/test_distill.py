"""Stage 3 (issue 17): the student's self-rollout is the streaming engine's own generation in a training
mode, and the DMD generator gradient and critic loss on the tiny preset."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from models.config import PRESETS
from models.dit import DiT
from stages.distill.dmd import DMDSettings, critic_loss, generator_loss
from stages.distill.rollout import self_rollout
from stages.stream import engine as engine_mod
from stages.stream.engine import ChunkInputs, StreamEngine, StreamSettings
from stages.train.objectives import Draw, ObjectiveSettings, causal_loss

TINY = PRESETS["tiny"].replace(height=32, width=32)
# 3 x0-and-renoise steps, noisy cache at step 1, sink + a window of 2 chunks: 5 chunks wrap the ring
ST = StreamSettings(chunk_frames=1, steps=3, window=2, sink=True, twin=True, noisy_step=1, sampler="renoise")
CHUNKS = 5


def scrambled(seed=0) -> DiT:
    torch.manual_seed(seed)
    m = DiT(TINY.dit).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return m


def conditions(chunks=CHUNKS, batch=1, seed=3):
    g = torch.Generator().manual_seed(seed)
    d = TINY.dit
    text = torch.randn(batch, 5, d.text_dim, generator=g)
    audio = torch.randn(batch, chunks + sum(d.audio_context), 16, d.audio_dim, generator=g)
    ref = torch.randn(batch, d.in_dim, 1, TINY.height // 8, TINY.width // 8, generator=g)
    return ref, text, audio


def streamed(model, st, chunks=CHUNKS, seed=0):
    """What `vidu stream` runs: StreamEngine.step chunk by chunk (stages/stream/session.py)."""
    ref, text, audio = conditions(chunks)
    eng = StreamEngine(model, TINY, st, seed=seed)
    eng.start(ref)
    ctx = sum(TINY.dit.audio_context)
    outs = [eng.step(ChunkInputs(text, audio[:, j:j + 1 + ctx])) for j in range(chunks)]
    return torch.cat([o.video for o in outs], 2), torch.cat([o.audio for o in outs], 1)


CLEAN = StreamSettings(chunk_frames=1, steps=3, window=3, sink=False, twin=False)


@pytest.mark.parametrize("st, grad", [(ST, True), (ST, False), (CLEAN, False)], ids=["twin-sink-grad", "twin-sink",
                                                                                   "clean-nosink"])
def test_rollout_with_all_steps_is_what_vidu_stream_generates(st, grad):
    model = scrambled()
    want_v, want_a = streamed(model, st, seed=7)
    with torch.set_grad_enabled(grad):
        v, a = self_rollout(model, TINY, st, *conditions(), CHUNKS, seed=7)
        last = self_rollout(model, TINY, st, *conditions(), CHUNKS, exits=[st.steps - 1] * CHUNKS, seed=7)[0]
    assert v.requires_grad == grad
    assert torch.equal(v.detach(), want_v) and torch.equal(a.detach(), want_a)     # bit for bit
    assert torch.equal(last.detach(), want_v)
    if not grad:
        other = self_rollout(model, TINY, st, *conditions(), CHUNKS, exits=[1] * CHUNKS, seed=7)[0]
        assert (other - want_v).abs().max() > 1e-2                     # an earlier exit is another sample


RECACHE = dataclasses.replace(ST, recache=True)
# the switch comes at chunk 4: the ring (window 2) then holds chunks 2 and 3, and chunk 3 was made over chunk 1,
# gone since, so a recache changes the history even under the same text (at chunk 3 it would not: nothing left yet)
AT = 4


def switching_texts(switches: list[bool], at: int = AT, seed: int = 5) -> torch.Tensor:
    """Per-frame texts [B, CHUNKS, L, D] (chunks of one frame): row i's text changes at chunk `at` if switches[i]."""
    g = torch.Generator().manual_seed(seed)
    old, new = (torch.randn(len(switches), 5, TINY.dit.text_dim, generator=g) for _ in range(2))
    text = old[:, None].repeat(1, CHUNKS, 1, 1)
    for i, s in enumerate(switches):
        if s:
            text[i, at:] = new[i]
    return text


def test_a_rollout_with_recache_is_vidu_streams_recache_at_the_switch():
    """LongLive's training with recache: a rollout whose text switches at chunk AT recaches the history first,
    as the stream's session does at an instruction switch (bit for bit); without recache it is another sample."""
    model = scrambled()
    ref, _, audio = conditions()
    text = switching_texts([True])
    eng = StreamEngine(model, TINY, RECACHE, seed=7)
    eng.start(ref)
    ctx, outs = sum(TINY.dit.audio_context), []
    with torch.no_grad():
        for j in range(CHUNKS):
            if j == AT:
                eng.recache(text[:, j])
            outs.append(eng.step(ChunkInputs(text[:, j], audio[:, j:j + 1 + ctx])).video)
        v = self_rollout(model, TINY, RECACHE, ref, text, audio, CHUNKS, seed=7)[0]
        plain = self_rollout(model, TINY, ST, ref, text, audio, CHUNKS, seed=7)[0]
    assert torch.equal(v, torch.cat(outs, 2))
    assert torch.equal(v[:, :, :AT], plain[:, :, :AT]) and (v[:, :, AT:] - plain[:, :, AT:]).abs().max() > 1e-3


def test_a_batched_rollout_recaches_only_the_rows_that_switched():
    """Row 0 switches at chunk AT, row 1 never: row 1 is what it is in a rollout where nothing switches, row 0
    what it is where both switch; recaching every row (the mutant) moves row 1."""
    model = scrambled()
    ref, _, audio = conditions(batch=2)
    one, both, none = (switching_texts(s) for s in ([True, False], [True, True], [False, False]))
    with torch.no_grad():
        v_one, v_both, v_none = (self_rollout(model, TINY, RECACHE, ref, t, audio, CHUNKS, seed=7)[0]
                                 for t in (one, both, none))
        eng = StreamEngine(model, TINY, RECACHE, batch=2, seed=7)     # the mutant: every row recached
        eng.start(ref)
        ctx, outs = sum(TINY.dit.audio_context), []
        for j in range(CHUNKS):
            if j == AT:
                eng.recache(one[:, j])
            outs.append(eng.step(ChunkInputs(one[:, j], audio[:, j:j + 1 + ctx])).video)
    assert torch.equal(v_one[1], v_none[1]) and torch.equal(v_one[0], v_both[0])
    assert (v_one[0] - v_none[0]).abs().max() > 1e-3                  # the switch shows in row 0
    assert torch.equal(torch.cat(outs, 2)[0], v_one[0]) and (torch.cat(outs, 2)[1, :, AT:] - v_one[1, :, AT:]).abs().max() > 1e-4


EXITS = [2, 0, 1, 2, 0]     # exits before, at and after the noisy step (1)


def rollout_grads(model, exits=EXITS):
    """(each chunk's video, the engine) of a rollout with gradients on, chunk by chunk."""
    ref, text, audio = conditions()
    eng = StreamEngine(model, TINY, ST, seed=1)
    eng.start(ref)
    ctx = sum(TINY.dit.audio_context)
    with torch.enable_grad():
        results = [eng.advance(ChunkInputs(text, audio[:, j:j + 1 + ctx]), exits[j]) for j in range(CHUNKS)]
    return results, eng


def check_gradient_paths(model, exits=EXITS):
    """The gradient of each chunk reaches the weights through its exit step only: the state fed to the
    exit step is a constant, and no chunk's output depends on an earlier one's graph."""
    results, eng = rollout_grads(model, exits)
    for s in ("clean", "noisy"):
        assert not any(k.requires_grad for k in eng.buffers.k[s] + eng.buffers.v[s])
    for j, r in enumerate(results):
        assert r.video.requires_grad and r.audio.requires_grad
        assert len(r.states) == exits[j] + 1
        assert not any(x.requires_grad for x in r.states)
        if j:
            earlier = [q.video for q in results[:j]]
            assert all(g is None for g in torch.autograd.grad(r.video.sum(), earlier, retain_graph=True,
                                                              allow_unused=True))
    # the exit step's x0 = x_k - s_k v(x_k): its gradient is that of one forward at the exit state
    j = 3
    w = torch.randn_like(results[j].video)
    g = torch.autograd.grad((results[j].video * w).sum(), list(model.parameters()), allow_unused=True)
    assert sum(float(x.abs().sum()) for x in g if x is not None) > 0
    return results


def test_the_gradient_flows_through_the_exit_step_alone_and_history_is_detached():
    model = scrambled()
    results = check_gradient_paths(model)
    with torch.no_grad():                    # the values are the engine's, exits or not
        again, _ = rollout_grads(model)
    for r, q in zip(results, again):
        assert torch.equal(r.video.detach(), q.video)


def test_the_gradient_path_checks_catch_mutants(monkeypatch):
    model = scrambled()
    with monkeypatch.context() as m:         # every step records gradients, not the exit step alone
        m.setattr(engine_mod, "_records_grad", lambda k, exit_step: True)
        with pytest.raises(AssertionError):
            check_gradient_paths(model)
    write = StreamEngine._write_history
    with monkeypatch.context() as m:         # the history keeps its graph
        m.setattr(StreamEngine, "_write_history", lambda self, *a: torch.enable_grad()(write)(self, *a))
        with pytest.raises(AssertionError):
            check_gradient_paths(model)
    with monkeypatch.context() as m:         # the exit step ignored: every chunk runs all steps
        denoise = engine_mod.denoise_chunk
        m.setattr(engine_mod, "denoise_chunk", lambda *a: denoise(*a[:12], None, *a[13:]) if len(a) >= 13 else denoise(*a))
        with pytest.raises(AssertionError):
            check_gradient_paths(model)


# --- DMD (eq. 6) ---------------------------------------------------------------------------------------


OBJ = ObjectiveSettings(chunk_frames=1, window=ST.window, sink=ST.sink)


def draw(seed=5, batch=2):
    return Draw(torch.Generator().manual_seed(seed), 0, batch, batch)


@pytest.fixture(scope="module")
def teacher_clip():
    """A scrambled teacher, a clip of batch 2 it streams (the student before distillation) and its
    conditions as a training batch."""
    teacher = scrambled()
    ref, text, audio = conditions(batch=2)
    with torch.no_grad():
        v, a = self_rollout(teacher, TINY, ST, ref, text, audio, CHUNKS, seed=2)
    return teacher, v, a, {"ref": ref, "text": text, "audio": audio}


def student_clip(teacher_clip):
    """The clip as leaves that collect gradients."""
    _, v, a, batch = teacher_clip
    return v.clone().requires_grad_(), a.clone().requires_grad_(), batch


def dmd_grads(teacher_clip, critic, st, seed=5):
    teacher = teacher_clip[0]
    v, a, batch = student_clip(teacher_clip)
    loss, parts = generator_loss(teacher, critic, batch, v, a, OBJ, st, draw(seed))
    gv, ga = torch.autograd.grad(loss, [v, a])
    return gv, ga, int(parts["chunk"]), parts


def test_the_generator_gradient_vanishes_when_the_critic_is_the_teacher(teacher_clip):
    teacher = teacher_clip[0]
    gv, ga, _, parts = dmd_grads(teacher_clip, copy.deepcopy(teacher), DMDSettings(guidance=1.0))
    assert float(gv.abs().max()) == 0.0 and float(ga.abs().max()) == 0.0 and float(parts["loss_dmd"]) == 0.0
    gv, _, i, parts = dmd_grads(teacher_clip, copy.deepcopy(teacher), DMDSettings(guidance=3.0))   # guided
    guided = float(gv[:, :, i].abs().max())
    assert guided > 0 and float(parts["guided"]) == 1.0
    # guidance restricted to a band (levels 0..0) that no drawn level (>= min_level 0.02) is in: unguided
    outside = DMDSettings(guidance=3.0, guidance_min_level=0.0, guidance_max_level=0.0)
    gv, _, _, parts = dmd_grads(teacher_clip, copy.deepcopy(teacher), outside)
    # v_u + 1 (v_c - v_u) from a forward of 2B rows: v_c to float rounding (measured 6e-9, 1e-6 of guided)
    assert float(parts["guided"]) == 0.0 and float(gv.abs().max()) < 1e-4 * guided


@pytest.mark.parametrize("shift", [0.05, -0.05])
def test_the_generator_gradient_moves_samples_against_the_critics_shift(teacher_clip, shift):
    """A critic whose x0 is the teacher's + s * shift (its velocity bias lowered by `shift`) models
    samples shifted by that much: the gradient on the scored chunk is (fake - real) / mean |x - real|,
    uniform with the shift's sign (a descent step removes it), and zero on every other frame."""
    critic = copy.deepcopy(teacher_clip[0])
    with torch.no_grad():
        critic.head.head.bias -= shift
    gv, ga, i, _ = dmd_grads(teacher_clip, critic, DMDSettings(guidance=1.0))
    chunk = gv[:, :, i]
    assert float(ga.abs().max()) == 0.0                                    # the audio head agrees
    assert float(gv[:, :, [f for f in range(CHUNKS) if f != i]].abs().max()) == 0.0
    assert bool((torch.sign(chunk) == (1 if shift > 0 else -1)).all())
    per_sample = chunk.flatten(1)
    spread = (per_sample.max(1).values - per_sample.min(1).values) / per_sample.abs().mean(1)
    assert float(spread.max()) < 1e-3        # uniform to float rounding (measured 1.3e-4: x_t - s v in fp32)


def test_the_critic_loss_is_the_teachers_flow_loss_on_the_students_clip(teacher_clip):
    critic = copy.deepcopy(teacher_clip[0])
    v, a, batch = student_clip(teacher_clip)
    loss, _ = critic_loss(critic, batch, v, a, OBJ, draw(9))
    nodrop = ObjectiveSettings(chunk_frames=1, window=ST.window, sink=ST.sink, p_drop_text=0, p_drop_audio=0,
                               p_drop_ref=0)
    want, _ = causal_loss(critic, {**batch, "video": v.detach(), "audio_latent": a.detach()}, nodrop, draw(9))
    assert torch.equal(loss, want)
    loss.backward()
    assert v.grad is None and a.grad is None                               # the student is not trained by it
    assert sum(float(p.grad.abs().sum()) for p in critic.parameters() if p.grad is not None) > 0


def whole_grads(teacher_clip, critic, st, seed=5, frames=CHUNKS):
    v, a, batch = student_clip(teacher_clip)
    loss, parts = generator_loss(teacher_clip[0], critic, batch, v, a, OBJ, st, draw(seed), whole=frames)
    gv, ga = torch.autograd.grad(loss, [v, a])
    return gv, ga, parts


def test_whole_clip_scores_see_every_frame_and_move_every_frame(teacher_clip):
    """A bidirectional teacher's DMD (dmd.py `whole`): the scores read the whole clip (frame 0's x0 moves
    with the last frame, where the causal score's does not), the gradient vanishes when the critic is the
    teacher, and a critic shifted by +-0.05 moves every frame, uniformly, against the shift."""
    from stages.distill.dmd import score_x0
    teacher, v, a, batch = teacher_clip
    seq = {**batch, "video": v, "audio_latent": a}
    s = torch.full((2,), 0.5)
    x_t = torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
    late = x_t.clone()
    late[:, :, -1] += 1.0
    with torch.no_grad():
        whole = [score_x0(teacher, seq, x, a, s, None)[0][:, :, 0] for x in (x_t, late)]
        causal = [score_x0(teacher, seq, x, a, s[:, None].expand(2, CHUNKS), 1)[0][:, :, 0] for x in (x_t, late)]
    assert float((whole[0] - whole[1]).abs().max()) > 1e-3
    assert torch.equal(causal[0], causal[1])                              # control: block-causal, frame 0 is blind
    gv, ga, parts = whole_grads(teacher_clip, copy.deepcopy(teacher), DMDSettings(guidance=1.0))
    assert float(gv.abs().max()) == 0.0 and float(ga.abs().max()) == 0.0 and float(parts["loss_dmd"]) == 0.0
    for shift in (0.05, -0.05):
        critic = copy.deepcopy(teacher)
        with torch.no_grad():
            critic.head.head.bias -= shift
        gv, ga, _ = whole_grads(teacher_clip, critic, DMDSettings(guidance=1.0))
        assert float(ga.abs().max()) == 0.0
        assert bool((torch.sign(gv) == (1 if shift > 0 else -1)).all())      # every frame, the shift's sign
        per_sample = gv.flatten(1)
        spread = (per_sample.max(1).values - per_sample.min(1).values) / per_sample.abs().mean(1)
        assert float(spread.max()) < 1e-3
    # a teacher trained on clips of 3 latent frames scores windows of 3: the gradient stays inside one
    gv, ga, parts = whole_grads(teacher_clip, critic, DMDSettings(guidance=1.0), frames=3)
    a = int(parts["chunk"])
    inside = [f in range(a, a + 3) for f in range(CHUNKS)]
    assert 0 <= a <= CHUNKS - 3 and bool((gv[:, :, torch.tensor(inside)] != 0).all())
    assert float(gv[:, :, ~torch.tensor(inside)].abs().max()) == 0.0
    starts = {int(whole_grads(teacher_clip, critic, DMDSettings(guidance=1.0), seed, 3)[2]["chunk"]) for seed in range(8)}
    assert len(starts) > 1                                                 # the window's start is drawn


def test_the_whole_critic_loss_is_stage_1s_flow_loss_on_the_students_clip(teacher_clip):
    """The critic of a bidirectional teacher learns windows of the student's clips (the teacher's clip length,
    drawn first) with stage 1's flow loss; a window as long as the clip is the clip."""
    from stages.distill.dmd import window
    from stages.train.objectives import bidirectional_loss
    critic = copy.deepcopy(teacher_clip[0])
    v, a, batch = student_clip(teacher_clip)
    clip = {**batch, "video": v.detach(), "audio_latent": a.detach()}
    nodrop = dataclasses.replace(OBJ, p_drop_text=0, p_drop_audio=0, p_drop_ref=0)
    other, _ = critic_loss(critic, batch, v, a, OBJ, draw(9))
    for frames in (CHUNKS, 3):
        loss, _ = critic_loss(critic, batch, v, a, OBJ, draw(9), whole=frames)
        d = draw(9)
        cut, start = window(clip, frames, d, TINY.dit.audio_context)
        assert cut["video"].shape[2] == frames and torch.equal(cut["video"], v.detach()[:, :, start:start + frames])
        assert torch.equal(loss, bidirectional_loss(critic, cut, nodrop, d)[0])
        assert not torch.equal(loss, other)                              # stage 1's loss, not stage 2's
    assert v.grad is None
    full, _ = window(clip, CHUNKS, draw(9), TINY.dit.audio_context)
    assert torch.equal(full["video"], v.detach()) and torch.equal(full["audio"], batch["audio"])


def test_a_generator_step_trains_the_student_through_its_rollout_only():
    teacher = scrambled()
    student, critic = copy.deepcopy(teacher), copy.deepcopy(teacher)
    with torch.no_grad():
        critic.head.head.bias -= 0.05
    for p in [*teacher.parameters(), *critic.parameters()]:
        p.requires_grad_(False)
    ref, text, audio = conditions(batch=2)
    with torch.enable_grad():
        v, a = self_rollout(student, TINY, ST, ref, text, audio, CHUNKS, exits=EXITS, seed=2)
        loss, _ = generator_loss(teacher, critic, {"ref": ref, "text": text, "audio": audio}, v, a, OBJ,
                                 DMDSettings(guidance=3.0), draw())
    loss.backward()
    assert float(loss.detach()) > 0
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in [*teacher.parameters(), *critic.parameters()])


# --- `vidu distill` ------------------------------------------------------------------------------------

def tiny_teacher(folder) -> tuple:
    """A tiny causal teacher checkpoint (scrambled weights) at folder/causal/ema.safetensors, with an untrained
    autoencoder as its codec (folder/codec.safetensors): (its path, the model)."""
    from models.checkpoint import save_model, save_taehv
    from models.taehv import TAEHV
    from stages.train.sample import sampling_record
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    save_taehv(folder / "codec.safetensors", TAEHV(cfg.taehv), cfg.taehv)
    codec = {"kind": "taehv", "file": "../codec.safetensors", "channels": cfg.dit.in_dim}
    path = folder / "causal" / "ema.safetensors"
    path.parent.mkdir()
    model = DiT(cfg.dit)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    save_model(path, model.state_dict(), cfg, TEACHER_LINEAGE,
               {"sampling": sampling_record(cfg, "causal", 2.0, 1, 0.5, codec)})
    return path, model


TEACHER_LINEAGE = [{"stage": "bidirectional", "steps": 5, "preset": "tiny"}, {"stage": "causal", "steps": 7, "preset": "tiny"}]


def test_vidu_distill_runs_and_a_rerun_resumes_exactly(tmp_path):
    """A tiny causal teacher (scrambled, with an untrained autoencoder as its codec) distilled for 2 steps
    on the synthetic world; the run cut back to its step-1 checkpoint and re-run ends where it ended."""
    import json
    import shutil

    from manifests import catalog
    from models.checkpoint import checkpoint_sampling, read_state_dict
    from tests.conftest import vidu
    cfg = PRESETS["tiny"]
    teacher, model = tiny_teacher(tmp_path)
    args = ("distill", "--from", str(teacher), "--out", str(tmp_path / "student"), "--steps", "2", "--batch", "1",
            "--chunks", "2", "--samples", "1", "--save-every", "1", "--workdir", str(tmp_path / "work"), "--quiet")
    first = json.loads(vidu(*args).stdout)
    assert (first["steps"], first["resumed_from"]) == (2, None)
    out = tmp_path / "student"
    kept = tmp_path / "uninterrupted"
    shutil.copytree(out, kept)
    done = {name: read_state_dict(kept / "step-000002" / f"{name}.safetensors") for name in ("model", "ema", "critic")}
    shutil.rmtree(out / "step-000002")
    (out / "latest").write_text("step-000001\n")
    again = json.loads(vidu(*args).stdout)
    assert (again["steps"], again["resumed_from"]) == (2, 1)
    for name in ("model", "ema", "critic"):             # student, its EMA, critic: bit for bit
        redone = read_state_dict(out / "step-000002" / f"{name}.safetensors")
        assert all(torch.equal(done[name][k], redone[k]) for k in redone), name
    assert any(not torch.equal(done["model"][k], p) for k, p in model.state_dict().items())     # it trained
    history = [torch.load(out / "step-000002" / "state.pt", weights_only=False)["history"] for out in (out, kept)]
    assert history[0] == history[1] and len(history[0]) == 2
    rec = checkpoint_sampling(out / "step-000002" / "ema.safetensors")
    assert (rec["stage"], rec["steps"], rec["sampler"], rec["guidance"]) == ("distill", 3, "renoise", 1.0)
    assert StreamSettings.resolve(cfg, rec).steps == 3        # `vidu stream --ckpt` runs 3 steps, no flags
    from models.checkpoint import read_metadata                 # provenance: the teacher's lineage, then this run
    assert read_metadata(out / "step-000002" / "ema.safetensors")["lineage"] == TEACHER_LINEAGE + [
        {"stage": "distill", "steps": 2, "preset": "tiny", "batch": 1}]
    assert [r["state"] for r in catalog.runs(tmp_path / "work") if r["stage"] == "distill"] == ["done"]
    from stages.distill.loop import DistillSettings, distill_run
    import stages.train.data as data
    built = []
    monkey = pytest.MonkeyPatch()
    monkey.setattr(data, "build_dataset", lambda *a, **k: built.append(1) or 1 / 0)
    try:                 # another setting in the same folder is refused before any clip is rendered
        with pytest.raises(ValueError, match="other settings"):
            distill_run(DistillSettings(init_from=str(teacher), steps=3, batch=1, chunks=2, samples=1, save_every=1), out)
    finally:
        monkey.undo()
    assert built == []
    with pytest.raises(ValueError, match="is not a causal or bidirectional teacher"):
        distill_run(DistillSettings(init_from=str(tmp_path / "codec.safetensors")), tmp_path / "x")
    # a second phase through the flags: warm start from the shipped EMA, with PCM; the refusals in one line
    from tests.conftest import cli
    phase = ("distill", "--from", str(teacher), "--steps", "1", "--batch", "1", "--chunks", "2", "--samples", "1",
             "--workdir", str(tmp_path / "work"), "--quiet")
    second = json.loads(cli(*phase, "--out", str(tmp_path / "second"), "--pcm-weight", "0.5",
                            "--init-student", str(out / "step-000002" / "ema.safetensors")).stdout)
    assert second["steps"] == 1 and second["resumed_from"] is None
    state = torch.load(tmp_path / "second" / "step-000001" / "state.pt", weights_only=False)
    assert state["history"][0]["loss_pcm"] > 0 and state["settings"]["init_student"].endswith("ema.safetensors")
    for flags, says in [(("--init-student", str(teacher)), "is not a distilled student"),
                        (("--sync-weight", "1"), "needs a lip-sync discriminator file")]:
        res = cli(*phase, "--out", str(tmp_path / "refused"), *flags, check=False)
        assert res.returncode != 0 and says in res.stderr and "Traceback" not in res.stderr, res.stderr
    # a bidirectional teacher (stage 1's record) distilled into the warm student by whole-clip scores
    from models.checkpoint import read_state_dict as weights, save_model
    from stages.train.sample import sampling_record
    bidi = tmp_path / "bidirectional" / "ema.safetensors"
    bidi.parent.mkdir()
    codec = {"kind": "taehv", "file": "../codec.safetensors", "channels": cfg.dit.in_dim, "of": "stage 1"}   # told apart
    save_model(bidi, model.state_dict(), cfg, TEACHER_LINEAGE[:1], {"sampling": sampling_record(cfg, "bidirectional",
                                                                                                2.0, 1, None, codec)})
    warm = out / "step-000002" / "ema.safetensors"
    third = json.loads(cli(*phase[:2], str(bidi), *phase[3:], "--out", str(tmp_path / "third"), "--init-student",
                           str(warm)).stdout)
    done = tmp_path / "third" / "step-000001"
    assert third["steps"] == 1 and not all(torch.equal(weights(done / "model.safetensors")[k], v)
                                           for k, v in weights(warm).items())          # the warm student trained
    rec, kept = checkpoint_sampling(done / "ema.safetensors"), checkpoint_sampling(warm)
    assert rec == {**kept, "codec": codec}             # the student's layout, the teacher's codec
    assert read_metadata(done / "ema.safetensors")["lineage"][-1]["teacher"] == "bidirectional"
    for flags, says in [((), "its student starts from a distilled causal student (--init-student"),
                        (("--init-student", str(warm), "--pcm-weight", "0.5"), "ODE warm-up and PCM step it chunk by chunk")]:
        res = cli(*phase[:2], str(bidi), *phase[3:], "--out", str(tmp_path / "refused"), *flags, check=False)
        assert res.returncode != 0 and says in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_a_distillation_rolling_out_while_its_clips_render_equals_the_same_schedule_coded_in_process(tmp_path):
    """DistillSettings.render_overlap (vidu distill --workers N --render-overlap K): the rollouts start on
    the first batch's clips while the rest render; the draws are the schedule's, so the student equals the
    one distilled with every clip coded here when first drawn, and differs from render-first."""
    import json

    from stages.distill.loop import DistillSettings, distill_run
    from tests.conftest import vidu
    teacher, _ = tiny_teacher(tmp_path)
    st = DistillSettings(init_from=str(teacher), steps=3, batch=2, chunks=2, samples=4, save_every=3, render_overlap=1)
    beside = json.loads(vidu("distill", "--from", str(teacher), "--out", str(tmp_path / "beside"), "--steps", "3",
                             "--batch", "2", "--chunks", "2", "--samples", "4", "--save-every", "3", "--workers", "1",
                             "--render-overlap", "1", "--workdir", str(tmp_path / "work"), "--quiet").stdout)
    distill_run(st, tmp_path / "here")
    distill_run(dataclasses.replace(st, render_overlap=0), tmp_path / "first", prefetch=1)
    a, b, c = ([h["loss_dmd"] for h in torch.load(tmp_path / run / "step-000003" / "state.pt", weights_only=False)["history"]]
               for run in ("beside", "here", "first"))
    assert beside["steps"] == 3 and len(a) == len(b) == len(c) == 3
    # the same conditions step by step (speech features coded in a one-thread worker or here may differ in the
    # last float bits, so the losses are compared, not the weights' bits); render-first draws other clips
    assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) < 1e-4
    assert max(abs(x - y) / abs(y) for x, y in zip(a, c)) > 1e-2


# --- the Distiller in process: warm start, sync reward, PCM ------------------------------------------

def distiller(tmp_path, teacher=None, name="run", **settings):
    """A Distiller of a scrambled tiny teacher (chunks of 1 latent frame, its sampling record as stage 2
    writes it) on fixed conditions of batch 1; `settings` override DistillSettings."""
    from stages.distill.loop import DistillSettings, Distiller
    from stages.train.sample import sampling_record
    teacher = teacher if teacher is not None else scrambled()
    record = sampling_record(TINY, "causal", 2.0, 1, 0.5, None)
    ref, text, audio = conditions(chunks=3)
    batch = {"ref": ref, "text": text, "audio": audio, "mouth_box": torch.zeros(1, 3, 2, dtype=torch.long)}
    st = DistillSettings(**{"steps": 4, "batch": 1, "chunks": 3, "warmup": 0, "lr": 1e-3, **settings})
    return Distiller(teacher, TINY, record, st, tmp_path / name, lambda step: batch)


def params(model) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


def test_a_warm_started_student_starts_from_a_previous_students_ema(tmp_path):
    from models.checkpoint import read_state_dict, save_model
    teacher = scrambled()
    first = distiller(tmp_path, teacher, "first")
    first.train_step()
    ema = first.save() / "ema.safetensors"
    shipped = read_state_dict(ema)
    kept = params(teacher)
    assert not same(kept, shipped)                     # the phase trained: a warm start is not the teacher
    cold = distiller(tmp_path, teacher, "cold")
    assert same(params(cold.student), kept) and same(cold.ema, kept)        # control: no warm start
    warm = distiller(tmp_path, teacher, "warm", init_student=str(ema))
    assert same(params(warm.student), shipped) and same(warm.ema, shipped)   # student and EMA, bit for bit
    assert same(params(warm.critic), kept) and same(params(warm.teacher), kept)   # critic, real score: teacher
    assert warm.teacher is teacher
    logged = warm.train_step()                         # and it trains on
    assert logged["step"] == 0 and not same(params(warm.student), shipped)
    # refusals, one line each: another architecture, a file that is not a distilled student
    other = TINY.replace(dit=dataclasses.replace(TINY.dit, num_layers=1))
    save_model(tmp_path / "other.safetensors", DiT(other.dit), other, [], {"sampling": {"stage": "distill"}})
    with pytest.raises(ValueError, match=r"another config than the teacher: dit\.num_layers 1 \(teacher 2\)$") as e:
        distiller(tmp_path, teacher, "x", init_student=str(tmp_path / "other.safetensors"))
    assert "\n" not in str(e.value)
    save_model(tmp_path / "causal.safetensors", teacher, TINY, [], {"sampling": {"stage": "causal"}})
    with pytest.raises(ValueError, match="is not a distilled student .* stage 'causal'"):
        distiller(tmp_path, teacher, "x", init_student=str(tmp_path / "causal.safetensors"))
    with pytest.raises(ValueError, match="no such checkpoint file"):
        distiller(tmp_path, teacher, "x", init_student=str(tmp_path / "missing.safetensors"))


def test_critic_warmup_trains_the_critic_alone_then_the_student_on_its_own_schedule(tmp_path):
    """The first critic_warmup steps move the critic only (the student, its EMA and its schedule wait);
    then the student trains, its learning rate starting where a run without warm-up starts."""
    from stages.distill.loop import DistillSettings
    teacher = scrambled()
    dst = distiller(tmp_path, teacher, "warm", critic_warmup=2, steps=5, warmup=2)
    plain = distiller(tmp_path, teacher, "plain", steps=3, warmup=2)
    student, ema, critic = params(dst.student), {k: v.clone() for k, v in dst.ema.items()}, params(dst.critic)
    logged = [dst.train_step() for _ in range(2)]
    assert same(student, params(dst.student)) and same(ema, dst.ema)
    assert not same(critic, params(dst.critic))          # the critic trained
    assert all(h["lr"] == 0.0 and h["grad_norm"] == 0.0 and h["loss"] > 0 for h in logged)   # measured, not applied
    third = dst.train_step()
    assert not same(student, params(dst.student))        # now the student moves
    assert third["lr"] == plain.train_step()["lr"] > 0   # its schedule starts at its own step 0
    with pytest.raises(ValueError, match="leaves no DMD step"):
        DistillSettings(steps=3, critic_warmup=3)
    with pytest.raises(ValueError, match="leaves no DMD step"):
        DistillSettings(steps=4, critic_warmup=2, ode_warmup=2)


def test_the_sync_reward_adds_the_teachers_sync_loss_on_the_rollout(tmp_path):
    """sync_weight x the teachers' sync loss (lipsync.sync_loss, a discriminator file) on the student's
    rollout joins the generator loss: the student's update changes, the critic's and the DMD term do not;
    at weight 0 with a discriminator the loss is only measured (the update is the pure-DMD one)."""
    from stages.distill.rollout import exit_steps
    from stages.distill.loop import DistillSettings
    from stages.train.lipsync import LipSync, LipSyncConfig, save_lipsync, sync_loss
    from stages.train.machinery import step_generator
    torch.manual_seed(4)
    disc = LipSync(LipSyncConfig.for_model(TINY)).eval()
    path = save_lipsync(tmp_path / "lipsync.safetensors", disc)
    teacher = scrambled()
    runs = {name: distiller(tmp_path, teacher, name, **kw) for name, kw in [
        ("dmd", {}), ("again", {}), ("measured", {"lipsync": str(path)}),
        ("reward", {"lipsync": str(path), "sync_weight": 2.0})]}
    logged = {name: run.train_step() for name, run in runs.items()}
    student = {name: params(run.student) for name, run in runs.items()}
    assert same(student["dmd"], student["again"]) and same(student["dmd"], student["measured"])   # controls
    assert not same(student["dmd"], student["reward"])
    assert same(params(runs["dmd"].critic), params(runs["reward"].critic))
    assert "loss_sync" not in logged["dmd"]
    r = logged["reward"]
    assert r["loss_dmd"] == logged["dmd"]["loss_dmd"] and r["loss_dmd_audio"] == logged["dmd"]["loss_dmd_audio"]
    assert r["loss_sync"] == logged["measured"]["loss_sync"] > 0
    assert r["loss"] == pytest.approx(r["loss_dmd"] + r["loss_dmd_audio"] + 2.0 * r["loss_sync"], rel=1e-6)
    # the logged term is the discriminator's loss on the rollout the step drew (the teacher's weights at step 0)
    draw = Draw(step_generator(0, 0), 0, 1, 1)
    exits = exit_steps(draw, 3, 3)
    seed = draw.randint(2 ** 62)
    batch = runs["dmd"].batches(0)
    with torch.no_grad():
        video, _ = self_rollout(teacher, TINY, runs["dmd"].stream, batch["ref"], batch["text"], batch["audio"], 3,
                                exits, seed)
    assert float(sync_loss(video, batch["audio"], batch["mouth_box"], disc)) == pytest.approx(r["loss_sync"], rel=1e-5)
    # each term's unweighted gradient norm at the student's output layer, logged where there are two terms
    assert "gnorm_dmd" not in logged["dmd"] and "gnorm_dmd" not in logged["measured"]
    student = copy.deepcopy(teacher).requires_grad_(True)
    video, audio = self_rollout(student, TINY, runs["dmd"].stream, batch["ref"], batch["text"], batch["audio"], 3,
                                exits, seed)
    dmd, _ = generator_loss(teacher, teacher, batch, video, audio, runs["dmd"].obj, runs["dmd"].st.dmd, draw)
    head = [student.head.head.weight, student.head.head.bias]
    for name, term in (("dmd", dmd), ("sync", sync_loss(video, batch["audio"], batch["mouth_box"], disc))):
        norm = torch.cat([g.flatten() for g in torch.autograd.grad(term, head, retain_graph=True)]).norm()
        assert r[f"gnorm_{name}"] == pytest.approx(float(norm), rel=1e-4) and r[f"gnorm_{name}"] > 0
    with pytest.raises(ValueError, match=r"needs a lip-sync discriminator file \(--lipsync\)"):
        DistillSettings(sync_weight=1.0)
    with pytest.raises(ValueError, match="no such discriminator file"):
        distiller(tmp_path, teacher, "x", sync_weight=1.0, lipsync=str(tmp_path / "missing.safetensors"))


# --- PCM (eq. 7) ---------------------------------------------------------------------------------------

def pcm_setup(teacher_clip):
    from stages.distill.pcm import phase_edges
    teacher, v, a, batch = teacher_clip
    return teacher, v, a, batch, phase_edges(ST.steps, OBJ.shift)


def test_the_pcm_term_vanishes_only_where_the_student_already_solves_the_teachers_ode(teacher_clip):
    """Student = EMA = teacher, one ODE step per phase (t_n is the phase edge, where f is the identity):
    unguided, the teacher's ODE step IS the student's jump, so the term is exactly 0; guided, or with
    substeps (the teacher is not self-consistent), it is not."""
    from stages.distill.pcm import WithWeights, pcm_loss
    teacher, v, a, batch, edges = pcm_setup(teacher_clip)
    ema = WithWeights(teacher, params(teacher))
    for seed in (5, 6, 7):                                 # phases 0, 1, 2 alike
        loss, parts = pcm_loss(teacher, ema, teacher, batch, v, a, OBJ, edges, DMDSettings(guidance=1.0), 1,
                               draw(seed))
        assert float(loss.detach()) == 0.0 and float(parts["loss_pcm_audio"]) == 0.0
    phases = {int(pcm_loss(teacher, ema, teacher, batch, v, a, OBJ, edges, DMDSettings(), 1, draw(s))[1]["pcm_phase"])
              for s in (5, 6, 7, 8, 9)}
    assert len(phases) > 1
    guided, _ = pcm_loss(teacher, ema, teacher, batch, v, a, OBJ, edges, DMDSettings(guidance=3.0), 1, draw(5))
    substeps, _ = pcm_loss(teacher, ema, teacher, batch, v, a, OBJ, edges, DMDSettings(guidance=1.0), 4, draw(5))
    assert float(guided.detach()) > 1e-3 and float(substeps.detach()) > 1e-5


def test_the_pcm_term_trains_the_student_towards_the_teachers_ode(teacher_clip):
    """Minimising the term alone on a fixed batch and draw (30 AdamW steps, the EMA following) brings it
    down more than 20x; with lr 0 it stays exactly where it is (the control); the teacher gets no gradient."""
    from stages.distill.loop import DistillSettings
    from stages.distill.pcm import WithWeights, pcm_loss
    from stages.train.machinery import adamw, ema_decay, ema_update, optimizer_step
    teacher, v, a, batch, edges = pcm_setup(teacher_clip)

    def fit(lr, steps):
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        ema = {k: p.detach().clone().float() for k, p in student.named_parameters()}
        opt, sched = adamw(student, DistillSettings(lr=lr, warmup=0, steps=steps), torch.device("cpu"))
        losses = []
        for k in range(steps):
            loss, _ = pcm_loss(student, WithWeights(student, ema), teacher, batch, v, a, OBJ, edges, DMDSettings(guidance=3.0), 4, draw(11))
            loss.backward()
            assert all(p.grad is None for p in teacher.parameters())
            optimizer_step(student, opt, sched, 1.0)
            ema_update(ema, student, ema_decay(k, 0.99))
            losses.append(float(loss.detach()))
        return losses

    losses = fit(1e-3, 30)
    assert losses[0] > 1e-3 and losses[-1] < losses[0] / 20            # measured 0.0069 -> 0.00008
    still = fit(0.0, 3)
    assert still[0] == losses[0] and still == [still[0]] * 3


def test_the_teachers_ode_lands_where_a_straight_flow_goes_and_is_stopped_at_the_students_levels(teacher_clip,
                                                                                                monkeypatch):
    """teacher_ode on a velocity field whose paths are straight lines to a fixed x* (v = (x - x*) / t,
    where Euler is exact): the endpoint is x*, the states at the student's levels lie on the line, the
    history is never touched; a curved field (v = x - x*) misses x* (the control)."""
    import stages.distill.ode as ode
    from stages.distill.pcm import phase_edges
    teacher, v, a, batch = teacher_clip
    edges = phase_edges(ST.steps, OBJ.shift)
    g = torch.Generator().manual_seed(1)
    x_start, target = torch.randn(2, 4, 6, 4, 4, generator=g), torch.randn(2, 4, 6, 4, 4, generator=g)
    p = 3                                                   # history positions (clean, level 0)

    def at(t):
        return torch.cat([torch.zeros(2, p), torch.full((2, 6 - p), t)], 1)

    def straight(model, seq, x, xa, sigma, c, guidance=1.0, guide="all"):
        t = sigma[:, None, :, None, None]
        return torch.where(t > 0, (x - target) / t.clamp_min(1e-9), torch.zeros_like(x)), None
    monkeypatch.setattr(ode, "score_v", straight)
    for substeps in (1, 4):
        states, end, _ = ode.teacher_ode(teacher, {}, x_start, None, at, edges, substeps, 1, DMDSettings())
        assert [s for s, _, _ in states] == edges[:-1]
        assert torch.allclose(end[:, :, p:], target[:, :, p:], atol=1e-5)
        assert torch.equal(end[:, :, :p], x_start[:, :, :p])          # the history stays as it was
        for s, x, _ in states:
            line = target + s / edges[0] * (x_start - target)
            assert torch.allclose(x[:, :, p:], line[:, :, p:], atol=1e-5)
    monkeypatch.setattr(ode, "score_v", lambda model, seq, x, xa, sigma, c, guidance=1.0, guide="all": (x - target, None))
    _, curved, _ = ode.teacher_ode(teacher, {}, x_start, None, at, edges, 4, 1, DMDSettings())
    assert (curved[:, :, p:] - target[:, :, p:]).abs().max() > 0.1


def test_ode_regression_trains_the_student_to_the_teachers_few_step_endpoint(teacher_clip):
    """Minimising the ODE loss alone on a fixed batch and draw (12 AdamW steps) brings it down more than
    5x; lr 0 keeps it exactly (the control); the teacher gets no gradient."""
    from stages.distill.loop import DistillSettings
    from stages.distill.ode import ode_loss
    from stages.distill.pcm import phase_edges
    from stages.train.machinery import adamw, optimizer_step
    teacher, v, a, batch = teacher_clip
    edges = phase_edges(ST.steps, OBJ.shift)

    def fit(lr, steps):
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        opt, sched = adamw(student, DistillSettings(lr=lr, warmup=0, steps=steps), torch.device("cpu"))
        losses = []
        for _ in range(steps):
            loss, parts = ode_loss(student, teacher, batch, v, a, OBJ, edges, DMDSettings(guidance=3.0), 2, draw(11))
            loss.backward()
            assert all(q.grad is None for q in teacher.parameters())
            optimizer_step(student, opt, sched, 1.0)
            losses.append(float(loss.detach()))
        assert parts["loss_ode"] > 0 and parts["loss_ode_audio"] > 0
        return losses

    losses = fit(1e-3, 12)
    assert losses[0] > 1e-3 and losses[-1] < losses[0] / 5, losses[::4]      # measured 1.76 -> 0.090
    still = fit(0.0, 3)
    assert still[0] == losses[0] and still == [still[0]] * 3


def test_ode_warmup_then_critic_warmup_then_dmd(tmp_path):
    """Steps 0-1 regress the teacher's ODE (the student moves, loss_ode logged), step 2 trains the critic
    alone, steps 3-4 are DMD."""
    teacher = scrambled()
    dst = distiller(tmp_path, teacher, "ode", ode_warmup=2, critic_warmup=1, steps=5, ode_substeps=2)
    start = params(dst.student)
    rows = [dst.train_step() for _ in range(2)]
    assert all("loss_ode" in r and "loss_dmd" not in r and r["lr"] > 0 for r in rows)
    assert not same(start, params(dst.student))
    moved = params(dst.student)
    rows.append(dst.train_step())
    assert rows[-1]["lr"] == 0.0 and same(moved, params(dst.student))
    rows += [dst.train_step() for _ in range(2)]
    assert all("loss_dmd" in r and "loss_ode" not in r for r in rows[3:])


def diversity(model, stream, batch, seeds) -> float:
    """Mean over latent elements of the std across seeds of the 3-chunk clips `model` streams."""
    with torch.no_grad():
        clips = torch.stack([self_rollout(model, TINY, stream, batch["ref"], batch["text"], batch["audio"], 3,
                                          seed=s)[0] for s in seeds])
    return float(clips.std(0).mean())


def test_pcm_changes_the_distillation_update_and_keeps_samples_diverse(tmp_path):
    """pcm_weight > 0 adds pcm_weight x the PCM term to the generator loss (the DMD term the same draws
    give is unchanged) and changes the student's update; after 6 steps of DMD + PCM at a high learning
    rate the student's clips still differ across seeds at least half as much as the teacher's do (a
    collapsed generator, every seed one clip, scores 0: the control)."""
    teacher = scrambled()
    runs = {"dmd": distiller(tmp_path, teacher, "dmd"), "pcm": distiller(tmp_path, teacher, "pcm", pcm_weight=1.0)}
    logged = {name: run.train_step() for name, run in runs.items()}
    p = logged["pcm"]
    assert "loss_pcm" not in logged["dmd"] and p["loss_pcm"] > 0
    assert p["loss_dmd"] == logged["dmd"]["loss_dmd"] and p["loss_dmd_audio"] == logged["dmd"]["loss_dmd_audio"]
    assert p["loss"] == pytest.approx(p["loss_dmd"] + p["loss_dmd_audio"] + p["loss_pcm"], rel=1e-6)
    assert not same(params(runs["dmd"].student), params(runs["pcm"].student))
    run = runs["pcm"]
    for _ in range(5):
        run.train_step()
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(run.student.parameters(), teacher.parameters()))
    assert moved > 1e-3                                   # it trained (measured 2.9e-3; diversity 0.73 vs 0.80)
    batch, seeds = run.batches(0), [0, 1, 2, 3]
    student = diversity(run.student, run.stream, batch, seeds)
    base = diversity(teacher, run.stream, batch, seeds)
    assert student > 0.5 * base, (student, base)
    assert diversity(run.student, run.stream, batch, [7, 7, 7]) == 0.0


def test_a_student_distilled_with_recache_records_it_and_streams_with_it(tmp_path):
    """`vidu distill --recache`: the rollouts recache at their instruction switches (a per-frame text that
    switches), and the student's record makes `vidu stream` recache by default; without it, it does not."""
    from models.checkpoint import checkpoint_sampling
    d = distiller(tmp_path, recache=True)
    assert d.stream.recache
    ref, _, audio = conditions(chunks=3)
    text = switching_texts([True], at=2)[:, :3]
    d.batches = lambda step: {"ref": ref, "text": text, "audio": audio, "mouth_box": torch.zeros(1, 3, 2, dtype=torch.long)}
    calls = []
    real = StreamEngine.recache
    monkey = pytest.MonkeyPatch()
    monkey.setattr(StreamEngine, "recache", lambda self, t, rows=None: calls.append(rows.tolist()) or real(self, t, rows))
    try:
        d.train_step()
    finally:
        monkey.undo()
    assert calls == [[True]]                               # the rollout recached its one row at the switch
    rec = checkpoint_sampling(d.save() / "ema.safetensors")
    assert rec["recache"] is True and StreamSettings.resolve(TINY, rec).recache
    plain = checkpoint_sampling(distiller(tmp_path, name="plain").save() / "ema.safetensors")
    assert plain["recache"] is False and not StreamSettings.resolve(TINY, plain).recache
