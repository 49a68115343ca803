"""vidu caption: measured numbers (loudness, syllable rate, music share) on signals with known values,
chunk alignment to given diarized turns, measured captions on the shared media, a tiny random Whisper
from a local folder, and the real CLI."""
import json

import numpy as np
import pytest

from manifests.io import read_manifest, to_table, write_table
from models.hf import check_model
from stages.caption import Caption, loudness_lufs, parse_visual_json, syllable_nuclei
from stages.run import base_row
from tests.conftest import cli

# retalking_1 (6.1 s): silero-vad speech at 0.00-2.52 s and 3.49-4.67 s (3.70 s); we feed these as turns
TURNS = [{"start": 0.0, "end": 2.52, "speaker": "S0", "category": "onscreen", "energy_ratio": 0.9, "confidence": 0.8,
          "kept": True},
         {"start": 3.49, "end": 4.67, "speaker": "S0", "category": "onscreen", "energy_ratio": 0.9, "confidence": 0.7,
          "kept": True},
         {"start": 4.8, "end": 5.2, "speaker": "S1", "category": "overlap", "energy_ratio": 0.4, "confidence": 0.5,
          "kept": False}]
VISUAL_MODEL_ONLY = ("cap_subject", "cap_action", "cap_emotion", "cap_scene", "cap_onscreen_text")


def diarized_row(path, end_s, turns, **values):
    return base_row("diarized", id="c0", parent_id="v0", video_path=str(path), clip_index=0, shot_index=0,
                    start_s=0.0, end_s=end_s, start_frame=0, end_frame=int(end_s * 25), fps=25.0, duration_s=end_s,
                    speech_turns=turns, **values)


@pytest.fixture(scope="module")
def measured(shared_media):
    """The measured-only stage over retalking_1 (diarized, known turns), retalking_1 (clips: VAD
    fallback) and chaplin (diarized, no turns)."""
    talk, chaplin = shared_media / "talking" / "retalking_1.mp4", shared_media / "scenes" / "chaplin.mp4"
    stage = Caption()
    stage.setup()
    rows = {
        "talk": diarized_row(talk, 6.0, TURNS, subject_count=1, face_frame_ratio=1.0, face_area_ratio=0.12,
                             face_box=[0.3, 0.1, 0.7, 0.6], camera_motion=0.004, subject_motion=0.012, speakers=1,
                             onscreen_s=3.7, offscreen_s=0.0, overlap_s=0.4, clean_speech_s=3.7),
        "vad": base_row("clips", id="c1", video_path=str(talk), clip_index=0, shot_index=0, start_s=1.0, end_s=6.0,
                        start_frame=25, end_frame=150, fps=25.0, duration_s=5.0,
                        speech_segments=[{"start": 0.0, "end": 2.52}, {"start": 3.49, "end": 4.67}]),
        "chaplin": diarized_row(chaplin, 9.6, [], subject_count=2, speakers=0, onscreen_s=0.0, offscreen_s=0.0,
                                overlap_s=0.0),
    }
    return {k: stage.process(r) for k, r in rows.items()}


# ---- measures on signals with known values ----------------------------------------------------

def test_loudness_is_bs1770():
    t = np.arange(3 * 48000) / 48000
    assert loudness_lufs(np.sin(2 * np.pi * 997 * t), 48000) == pytest.approx(-3.01, abs=0.01)  # the standard's check
    t16 = np.arange(3 * 16000) / 16000
    tone = 0.1 * np.sin(2 * np.pi * 997 * t16)
    assert loudness_lufs(tone) == pytest.approx(-23.01, abs=0.1)
    # 2 s of silence after 3 s of tone: gated out (only the blocks straddling the end count), where an
    # ungated mean would read 10 log10(3 / 5) = -2.2 dB lower
    gated = np.concatenate([tone, np.zeros(2 * 16000)])
    assert loudness_lufs(gated) == pytest.approx(loudness_lufs(tone), abs=0.3)
    assert loudness_lufs(np.zeros(16000)) is None and loudness_lufs(tone[:3000]) is None


