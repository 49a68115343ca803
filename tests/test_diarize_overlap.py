"""`vidu diarize`'s overlap decision, the AND rule (stages.diarize.both_overlap: frames both the
embedding-spread heuristic and the shipped detector at 0.5 flag, the detector's runs kept only where
they reach OVERLAP_PEAK 0.85 (hysteresis), then pieces of 0.2 s or more), on real speech from
../shared/media: single voices, turn-taking built from two speakers and one voice over music are not
overlap, a two-voice mixture is. Negative controls: each method alone fails one of these (the
detector flags real single voices and turn-taking, the heuristic flags voice over music), and the AND
without the hysteresis flags two retalking speakers taking turns, so the rule, not one of its parts,
is what passes. Numbers measured on the dev VM (CPU)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import stages.diarize as D
from stages.sense.media import load_audio
from stages.sense.speech import load_vad
from stages.synth.speech import music_bed

SR = 16000


def _seconds(regions) -> float:
    return float(sum(b - a for a, b in regions))


@pytest.fixture(scope="module")
def models():
    return load_vad(), D.load_encoder()


@pytest.fixture(scope="module")
def audio(shared_media) -> dict:
    """r1..r5: retalking_1-5 alone; silero: silero_test.wav alone (60 s); turns: retalking_1, silero_test
    from 10 s at the same loudness, retalking_1 again, 0.3 s gaps; music: retalking_1 over a music bed
    6 dB under it; mix: retalking_1 + silero_test from 10 s at equal loudness (as tests/test_diarize.py's
    `mixed`); turns21: retalking_2, retalking_1 at retalking_2's loudness, retalking_2 again, 0.1 s gaps."""
    r = {f"r{i}": load_audio(shared_media / "talking" / f"retalking_{i}.mp4") for i in range(1, 6)}
    sil = load_audio(shared_media / "speech" / "silero_test.wav")
    own = r["r1"]
    other = sil[10 * SR:10 * SR + len(own)]
    other = other * np.sqrt(np.mean(own ** 2) / np.mean(other ** 2))
    gap = np.zeros(int(0.3 * SR), np.float32)
    bed = music_bed(np.random.default_rng(3), len(own)) * np.sqrt(np.mean(own ** 2) / 4)
    short = np.zeros(int(0.1 * SR), np.float32)
    r1 = own * np.sqrt(np.mean(r["r2"] ** 2) / np.mean(own ** 2))
    cases = {**r, "silero": sil, "turns": np.concatenate([own, gap, other, gap, own]), "music": own + bed,
             "mix": own + other, "turns21": np.concatenate([r["r2"], short, r1, short, r["r2"]])}
    return {k: x.astype(np.float32) for k, x in cases.items()}


@pytest.fixture(scope="module")
def results(audio, models) -> dict:
    """{case: (AND overlap, heuristic-alone overlap, detector-alone overlap (no hysteresis), turns,
    the AND without the hysteresis)}, on the same turns."""
    vad, encoder = models
    out = {}
    for k, x in audio.items():
        d = D.diarize_audio(x, vad, encoder)  # the default: the AND rule at OVERLAP_THRESHOLD
        heur = D._mark_overlap(x, encoder, copy.deepcopy(d.turns))
        det = D.detect_overlap(x, copy.deepcopy(d.turns), D.OVERLAP_THRESHOLD)
        out[k] = (d.overlap, heur, det, d.turns, D.intersect_regions(heur, det))
    return out


def test_intersect_regions():
    a = [(0.0, 1.0), (1.0, 2.0), (3.0, 4.0)]  # touching spans merge first
    b = [(0.5, 1.5), (1.9, 3.15), (3.5, 3.6)]
    assert D.intersect_regions(a, b) == [(0.5, 1.5)]  # 1.9-2.0, 3.0-3.15, 3.5-3.6 are under 0.2 s
    assert D.intersect_regions(a, b, min_s=0.1) == [(0.5, 1.5), (1.9, 2.0), (3.0, 3.15), (3.5, 3.6)]
    assert D.intersect_regions(a, []) == [] and D.intersect_regions([], b) == []


@pytest.mark.parametrize("case", ["r1", "r2", "r3", "r4", "r5", "silero"])
def test_real_single_voice_is_not_overlap(results, case):
    both, heur, det, turns, _ = results[case]
    assert both == [] and heur == []
    assert len({t.speaker for t in turns}) == 1


def test_turn_taking_of_two_real_speakers_is_not_overlap(results):
    both, heur, det, turns, _ = results["turns"]
    assert both == [] and heur == []
    assert len({t.speaker for t in turns}) == 2


