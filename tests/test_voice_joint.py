"""Joint audio as a well-posed task (issue 19): a content model (audio_encoder "content", preset tiny-voice)
hears WHAT is said — the phones of the TTS truth and a standardised loudness, no timbre — and its joint
audio target is the clip said in a character voice (stages/synth/voice.py VOICES), chosen per clip and
given to the model as a voice embedding on the reference's audio tokens."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from models.config import PRESETS

CFG = PRESETS["tiny-voice"]


def phones_of(rows: torch.Tensor) -> np.ndarray:
    """Content rows [N, K, 41] -> the phone id of every step [N * K]."""
    return rows[..., :-1].argmax(-1).flatten().numpy()


def test_a_voiced_clip_hears_content_and_its_target_is_the_characters_voice():
    from models.audio import audio_latent
    from stages.sense import content as C
    from stages.synth.voice import VOICES
    from stages.train.data import render_clip
    def speech_steps(c):
        return int(c["audio_features"][..., 1:-1].sum())
    seed = next(s for s in range(100, 300) if 20 <= speech_steps(render_clip(s, CFG, voice="ada")) <= 50)   # words and pauses
    ada, gus = render_clip(seed, CFG, voice="ada"), render_clip(seed, CFG, voice="gus")
    other = next(c for c in (render_clip(s, CFG, voice="ada") for s in range(seed + 1, seed + 40)) if speech_steps(c) >= 20)
    assert (ada["voice"], gus["voice"]) == (sorted(VOICES).index("ada"), sorted(VOICES).index("gus"))
    before, after = CFG.dit.audio_context
    assert ada["audio_features"].shape == (before + CFG.latent_frames + after, CFG.audio.mel_per_latent, 41)
    assert torch.equal(ada["audio_features"][..., :-1].sum(-1), torch.ones(ada["audio_features"].shape[:2]))
    # the same words in two voices: the same phones at nearly every speech step (what is said, not who)
    a, g, o = phones_of(ada["audio_features"]), phones_of(gus["audio_features"]), phones_of(other["audio_features"])
    speech = (a > 0) | (g > 0)
    assert speech.sum() >= 20 and (a == g)[speech].mean() > 0.8
    assert (a == o)[(a > 0) | (o > 0)].mean() < 0.3                  # another clip's words: the check can fail
    # the phones are where the sound is: speech steps are loud, the steps between words silent
    from models.audio import _lead_steps
    T, lead = C.steps_for(len(ada["audio"])), _lead_steps(CFG.audio, before)
    said = a[lead:lead + T]                                            # the clip's own steps
    level = C.step_level(ada["audio"], T)
    assert (said > 0).sum() >= 20 and np.median(level[said > 0]) > np.median(level[said == 0]) + 30
    # the target is the voice itself, not augmented (digital silence between words), and it is the voice's
    assert np.mean(ada["audio"] == 0) > 0.05 and np.mean(render_clip(seed, PRESETS["tiny"])["audio"] == 0) < 0.01
    tokens, F = CFG.dit.audio_latent_tokens, CFG.latent_frames
    ta = audio_latent(torch.from_numpy(ada["audio"]), F, tokens, CFG.audio)
    tg = audio_latent(torch.from_numpy(gus["audio"]), F, tokens, CFG.audio)
    assert (ta - tg).abs().mean() > 0.1                                # (the same voice twice: 0, the render is a function of its seed)
    assert torch.equal(ta, audio_latent(torch.from_numpy(render_clip(seed, CFG, voice="ada")["audio"]), F, tokens, CFG.audio))
    assert "voice" not in render_clip(seed, PRESETS["tiny"]) and "audio_features" not in render_clip(seed, PRESETS["tiny"])


def scrambled():
    from models.dit import DiT
    torch.manual_seed(0)
    model = DiT(CFG.dit).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    d, F = CFG.dit, CFG.latent_frames
    h, w = CFG.height // 8, CFG.width // 8
    before, after = d.audio_context
    return dict(x=torch.randn(B, d.in_dim, F, h, w, generator=g), t=torch.full((B,), 500.0),
                context=torch.randn(B, d.text_len, d.text_dim, generator=g),
                audio=torch.randn(B, before + F + after, CFG.audio.mel_per_latent, d.audio_dim, generator=g),
                audio_latent=torch.randn(B, F, d.audio_latent_tokens, d.audio_latent_dim, generator=g),
                ref=torch.randn(B, d.in_dim, 1, h, w, generator=g))


@torch.no_grad()
def test_the_voice_reaches_the_model_through_the_reference_alone():
    model, x = scrambled(), inputs()

    def run(voice, ref=True):
        kw = dict(x) if ref else {k: v for k, v in x.items() if k != "ref"}
        return model(kw.pop("x"), kw.pop("t"), kw.pop("context"), **kw, voice=voice)
    a, b = run(torch.tensor([0, 3])), run(torch.tensor([0, 5]))
    assert torch.equal(a.audio[0], b.audio[0]) and not torch.allclose(a.audio[1], b.audio[1], atol=1e-4)
    assert not torch.allclose(a.video[1], b.video[1], atol=1e-5)      # the video sees the voice too (joint attention)
    none = run(None)
    assert torch.equal(run(torch.tensor([-1, -1])).audio, none.audio)  # no voice: the reference's tokens alone
    assert not torch.allclose(none.audio, a.audio, atol=1e-4)
    assert torch.equal(run(torch.tensor([0, 3]), ref=False).audio, run(torch.tensor([1, 7]), ref=False).audio)


@torch.no_grad()
def test_the_teachers_sampler_says_it_in_the_voice_it_is_given():
    from stages.train.sample import sample_bidirectional
    model, x = scrambled(), inputs(B=1)

    def said(voice):
        _, audio = sample_bidirectional(model, CFG, x["ref"], x["context"], x["audio"], steps=3, guidance=2.0,
                                        voice=None if voice is None else torch.tensor([voice]))
        return audio
    ada, ada_again, gus = said(0), said(0), said(6)
    assert torch.equal(ada, ada_again) and not torch.allclose(ada, gus, atol=1e-4)
    assert not torch.allclose(said(None), ada, atol=1e-4)


def test_a_dropped_reference_drops_its_voice_and_the_loss_trains_the_rows_voices():
    from stages.train.objectives import Draw, ObjectiveSettings, bidirectional_loss, drop_conditions
    model = scrambled().train()
    x = inputs(B=4)
    batch = {"video": x["x"], "text": x["context"], "audio": x["audio"], "audio_latent": x["audio_latent"],
             "ref": x["ref"], "voice": torch.tensor([1, 2, 6, 2])}
    st = ObjectiveSettings(p_drop_text=0.0, p_drop_audio=0.0, p_drop_ref=0.5)
    out, _ = drop_conditions(batch, st, Draw(torch.Generator().manual_seed(3), 0, 4, 4))
    dropped = (out["ref"] == 0).flatten(1).all(1)
    assert 0 < int(dropped.sum()) < 4
    assert torch.equal(out["voice"], torch.where(dropped, -1, batch["voice"]))
    loss, _ = bidirectional_loss(model, batch, ObjectiveSettings(p_drop_text=0.0, p_drop_audio=0.0, p_drop_ref=0.0),
                                 Draw(torch.Generator().manual_seed(4), 0, 4, 4))
    loss.backward()
    grad = model.voice_embedding.weight.grad.abs().sum(1)
    assert set(torch.nonzero(grad).flatten().tolist()) == {1, 2, 6}


def load_script(name: str):
    import importlib.util
    from pathlib import Path
    if name not in sys.modules:                   # (its dataclasses look their module up there)
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_a_content_model_trains_on_the_world_streams_and_refuses_to_hear_waves(tmp_path, monkeypatch):
    """The recipe's stage 1 on tiny-voice (the GPU path), its voice phase and benchmarks/voice_bench.py on the
    shipped teacher, stage 2 from it, which `vidu stream` loads (tests/test_stream_content.py streams one) and
    which distils, each clip's rollout said in its voice; what would hear a wave (real clips, the synth bench)
    refuses in one line."""
    from models.checkpoint import checkpoint_config, checkpoint_sampling, load_dit, save_taehv
    from models.taehv import TAEHV
    from stages.distill.loop import DistillSettings, distill_run
    from stages.stream.session import load_parts
    from stages.train.objectives import ObjectiveSettings
    from stages.train.data import ClipSource
    from stages.train.loop import TrainSettings, train
    from stages.train.sample import sample_clips
    recipe = load_script("teacher_recipe")
    torch.manual_seed(0)
    save_taehv(tmp_path / "codec.safetensors", TAEHV(CFG.taehv), CFG.taehv)
    work = tmp_path / "w"
    fast = ["--work", str(work), "--preset", "tiny-voice", "--workers", "0", "--minutes", "4"]
    monkeypatch.setenv("VIDU_TEXT_TABLE", str(recipe.TEXT_TABLE))
    monkeypatch.setenv("OUT", str(tmp_path / "out1"))
    bi = recipe.main(["--phase", "bidirectional", "--steps", "2", "--codec", str(tmp_path / "codec.safetensors"), *fast])
    assert bi["train"]["steps"] == 2 and bi["settings"]["preset"] == "tiny-voice"
    monkeypatch.setenv("OUT", str(tmp_path / "out2"))
    voice = recipe.main(["--phase", "voice", "--cases", "1", "--stream-steps", "2", *fast])
    assert (voice["summary"]["scored"], voice["oracle"]["nearest_is_told"], voice["seconds"]) == (1, 1.0, 4.0)
    assert voice["rows"][0]["told"] != voice["rows"][0]["driving"] and voice["oracle"]["envelope_r"] == pytest.approx(1.0)
    assert (tmp_path / "out2" / "recipe_voice.json").is_file()
    ckpt = recipe.shipped(work / "bidirectional", "ema")
    bench = load_script("voice_bench")
    res = bench.main(["--ckpt", str(ckpt), "--codec", str(work / "codec.safetensors"), "--cases", "1",
                      "--seconds", "4", "--steps", "2", "--out", str(tmp_path / "bench")])
    saved = json.loads((tmp_path / "bench" / "voice_bench.json").read_text())
    assert saved["rows"] == voice["rows"] and res["summary"] == voice["summary"]       # the same bench either way
    # waves sampled where the scorers are missing (the GPU image) are scored here from the .npz
    import stages.eval.bench.voice as voice_mod
    monkeypatch.setattr(voice_mod, "scorers_missing", lambda: "resemblyzer")
    monkeypatch.setenv("OUT", str(tmp_path / "out3"))
    unscored = recipe.main(["--phase", "voice", "--cases", "1", "--stream-steps", "2", *fast])
    assert unscored["scorers_missing"] == "resemblyzer" and "rows" not in unscored
    monkeypatch.undo()
    later = bench.main(["--score", str(tmp_path / "out3" / "voice_waves.npz"), "--out", str(tmp_path / "later")])
    assert later["rows"] == voice["rows"] and later["summary"] == voice["summary"]
    causal = train(TrainSettings(stage="causal", preset="tiny-voice", steps=2, save_every=2, batch=2, samples=2,
                                 init_from=str(ckpt)), tmp_path / "causal")    # stage 2 trains on them too
    assert causal["steps"] == 2
    streamed = bench.main(["--ckpt", str(tmp_path / "causal" / "step-000002" / "ema.safetensors"), "--codec",
                           str(work / "codec.safetensors"), "--cases", "1", "--seconds", "4", "--steps", "2",
                           "--out", str(tmp_path / "streamed")])       # a stage-2 model is streamed, as vidu stream does
    assert streamed["chunk_frames"] == CFG.chunk_frames and "streamed" in streamed["sampling"]
    assert streamed["rows"][0]["edge_flux_ratio"] > 0 and streamed["summary"]["edge_flux_ratio"] > 0
    assert "edge_flux_ratio" not in voice["rows"][0]                    # sampled whole: no chunk edges
    with pytest.raises(ValueError, match="hears log-mel"):
        train(TrainSettings(stage="bidirectional", preset="tiny-voice", steps=1, objective=ObjectiveSettings(
            lipsync=str(tmp_path / "sync.safetensors"), sync_weight=0.1)), tmp_path / "sync")
    # distillation: the rollouts read the clips' content rows and say them in each clip's voice
    stage2 = tmp_path / "causal" / "step-000002" / "ema.safetensors"
    from stages.distill.dmd import check_lipsync
    with pytest.raises(ValueError, match="hears log-mel"):
        check_lipsync(str(stage2), CFG)           # a file that is there: the sync reward refuses the model itself
    student = distill_run(DistillSettings(init_from=str(stage2), steps=2, batch=2, chunks=2, samples=2, save_every=2),
                          tmp_path / "student")
    assert student["steps"] == 2 and checkpoint_config(tmp_path / "student" / "step-000002" / "ema.safetensors").name == CFG.name
    from stages.distill.dmd import score_v
    from stages.distill.rollout import self_rollout, student_settings
    from stages.train.objectives import stream_sequence, training_frames
    teacher, ccfg = load_dit(stage2)
    record = checkpoint_sampling(stage2)
    ccfg, cf = ccfg.replace(chunk_frames=record["chunk_frames"]), record["chunk_frames"]
    g = torch.Generator().manual_seed(0)
    C, _, h, w = ccfg.latent_shape(1)
    ref, text = torch.randn(2, C, 1, h, w, generator=g), torch.randn(2, ccfg.dit.text_len, ccfg.dit.text_dim, generator=g)
    rows = torch.randn(2, 2 * cf + sum(ccfg.dit.audio_context), ccfg.audio.mel_per_latent, ccfg.dit.audio_dim, generator=g)
    stream = student_settings(ccfg, record, 2)
    said = {v: self_rollout(teacher, ccfg, stream, ref, text, rows, 2, voice=torch.tensor(v)) for v in ((0, 1), (0, 5))}
    assert torch.equal(said[0, 1][1][0], said[0, 5][1][0]) and not torch.equal(said[0, 1][1][1], said[0, 5][1][1])
    frames, _ = training_frames(1, cf, 1, False, 2 * cf)
    x0, xa0 = said[0, 1]
    seq = {v: stream_sequence({"video": x0, "ref": ref, "text": text, "audio": rows, "audio_latent": xa0,
                               "voice": torch.tensor(v)}, frames, *ccfg.dit.audio_context) for v in ((0, 1), (0, 5))}
    sigma = torch.full((2, seq[0, 1]["video"].shape[2]), 0.5)
    guided = {v: score_v(teacher, seq[v], seq[v]["video"], seq[v]["audio_latent"], sigma, cf, 3.0, "text")
              for v in seq}                                 # the guided score keeps each row's voice in both passes
    assert torch.equal(guided[0, 1][1][0], guided[0, 5][1][0]) and not torch.equal(guided[0, 1][1][1], guided[0, 5][1][1])
    image = tmp_path / "face.png"
    from PIL import Image
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(image)
    from stages.synth.voice import voice_index
    assert int(load_parts(image, ckpt, voice="gus").engine.voice[0]) == voice_index("gus")   # the teacher streams
    with pytest.raises(ValueError, match="reads speech content"):
        ClipSource(CFG, 0, 1, manifest=tmp_path / "clips.parquet")
    from tests.conftest import cli
    res = cli("embed", "--from", str(tmp_path / "clips.parquet"), "--preset", "tiny-voice", "--workdir", str(tmp_path / "work"),
              "-q", check=False)
    assert res.returncode != 0 and "reads speech content" in res.stderr and "Traceback" not in res.stderr, res.stderr
    with pytest.raises(ValueError, match="reads speech content"):
        sample_clips(scrambled(), CFG, None, None, [], [], [], 17)


def test_the_voice_bench_reads_the_driving_speech_as_its_own_voice_and_scores_a_model_told_another():
    """stages/eval/bench/voice.py: case i is driven by one character voice and told another; the scorers
    read the driving speech itself (the oracle) as its own voice with envelope r 1 and, with the truth's mouth
    track as its video, as a pair in sync; a model's output (here a scrambled tiny-voice: a run of the
    pipeline, not a quality claim) is scored in the told voice, with the video said with it."""
    from models.encoders import text_encoder
    from models.taehv import TAEHV
    from models.vocoder import load
    from stages.eval.bench.voice import case_voices, oracle_row, score_waves, voice_case, voice_sample, voice_waves
    assert all(d != t for d, t in map(case_voices, range(16))) and len({case_voices(i)[0] for i in range(8)}) == 8
    case = voice_case(0, CFG, 4.0)
    oracle = oracle_row(case)
    assert oracle["envelope_r"] == pytest.approx(1.0) and oracle["voice_nearest"] == oracle["told"] == case["driving"]
    assert oracle["voice_similarity"] > oracle["voice_similarity_other"] + 0.05
    torch.manual_seed(0)
    codec, vocoder, encode = TAEHV(CFG.taehv).eval(), load(), text_encoder("minilm", max_len=CFG.dit.text_len)
    waves, mouths = voice_waves(scrambled(), CFG, codec, vocoder, encode, [case], steps=2, guidance=2.0, guide="all")
    assert len(mouths[0]) == case["video_frames"] == len(case["mouth_truth"])      # the video said with it, measured
    res = score_waves(waves, CFG, 4.0, mouths=mouths)
    [row] = res["rows"]
    assert res["oracle_rows"] == [oracle] and res["summary"]["scored"] == 1
    assert oracle["mouth_r"] == pytest.approx(1.0) and oracle["av_offset_frames"] == 0   # the truth's pair: in sync
    other = voice_case(1, CFG, 4.0)["mouth_truth"]                   # the lip-sync control: another case's track
    n = min(len(other), len(case["mouth_truth"]))
    assert oracle_row(case, other)["mouth_r_control"] == pytest.approx(np.corrcoef(case["mouth_truth"][:n], other[:n])[0, 1])
    assert "mouth_r_control" not in oracle
    assert {"mouth_r", "av_r", "av_offset_frames"} <= set(row) and "mouth_r" not in score_waves(waves, CFG, 4.0)["rows"][0]
    assert (row["driving"], row["told"], row["voice"]) == (case["driving"], case["told"], case["told"])
    assert row["audio_seconds"] == row["driving_seconds"] == len(case["audio"]) / 16000 and "envelope_r" in row
    with pytest.raises(ValueError, match="at least 4 s"):
        voice_case(0, CFG, 2.0)
    with pytest.raises(ValueError, match="no voices"):
        voice_sample(None, PRESETS["tiny"], codec, vocoder, encode, case, "ada", steps=2)


MEDIA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "media"


@pytest.mark.skipif(not (MEDIA / "talking" / "retalking_1.mp4").is_file(), reason="needs ../shared/media")
def test_a_real_recording_is_a_voice_case_heard_through_the_streaming_front_end(tmp_path):
    """voice_bench.py --real: a recording re-voiced by case i's character in case i's told voice; it is heard
    as a stream hears it (the front end's phones: real speech has them), cut to whole latent frames; its
    oracle is the recording itself (no voice of the 8, no ground-truth mouth); silence is refused in one line."""
    import wave

    from stages.eval.bench.voice import bench_cases, oracle_row, real_case, voice_case
    clip = MEDIA / "talking" / "retalking_1.mp4"
    case, world = real_case(clip, 2, CFG, 4.0), voice_case(2, CFG, 4.0)
    assert case["told"] == world["told"] and np.array_equal(case["ref"], world["ref"]) and case["text"] is None
    assert case.keys() == world.keys() and case["identity"] == world["identity"]     # the character, without its TTS
    F, T = case["latent_frames"], case["video_frames"]
    assert (F, T, len(case["audio"])) == (25, 97, 97 * 640) and case["driving"] == "real:retalking_1.mp4"
    assert case["rows"].shape == (sum(CFG.dit.audio_context) + F, CFG.audio.mel_per_latent, 41)
    assert case["rows"][..., 1:-1].sum(-1).mean() > 0.4                          # phones heard in most steps
    assert [c["index"] for c in bench_cases(CFG, 9, None, [clip, clip])] == [0, 1]
    oracle = oracle_row(case)
    assert oracle["envelope_r"] == pytest.approx(1.0) and oracle["told"] is None and "voice_similarity" not in oracle
    silent = tmp_path / "silent.wav"
    with wave.open(str(silent), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(bytes(2 * 16000))
    with pytest.raises(ValueError, match="no speech to re-voice"):
        real_case(silent, 0, CFG, None)


def test_a_voice_model_is_seeded_with_the_tensors_of_a_video_teacher_that_fit(tmp_path):
    """TrainSettings.warm_from (teacher_recipe.py --warm): a -voice preset starts from a video teacher of its
    base preset; every tensor of the same name and shape comes over, the speech input (content rows, not
    log-mel) and the voices start fresh (and the joint-audio branch, where the base has none), and the trained
    model's lineage says so."""
    from models.checkpoint import checkpoint_config, read_metadata, read_state_dict, save_model
    from models.dit import DiT
    from stages.train.loop import TrainSettings, train, warm_start
    torch.manual_seed(0)
    video = PRESETS["tiny"]
    teacher = save_model(tmp_path / "teacher.safetensors", DiT(video.dit), video,
                         [{"stage": "bidirectional", "steps": 7, "data": "synth:4@0"}])
    model = DiT(CFG.dit)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lineage = warm_start(model, str(teacher), CFG)
    fresh = {"audio_embedding.0.weight", "voice_embedding.weight"}    # (tiny has joint audio; small does not)
    assert set(lineage[-1]["fresh"]) == fresh and lineage[0]["steps"] == 7
    src, now = read_state_dict(teacher), model.state_dict()
    assert lineage[-1]["tensors"] == len(now) - len(fresh) > 50
    for k, v in now.items():
        assert torch.equal(v, before[k] if k in fresh else src[k]), k
    # a checkpoint with nothing that fits is refused, as is continuing (--from) and seeding at once
    save_model(tmp_path / "other.safetensors", {"elsewhere.weight": torch.zeros(3)}, video)
    with pytest.raises(ValueError, match="none of its tensors fits preset tiny-voice"):
        warm_start(DiT(CFG.dit), str(tmp_path / "other.safetensors"), CFG)
    with pytest.raises(ValueError, match="give one of them"):
        TrainSettings(stage="bidirectional", preset="tiny-voice", init_from=str(teacher), warm_from=str(teacher))
    run = train(TrainSettings(stage="bidirectional", preset="tiny-voice", steps=1, save_every=1, batch=2, samples=2,
                              warm_from=str(teacher)), tmp_path / "run")
    ema = tmp_path / "run" / "step-000001" / "ema.safetensors"
    assert run["steps"] == 1 and checkpoint_config(ema).name == "tiny-voice"
    assert [r.get("stage", "warm") for r in read_metadata(ema)["lineage"]] == ["bidirectional", "warm", "bidirectional"]


def test_a_streamed_cases_chunk_edges_are_counted_in_its_own_frames_per_latent(monkeypatch):
    """score_case scores a stream's chunk edges at the case's video frames per latent frame (the first chunk's
    first latent frame is one video frame), not at a fixed 4."""
    import stages.eval.metrics.audio as A
    from stages.eval.bench.voice import score_case
    seen = []
    monkeypatch.setattr(A, "score_generated", lambda *a, **kw: seen.append(kw) or {})
    wave = np.ones(1600, np.float32)
    case = {"index": 0, "seed": 0, "driving": "ada", "told": "bo", "text": "hi", "audio": wave}
    for per, chunk in ((4, 1), (4, 3), (2, 3)):
        score_case(wave, {**case, "frames_per_latent": per}, "bo", chunk)
    score_case(wave, {**case, "frames_per_latent": 4}, "bo")
    assert [(k["chunk_frames"], k.get("first_frames")) for k in seen] == [(4, 1), (12, 9), (6, 5), (None, None)]
