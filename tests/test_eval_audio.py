"""Audio metrics of a generated track against its driving speech (issue 19, stages/eval/metrics/audio.py):
envelope correlation, pocketsphinx word error rate, resemblyzer voice similarity among the character
voices, chunk-edge flux, and their `vidu eval --driving` wiring. Real inputs: espeak-ng speech
(stages/synth), the recorded clips in ../shared/media/talking."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stages.eval.metrics import audio as A
from stages.synth.speech import tts
from stages.synth.voice import VOICES

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
PNG = Path(__file__).resolve().parents[1] / "benchmarks" / "figures" / "starter_live_page.png"
SAY = "Please close the window before the rain comes in tonight and bring the dog inside."
OTHER = "My sister painted the old piano blue last summer while we watched the movie."


def speak(text: str, voice: str, rate: int = 175) -> np.ndarray:
    espeak, pitch = VOICES[voice] if voice in VOICES else (voice, 50)
    return tts(text, espeak, rate, pitch, 50).audio


def test_envelope_follows_the_same_speech_not_another():
    drive = speak(SAY, "ada")
    same = A.envelope_correlation(drive, drive)
    assert same["envelope_r"] == pytest.approx(1.0) and same["envelope_lag_frames"] == 0
    assert abs(same["envelope_r_control"]) < 0.3                       # the rotated control
    late = A.envelope_correlation(np.concatenate([np.zeros(3 * 640, np.float32), drive]), drive)
    assert late["envelope_lag_frames"] == 3                            # 3 frames late at 25 fps
    revoiced = A.envelope_correlation(speak(SAY, "ben"), drive)        # same words and rate, another voice
    assert revoiced["envelope_r"] > 0.6 > revoiced["envelope_r_control"]
    other = A.envelope_correlation(speak(OTHER, "ben"), drive)         # another sentence: mismatched
    assert other["envelope_r"] < 0.3
    with pytest.raises(ValueError, match="too short"):
        A.envelope(np.zeros(500, np.float32))
    flat = A.envelope_correlation(np.zeros_like(drive), drive)         # a silent track: no r, not a number
    assert flat["envelope_r"] is None and flat["envelope_lag_frames"] is None


def test_pair_sync_finds_how_late_the_audio_of_a_generated_pair_is():
    """pair_sync: the world's ground-truth mouth track of a TTS clip (the video a perfect model draws) against
    its own speech reads in sync; the speech 4 frames late reads +4, 3 frames early -3; another sentence's
    speech does not follow the mouth; a mouth that never moves has no r."""
    from models.config import PRESETS
    from stages import synth
    from stages.synth.voice import VOICES
    cfg = PRESETS["tiny-voice"]
    s = synth.make_sample(7, width=cfg.width, height=cfg.height, fps=25, seconds=6.0, split="eval", events=[],
                          voice=VOICES["ada"], draw=False)
    mouth, wave = np.asarray(s.tracks["mouth"], np.float64), s.audio
    own = A.pair_sync(mouth, wave)
    assert own["av_offset_frames"] == 0 and own["av_r"] > 0.7
    assert A.pair_sync(mouth, np.concatenate([np.zeros(4 * 640, np.float32), wave]))["av_offset_frames"] == 4
    assert A.pair_sync(mouth, wave[3 * 640:])["av_offset_frames"] == -3
    other = A.pair_sync(mouth, speak(OTHER, "ben"))
    assert other["av_r"] < 0.3
    assert A.pair_sync(np.zeros_like(mouth), wave) == {"av_r": None, "av_offset_frames": None}
    with pytest.raises(ValueError, match="for their sync"):
        A.pair_sync(mouth[:20], wave)


def test_silent_tracks():
    drive = speak(SAY, "ada")
    s = A.score_generated(np.zeros_like(drive), drive, SAY, "ada")
    assert s["envelope_r"] is None and s["wer_generated"] > 0.9 and s["voice_similarity"] is None
    assert "too little" in s["voice_note"] and s["edge_flux_ratio"] is None and "silent" in s["edge_flux_note"]
    with pytest.raises(ValueError, match="silent"):
        A.score_generated(drive, np.zeros_like(drive))


def test_word_error_rate_counts_edits():
    assert A.word_error_rate("the cat sat", "The cat, sat!") == 0.0
    assert A.word_error_rate("a b c", "a x c d") == pytest.approx(2 / 3)
    assert A.word_error_rate("a b c", "") == 1.0
    with pytest.raises(ValueError, match="no words"):
        A.word_error_rate(" ,", "a")


def test_intelligibility_near_for_the_text_far_for_another_sentence():
    """pocketsphinx on espeak-ng en-us: 5 of 15 words wrong on the spoken text (measured 0.33), all but
    one or two on another sentence."""
    drive = speak(SAY, "en-us")
    r = A.intelligibility(speak(SAY, "en-us", 150), drive, SAY)
    assert r["wer_generated"] < 0.5 and r["wer_driving"] < 0.5 and r["wer_reference"] == "text"
    wrong = A.intelligibility(speak(OTHER, "en-us"), drive, SAY)
    assert wrong["wer_generated"] > 0.8 and wrong["wer_driving"] == r["wer_driving"]
    self_ref = A.intelligibility(drive, drive)                          # no text: against the driving transcript
    assert self_ref["wer_generated"] == 0.0 and self_ref["wer_driving"] is None


def test_voice_similarity_picks_the_chosen_voice_among_eight():
    """Another sentence at another rate than the references', in four of the eight voices (two of each
    sex; all eight pass too, at twice the time): the chosen voice is the nearest, by a margin."""
    for voice in ("ada", "cleo", "ben", "gus"):
        r = A.voice_similarity(speak(OTHER, voice, 150), voice)
        assert r["voice_nearest"] == voice, r["voice_similarities"]
        assert r["voice_similarity"] > r["voice_similarity_other"] + 0.05
        assert len(r["voice_similarities"]) == 8
    with pytest.raises(ValueError, match="no voice"):
        A.voice_similarity(speak(OTHER, "ada"), "nobody")


def test_chunk_edges_and_their_flux():
    assert A.chunk_edges(15000, 12) == [7680]                           # 12 frames = 0.48 s; the last 512 samples left out
    assert A.chunk_edges(3 * 7680 + 600, 12) == [7680, 15360, 23040]
    assert A.chunk_edges(4000, 4, 1) == [640, 3200]                     # tiny's stream: 1 frame, then 4
    with pytest.raises(ValueError, match=">= 1"):
        A.chunk_edges(4000, 0)
    clean = speak(SAY, "ben")
    edges = A.chunk_edges(len(clean))
    clicked = clean.copy()
    for e in edges:
        clicked[e:] = -clicked[e:]                                      # a phase jump at every edge
    s_clean = A.score_generated(clean, clean, chunk_frames=12)
    s_click = A.score_generated(clicked, clean, chunk_frames=12)
    assert s_clean["edge_flux_ratio"] < 1.2 < s_click["edge_flux_ratio"]
    assert s_click["envelope_r"] > 0.95                                 # sign flips leave the envelope alone


def test_eval_cli_refuses_bad_audio_options(tmp_path):
    from vidu_cli.app import app

    clip = MEDIA / "talking" / "retalking_1.mp4"
    base = ["eval", "--video", str(clip), "--reference", str(clip)]
    for extra, msg in ((["--voice", "ada"], "--driving"), (["--driving", str(tmp_path / "none.wav")], "no such file"),
                       (["--driving", str(clip), "--voice", "nobody"], "no such voice"),
                       (["--driving", str(PNG)], "no audio track")):
        r = CliRunner().invoke(app, base + extra)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output


def test_eval_cli_scores_the_generated_track(tmp_path):
    """A recorded clip as the "generated" pair (its own track) driven by its own speech: the envelope
    matches exactly, the rotated control does not, the transcript is its own; JSON and table agree."""
    import json

    from vidu_cli.app import app

    clip = MEDIA / "talking" / "retalking_1.mp4"
    r = CliRunner().invoke(app, ["eval", "--video", str(clip), "--reference", str(clip), "--driving", str(clip),
                                 "--voice", "ben", "--max-frames", "80", "--json"])
    assert r.exit_code == 0, r.output
    g = json.loads(r.stdout.strip().splitlines()[-1])["generated_audio"]
    assert g["envelope_r"] == pytest.approx(1.0) and g["envelope_lag_frames"] == 0
    assert abs(g["envelope_r_control"]) < 0.3
    assert g["wer_generated"] == 0.0 and len(g["transcript_driving"].split()) >= 8
    assert 0.8 < g["edge_flux_ratio"] < 1.2 and (g["chunk_frames"], g["first_chunk_frames"]) == (12, 9)
    assert g["voice"] == "ben" and set(g["voice_similarities"]) == set(VOICES)