def test_two_retalking_speakers_taking_turns_are_not_overlap(results):
    """retalking_2 / retalking_1 / retalking_2: the heuristic flags the blocks that hold both voices and
    the detector (no hysteresis) flags short single-voice stretches inside them, so the AND without the
    hysteresis flags 1.75 s (the negative control: it would reject this clip); with it, nothing."""
    both, heur, det, turns, old = results["turns21"]
    assert both == []
    assert len({t.speaker for t in turns}) == 2
    assert _seconds(old) == pytest.approx(1.75, abs=0.05) and _seconds(heur) > 10


def test_one_voice_over_music_is_not_overlap(results):
    both, heur, det, _, _ = results["music"]
    assert both == [] and det == []


def test_two_real_voices_at_once_are_overlap(results, audio, models):
    both, heur, det, turns, old = results["mix"]
    assert _seconds(both) == pytest.approx(1.35, abs=0.05)  # of about 3.7 s where both voices speak
    assert len(both) == 3 and both[0][0] == pytest.approx(0.25, abs=0.03)
    assert _seconds(old) == pytest.approx(1.57, abs=0.05)  # without the hysteresis: one more 0.22-s piece
    assert all(any(t.start <= a and b <= t.end for t in turns) for a, b in both)  # inside the speech turns
    # precision: the flagged frames are where both voices speak (silero-vad on each source alone)
    from stages.sense.speech import speech_segments

    vad, _ = models
    own = audio["r1"]
    other = audio["mix"] - own
    T = len(own) // 160
    act = [np.zeros(T, bool) for _ in range(2)]
    for m, x in zip(act, (own, other)):
        for a, b in speech_segments(vad, x):
            m[int(round(a * 100)):int(round(b * 100))] = True
    hyp = np.zeros(T, bool)
    for a, b in both:
        hyp[int(round(a * 100)):int(round(b * 100))] = True
    assert (hyp & act[0] & act[1]).sum() / hyp.sum() > 0.9


def test_negative_controls_each_half_alone_fails(results):
    """The same decisions by one method alone: the detector flags real single voices and the turn-taking,
    the heuristic flags the voice over music (so each test above would fail without the other half)."""
    assert _seconds(results["silero"][2]) == pytest.approx(1.00, abs=0.05)
    assert sum(_seconds(results[k][2]) > 0 for k in ("r1", "r2", "r3", "r4", "r5", "silero")) == 5  # all but r4
    assert _seconds(results["turns"][2]) == pytest.approx(0.73, abs=0.05)
    assert _seconds(results["music"][1]) == pytest.approx(3.8, abs=0.1)
    # and the mixture: the heuristic flags it all, the AND keeps the detector's frames inside it
    assert _seconds(results["mix"][1]) == pytest.approx(5.49, abs=0.1)
    assert results["mix"][4] == D.intersect_regions(results["mix"][1], results["mix"][2])
    assert set(results["mix"][0]) < set(results["mix"][4])  # the hysteresis drops pieces, never adds


def test_overlap_threshold_moves_the_detector_inside_the_rule(audio, models, results):
    """A detector threshold no frame reaches (1.0) leaves the mixture unflagged; a lower one flags more;
    peak 0 turns the hysteresis off (the AND of session 29's rule), a peak no frame reaches flags nothing."""
    vad, encoder = models
    never = D.diarize_audio(audio["mix"], vad, encoder, overlap_threshold=1.0)
    low = D.diarize_audio(audio["mix"], vad, encoder, overlap_threshold=0.3)
    assert never.overlap == []
    assert _seconds(low.overlap) > 1.35 + 0.1
    assert D.diarize_audio(audio["mix"], vad, encoder, overlap_peak=0.0).overlap == results["mix"][4]
    assert D.diarize_audio(audio["mix"], vad, encoder, overlap_peak=1.0).overlap == []
    assert D.diarize_audio(audio["turns21"], vad, encoder, overlap_peak=0.0).overlap == results["turns21"][4]


def test_cli_overlap_peak_out_of_range(tmp_path):
    """--overlap-peak is a probability: 2 is refused with one line, before any clip is read."""
    from tests.conftest import cli

    proc = cli("diarize", "--overlap-peak", "2", "--from", str(tmp_path / "none.parquet"), check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--overlap-peak" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert D.Diarize.__dataclass_fields__["overlap_peak"].metadata == {"min": 0, "max": 1}
    assert D.Diarize().overlap_peak == D.OVERLAP_PEAK == 0.85
