"""The shipped overlapped-speech detector (stages/sense/overlap.py) on held-out espeak-ng voices
(eval split: voices and sentences never heard in training): two voices at once are overlap,
turn-taking and one voice over music are not; the same net with shuffled or zeroed weights fails.
Nothing trains here: the weights ship in the package."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.sense.overlap import WEIGHTS, build_net, load_detector, overlap_probs, overlap_regions
from stages.synth.speech import SR, music_bed, texts, tts


def _voice(k: int, voice: str, pitch: int) -> np.ndarray:
    u = tts(" ".join(texts("eval")[k:k + 2]), voice, 160, pitch, 50)
    x = u.audio[int(u.span[0] * SR):int(u.span[1] * SR)].astype(np.float64)
    return x / np.sqrt(np.mean(x ** 2)) * 0.05


@pytest.fixture(scope="module")
def scenes() -> dict:
    """mix: two held-out voices talking at once (3 s, the second 3 dB down); turns: the same two
    one after another with a 0.25 s gap; music: the first over a music bed 6 dB under it."""
    a, b = _voice(0, "en-029+m3", 35), _voice(4, "nl+f4", 70)
    n = int(3.0 * SR)
    a, b = a[:n], b[:n]
    assert len(a) == len(b) == n
    pad = np.zeros(int(0.5 * SR))
    rng = np.random.default_rng(0)
    noise = lambda m: 1e-3 * rng.standard_normal(m)  # noqa: E731
    mix = np.concatenate([pad, a + b * 10 ** (-3 / 20), pad])
    turns = np.concatenate([pad, a, np.zeros(int(0.25 * SR)), b, pad])
    music = np.concatenate([pad, a, pad]) + music_bed(rng, len(a) + 2 * len(pad)) * 0.05 * 10 ** (-6 / 20)
    return {k: (x + noise(len(x))).astype(np.float32) for k, x in {"mix": mix, "turns": turns, "music": music}.items()}


def _flagged(net, x: np.ndarray) -> float:
    return sum(b - a for a, b in overlap_regions(overlap_probs(x, net)))


def _separates(net, scenes) -> bool:
    """Most of the 3 s mixture flagged; under 0.2 s flagged in turn-taking and under music."""
    return _flagged(net, scenes["mix"]) > 1.5 and _flagged(net, scenes["turns"]) < 0.2 and _flagged(net, scenes["music"]) < 0.2


def test_shipped_weights_load_small_bf16():
    from safetensors import safe_open

    with safe_open(str(WEIGHTS), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    net = load_detector()
    assert not net.training
    assert 20_000 < sum(p.numel() for p in net.parameters()) <= 100_000
    assert WEIGHTS.stat().st_size < 400_000


def test_mixture_is_overlap_turns_and_music_are_not(scenes):
    net = load_detector()
    mix, turns, music = (_flagged(net, scenes[k]) for k in ("mix", "turns", "music"))
    assert mix > 1.5, mix  # of 3 s of two voices at once
    assert turns < 0.2, turns
    assert music < 0.2, music
    p = overlap_probs(scenes["mix"], net)
    assert p.shape == (len(scenes["mix"]) // 160,) and p.dtype == np.float32
    assert p[:40].mean() < 0.5 < np.median(p[60:340])  # silence lead-in vs the mixture


@pytest.mark.parametrize("damage", ["shuffled", "zeroed"])
def test_damaged_weights_fail(scenes, damage):
    net = build_net()
    gen = torch.Generator().manual_seed(0)
    state = {}
    for k, v in load_detector().state_dict().items():
        if not v.dtype.is_floating_point or "running_var" in k:
            state[k] = v
        elif damage == "shuffled":
            state[k] = v.flatten()[torch.randperm(v.numel(), generator=gen)].view_as(v)
        else:
            state[k] = torch.zeros_like(v)
    net.load_state_dict(state)
    assert not _separates(net.eval(), scenes)


def test_diarize_with_the_detector(scenes):
    """Inside diarize: the detector's overlap (detect_overlap) inside the turns, with a score per turn; the
    default AND rule (tests/test_diarize_overlap.py) also needs the heuristic, which misses this short
    (3 s, -3 dB) TTS mixture: a known recall loss of the rule (RESULTS.md 2026-12-04: 18 of 20 TTS mixtures)."""
    import copy

    from stages.diarize import Diarize, _mark_overlap, detect_overlap, diarize_audio, load_encoder
    from stages.sense.speech import load_vad

    vad, encoder = load_vad(), load_encoder()
    mix = diarize_audio(scenes["mix"], vad, encoder, overlap_threshold=0.5)
    turns = diarize_audio(scenes["turns"], vad, encoder, overlap_threshold=0.5)
    mix_det = detect_overlap(scenes["mix"], copy.deepcopy(mix.turns), 0.5)
    turns_det = detect_overlap(scenes["turns"], copy.deepcopy(turns.turns), 0.5)
    assert sum(b - a for a, b in mix_det) > 1.5 and sum(b - a for a, b in turns_det) < 0.2
    assert all(any(t.start <= a and b <= t.end for t in mix.turns) for a, b in mix_det)
    assert max(t.overlap_score for t in mix.turns) > 0.5 > max(t.overlap_score for t in turns.turns)
    assert _mark_overlap(scenes["mix"], encoder, copy.deepcopy(mix.turns)) == [] and mix.overlap == []
    assert turns.overlap == []
    assert Diarize.__dataclass_fields__["overlap_threshold"].metadata == {"min": 0, "max": 1}


def test_overlap_regions_hysteresis_peak():
    """`peak`: a run over the threshold is kept only where its smoothed probability reaches `peak`
    somewhere; its extent is still the threshold's. Exact on a hand-made frame sequence (10 ms frames,
    smooth_s 0.01 = no smoothing)."""
    p = np.zeros(200, np.float32)
    p[10:40] = 0.7          # 0.3 s run that peaks at 0.7
    p[60:90] = 0.6
    p[70:75] = 0.9          # 0.3 s run that reaches 0.9 for 50 ms
    p[120:135] = 0.95       # 0.15 s: under min_s whatever its peak
    p[150:190] = 0.84       # 0.4 s just under the peak
    runs = lambda **kw: [(round(a, 2), round(b, 2)) for a, b in overlap_regions(p, 0.5, smooth_s=0.01, **kw)]  # noqa: E731
    assert runs() == [(0.1, 0.4), (0.6, 0.9), (1.5, 1.9)]
    assert runs(peak=None) == runs() == runs(peak=0.0)
    assert runs(peak=0.85) == [(0.6, 0.9)]  # the whole run, not only its frames over 0.85
    assert runs(peak=0.84) == [(0.6, 0.9), (1.5, 1.9)]  # >=: a run reaching exactly the peak is kept
    assert runs(peak=0.95) == []