def test_syllable_nuclei_count_bursts():
    # 20 Hann-shaped 100 ms tone bursts, one every 200 ms: 5 nuclei per second
    sr, x = 16000, np.zeros(4 * 16000)
    for k in range(20):
        a = int((0.05 + 0.2 * k) * sr)
        x[a:a + 1600] = np.sin(2 * np.pi * 500 * np.arange(1600) / sr) * np.hanning(1600)
    x += 0.001 * np.random.default_rng(0).standard_normal(len(x))
    assert syllable_nuclei(x, [(0.0, 4.0)]) == 20
    assert syllable_nuclei(x, [(0.0, 2.0)]) == 10


def test_parse_visual_json():
    answer = 'Sure.\n```json\n{"subject": "a man, grey suit", "emotion": ["calm", "focused"], "pose": "x", ' \
             '"scene": {"nested": 1}, "onscreen_text": ""}\n```'
    assert parse_visual_json(answer) == {"subject": "a man, grey suit", "emotion": "calm, focused",
                                         "scene": '{"nested": 1}'}  # unknown keys and empty values dropped
    assert parse_visual_json("no braces here") is None
    assert parse_visual_json("{not json} then {\"action\": \"waves\"}") == {"action": "waves"}


# ---- measured captions on real media -----------------------------------------------------------

def test_retalking_measured_caption(measured):
    r = measured["talk"]
    assert r["status"] == "ok" and r["caption_source"] == "measured" and r["chunk_source"] == "speech_turns"
    assert "one person on screen" in r["caption"] and "close-up" in r["caption"]
    assert "3.70 s of kept speech in 2 turns by one speaker" in r["caption"]  # 2.52 + 1.18 s fed in
    assert "3.70 s on screen" in r["caption"] and "0.40 s overlapping" in r["caption"]
    assert "static camera" in r["cap_camera"] and "not transcribed" in r["cap_dialogue"]
    assert r["speech_rate_unit"] == "syllables/s" and 3.0 < r["speech_rate"] < 7.0
    assert -35 < r["loudness_lufs"] < -15 and r["snr_db"] > 15
    assert r["transcript"] is None and r["vlm_answer"] is None


def test_measured_caption_invents_no_content(measured):
    for r in measured.values():
        assert all(r[k] is None for k in VISUAL_MODEL_ONLY)
        assert r["caption_source"] == "measured"
        assert r["cap_lighting"] and 0 < r["brightness"] < 1 and r["contrast"] > 0


def test_chunks_align_exactly_to_kept_turns(measured):
    chunks = measured["talk"]["chunk_captions"]
    assert [(c["start"], c["end"], c["speaker"], c["category"]) for c in chunks] == [
        (0.0, 2.52, "S0", "onscreen"), (2.52, 3.49, None, "silence"), (3.49, 4.67, "S0", "onscreen"),
        (4.67, 6.0, None, "silence")]  # the discarded overlap turn is no chunk
    assert chunks[0]["text"].startswith("S0 (onscreen) speaks for 2.52 s at ")
    assert chunks[1]["text"].startswith("no speech for 0.97 s")
    assert all(c["loudness_lufs"] is not None for c in chunks)


def test_fallback_to_vad_segments(measured):
    r = measured["vad"]
    assert r["chunk_source"] == "speech_segments"
    assert [(c["start"], c["end"], c["category"]) for c in r["chunk_captions"]] == [
        (1.0, 2.52, "speech"), (2.52, 3.49, "silence"), (3.49, 4.67, "speech"), (4.67, 6.0, "silence")]
    assert "2.70 s of speech in 2 turns (voice activity, speakers not diarized)" in r["caption"]


def test_chaplin_no_dialogue_and_music(measured):
    r, talk = measured["chaplin"], measured["talk"]
    assert r["cap_dialogue"] == "no speech" and "Dialogue: no speech." in r["caption"]
    assert [c["category"] for c in r["chunk_captions"]] == ["silence"]
    assert r["speech_rate"] is None and r["snr_db"] is None
    assert r["music_score"] > 0.8 > 0.2 > talk["music_score"]
    assert "music (sustained tonal sound) present" in r["cap_music"] and "no music" in talk["cap_music"]
    assert r["colorfulness"] < 5 and "black-and-white" in r["cap_lighting"]  # a silent film
    assert "2 people on screen" in r["caption"]


# ---- local-path models ---------------------------------------------------------------------------

def tiny_whisper(path):
    """A random 2-layer Whisper with a real (byte-level, merge-free) Whisper tokenizer built offline."""
    import torch
    from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizer)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = WhisperTokenizer(vocab=dict(vocab), merges=[], pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    torch.manual_seed(0)
    eos, sot = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    cfg = WhisperConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_target_positions=64, decoder_start_token_id=sot, eos_token_id=eos, pad_token_id=eos,
                        bos_token_id=eos)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config.no_timestamps_token_id = vocab["<|notimestamps|>"]
    model.generation_config.suppress_tokens = [vocab[s] for s in specials[1:]]  # random logits: keep to text bytes
    model.generation_config.begin_suppress_tokens = [eos]
    model.save_pretrained(path)
    WhisperProcessor(WhisperFeatureExtractor(), tok).save_pretrained(path)
    return path


def test_tiny_whisper_transcribes_each_chunk(shared_media, tmp_path):
    path = tiny_whisper(tmp_path / "whisper-tiny-random")
    stage = Caption(asr=str(path), max_new_tokens=8)
    stage.setup()
    r = stage.process(diarized_row(shared_media / "talking" / "retalking_1.mp4", 6.0, TURNS, speakers=1))
    assert r["caption_source"] == "measured + asr:whisper(whisper-tiny-random)"
    speech = [c for c in r["chunk_captions"] if c["category"] != "silence"]
    assert len(speech) == 2 and all(isinstance(c["transcript"], str) and c["transcript"] for c in speech)
    assert all(c["transcript"] is None for c in r["chunk_captions"] if c["category"] == "silence")
    assert all(f'"{c["transcript"]}"' in c["text"] for c in speech)  # random model: wired, content is garbage
    assert r["transcript"] == " ".join(f'S0: {c["transcript"]}' for c in speech)
    words = sum(len(c["transcript"].split()) for c in speech)
    assert r["speech_rate"] == pytest.approx(words / 3.70)  # words per second of kept speech
    assert r["speech_rate_unit"] == "words/s" and r["cap_dialogue"].count('"S0: ') == 2
    assert all(r[k] is None for k in VISUAL_MODEL_ONLY)  # the audio model fills no visual field


def test_tiny_vlm_is_asked_about_frames(shared_media, tiny_vlm):
    stage = Caption(vlm=str(tiny_vlm), frames=4, vlm_frames=2, max_new_tokens=6)
    stage.setup()
    r = stage.process(diarized_row(shared_media / "scenes" / "chaplin.mp4", 9.6, []))
    assert r["caption_source"] == "measured + vlm:qwen2_5_vl(qwen2.5-vl-tiny-random)"
    assert isinstance(r["vlm_answer"], str) and len(r["vlm_answer"].split()) >= 2  # decoded (random) words
    assert parse_visual_json(r["vlm_answer"]) is None and all(r[k] is None for k in VISUAL_MODEL_ONLY)
    assert r["cap_dialogue"] == "no speech" and r["transcript"] is None  # the visual model fills no audio field


def test_missing_or_invalid_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="--asr .*nope: no such file or directory"):
        check_model(tmp_path / "nope", "--asr")
    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError, match="is not a transformers model directory"):
        check_model(tmp_path / "bad", "--vlm")
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load --vlm from"):
        check_model(tmp_path / "bad", "--vlm")


# ---- the real CLI ----------------------------------------------------------------------------------

def test_cli_caption(shared_media, tmp_path):
    row = diarized_row(shared_media / "talking" / "retalking_1.mp4", 6.0, TURNS, subject_count=1, speakers=1,
                       onscreen_s=3.7, offscreen_s=0.0, overlap_s=0.4)
    src = write_table(to_table([row], "diarized"), tmp_path / "diarized.parquet", {"kind": "diarized"})
    out = cli("caption", "--from", str(src), "--workdir", str(tmp_path / "w"), "--quiet")
    table, meta = read_manifest(out.stdout.strip())
    (r,) = table.to_pylist()
    assert meta["kind"] == "captioned" and r["id"] == "c0" and r["status"] == "ok"
    assert "3.70 s of kept speech" in r["caption"] and len(r["chunk_captions"]) == 4
    bad = cli("caption", "--from", str(src), "--workdir", str(tmp_path / "w"), "--asr", str(tmp_path / "none"),
              check=False)
    assert bad.returncode == 2 and "no such file or directory" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    bad = cli("caption", "--from", str(src), "--workdir", str(tmp_path / "w"), "--vlm", str(tmp_path / "cfg"),
              check=False)
    assert bad.returncode == 2 and "cannot load --vlm" in bad.stderr and "Traceback" not in bad.stderr
