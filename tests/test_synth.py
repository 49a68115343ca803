"""The synthetic avatar world: determinism, every character style rendered and read back from its
pixels by the analyzer against ground truth, timed instructions whose actions start at onset +
delay, region masks, long clips, and `vidu synth` feeding `vidu prefilter`. (The speech itself is
tested in tests/test_synth_speech.py.)"""
import json
from pathlib import Path

import av
import numpy as np
import pytest

from manifests.io import read_manifest
from stages.synth import (
    ACTIONS,
    INSTRUCTION_DELAY,
    STYLES,
    Identity,
    analyze,
    frame_count,
    identity_error,
    make_sample,
    render_clip,
)
from stages.synth.dataset import character, render_sample
from stages.synth.speech import SR, Speech, mouth_tracks
from stages.synth.world import TRACKS, Scene, animate, event, random_identity, random_scene
from tests.conftest import cli


def _corr(a, b) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def _tracks(T: int, **overrides) -> dict[str, np.ndarray]:
    base = {"mouth": 0.0, "round": 0.3, "eyes": 1.0, "yaw": 0.0, "pitch": 0.0, "smile": 0.0, "hand": 0.0}
    return {k: np.broadcast_to(np.asarray(overrides.get(k, base[k]), np.float32), (T,)).copy() for k in TRACKS}


def _identity(seed: int, style: str | None = None) -> tuple[Identity, Scene]:
    rng = np.random.default_rng(seed)
    identity = random_identity(rng, style)
    return identity, random_scene(rng, identity)


def test_same_seed_same_sample_and_shapes():
    a, b = make_sample(11, seconds=33 / 25), make_sample(11, seconds=33 / 25)
    assert a.frames.shape == (33, 256, 256, 3) and a.frames.dtype == np.uint8
    assert a.audio.dtype == np.float32 and a.audio.shape == (33 * SR // 25,)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio)
    assert all(np.array_equal(a.tracks[k], b.tracks[k]) for k in TRACKS)
    assert (a.identity, a.scene, a.actions, a.speech, a.instructions) == (b.identity, b.scene, b.actions, b.speech,
                                                                          b.instructions)
    assert make_sample(12, seconds=33 / 25).identity != a.identity
    assert make_sample(11, width=128, height=96, seconds=0.5).identity == a.identity  # the seed alone decides who
    assert character(11) == (a.identity, a.scene) and character(12)[0] != a.identity      # ... drawn without the clip
    assert a.truth() == b.truth() and a.said.text == b.said.text
    assert [frame_count(s, fps) for s, fps in [(4, 25), (1, 30), (0.2, 25), (0, 25)]] == [101, 29, 5, 1]
    c = make_sample(3, width=160, height=128, fps=30, seconds=1)
    assert c.frames.shape == (29, 128, 160, 3) and len(c.audio) == round(29 / 30 * SR) and len(c.instructions) == 29


def test_timed_instructions_drive_their_tracks_after_the_delay_and_label_their_frames():
    for seed in range(20):
        s = make_sample(seed, seconds=6, width=64, height=64)
        assert s.actions == [(e.onset, e.end, e.text) for e in s.events]
        t = np.arange(len(s.frames)) / s.fps
        for e in s.events:
            assert 0 <= e.onset < e.start < e.end <= len(s.frames) / s.fps and e.text in ACTIONS
            assert e.start == pytest.approx(e.onset + INSTRUCTION_DELAY, abs=1e-4)
            given = (t >= e.onset) & (t < e.end)
            assert {s.instructions[i] for i in np.nonzero(given)[0]} == {e.text}
            a = ACTIONS[e.text]
            rest = {"eyes": 1.0, "hand": 0.0}.get(a.track)
            if rest is not None:  # told, not yet acting: at rest
                assert np.all(s.tracks[a.track][(t >= e.onset) & (t < e.start)] == rest)
            peak = s.tracks[a.track][(t >= e.start) & (t < e.end)]
            assert np.min(np.abs(peak - a.target)) < 0.05 if e.text != "shake head" else np.max(np.abs(peak)) > 0.5
        idle = np.array([x == "" for x in s.instructions])
        assert np.all(s.tracks["eyes"][idle] == 1) and np.all(s.tracks["hand"][idle] == 0)
        gt = s.truth()
        assert gt["events"] == [list(e) for e in s.events] and gt["instruction_delay_s"] == INSTRUCTION_DELAY


def _speaking_sample(style: str, seconds: float, size: int = 256):
    """The first sample of this style (seeds from 1) whose clip has speech."""
    for seed in range(1, 20):
        s = make_sample(seed, size, size, seconds=seconds, style=style)
        if s.speech and s.tracks["mouth"].std() > 0.05:
            return s
    raise AssertionError("no speaking sample")


def test_each_style_renders_talks_and_is_read_back_from_pixels():
    for style in STYLES:
        s = _speaking_sample(style, 2.4)
        assert s.identity.style == style and s.frames.shape == (61, 256, 256, 3)
        T = len(s.frames)
        expected = mouth_tracks(s.said, T, s.fps)
        assert np.array_equal(s.tracks["mouth"], expected["mouth"])
        assert np.array_equal(s.tracks["round"], expected["round"])
        centre = (np.arange(T) + 0.5) / s.fps
        pause = ~np.any([(centre >= a) & (centre < b) for a, b in s.speech], axis=0)
        assert pause.sum() >= 3 and np.all(s.tracks["mouth"][pause] == 0)
        m = analyze(s.frames, s.identity)
        assert m["found"].all(), style
        assert _corr(m["mouth"], s.tracks["mouth"]) >= 0.9, style
        shuffled = np.random.default_rng(0).permutation(s.tracks["mouth"])  # control: the right values, wrong times
        assert abs(_corr(m["mouth"], shuffled)) < 0.4, style
        assert np.all(m["mouth"][pause] < 0.2), style
        assert _corr(m["round"], s.tracks["round"]) > 0.7, style
        for k, tol in (("eyes", 0.25), ("yaw", 0.25), ("pitch", 0.25), ("hand", 0.1)):
            assert np.max(np.abs(m[k] - s.tracks[k])) < tol, (style, k)


def test_an_instructed_action_starts_in_the_pixels_at_onset_plus_delay():
    fps, onset, T = 25, 0.6, 45
    start = round((onset + INSTRUCTION_DELAY) * fps)  # the first frame at or after the action's start
    silent = Speech(np.zeros(T * SR // fps, np.float32), [], [], "silence", "")
    for style, name, moved in (("human", "turn left", lambda x: x < -0.2), ("anime", "raise a hand", lambda x: x > 0.02),
                               ("animal", "blink", lambda x: x < 0.8), ("human", "look up", lambda x: x < -0.15)):
        identity, scene = _identity(3, style)
        track = ACTIONS[name].track
        s = render_sample(0, identity, scene, silent, [event(onset, name, 1.0)], T, np.random.default_rng(1), 256, 256,
                          fps)
        idle = animate(np.random.default_rng(1), T, fps, np.zeros(T), [])[track]  # the same clip, never told
        departs = int(np.nonzero(np.abs(s.tracks[track] - idle) > 1e-6)[0][0])
        assert start <= departs <= start + 2, (name, start, departs)  # the profiles ease in from 0
        assert s.instructions[round(onset * fps)] == name and s.instructions[round(onset * fps) - 1] == ""
        m = analyze(s.frames, identity)[track]
        first = int(np.nonzero(moved(m))[0][0])
        assert start <= first <= start + 3, (style, name, start, first, np.round(m[start - 2:start + 5], 2))


def test_long_clips_render():
    s = make_sample(21, 64, 64, seconds=8.0)
    assert s.frames.shape == (201, 64, 64, 3) and len(s.audio) == 201 * SR // 25 and len(s.instructions) == 201
    assert np.ptp(s.frames[-1].astype(int)) > 50  # drawn to the end


def test_an_undrawn_sample_has_the_drawn_ones_inputs_and_truth():
    drawn, bare = make_sample(21, 64, 64, seconds=8.0), make_sample(21, 64, 64, seconds=8.0, draw=False)
    assert bare.frames.shape == drawn.frames.shape and bare.frames.strides[:3] == (0, 0, 0)   # not drawn
    assert not bare.frames.any() and drawn.frames.any()
    assert bare.truth() == drawn.truth() and np.array_equal(bare.audio, drawn.audio)
    with pytest.raises(ValueError, match="masks"):
        make_sample(21, 64, 64, seconds=1.0, draw=False, masks=True)


def test_analyzer_recovers_rendered_states():
    T = 40
    ramp = np.linspace(0, 1, T)
    for seed, style in ((5, "human"), (6, "anime"), (7, "animal")):
        identity, scene = _identity(seed, style)
        tracks = _tracks(T, mouth=ramp[::-1] * (np.arange(T) % 3 != 0), eyes=np.where(np.arange(T) % 8 < 2, 0.0, 1.0),
                         yaw=np.where(np.arange(T) < 10, -1.0, np.where(np.arange(T) < 20, 1.0, 0.0)),
                         smile=ramp, hand=np.clip(2 * ramp - 1, 0, 1))
        m = analyze(render_clip(identity, tracks, 256, 256, scene), identity)
        assert m["found"].all()
        assert _corr(m["mouth"], tracks["mouth"]) > 0.95
        closed = tracks["eyes"] == 0
        assert np.all(m["eyes"][closed] < 0.2) and np.all(m["eyes"][~closed] > 0.7)
        assert np.all(m["yaw"][:10] < -0.7) and np.all(m["yaw"][10:20] > 0.7) and np.all(np.abs(m["yaw"][20:]) < 0.2)
        up = tracks["hand"] > 0.5
        assert np.all(m["hand"][tracks["hand"] == 0] == 0) and np.all(np.abs(m["hand"][up] - tracks["hand"][up]) < 0.05)
        assert _corr(m["smile"], tracks["smile"]) > 0.9
        skin = np.asarray(identity.skin)
        assert np.all(np.linalg.norm(m["skin"] - skin, axis=1) < 0.08 * np.linalg.norm(skin) + 4)
        assert np.all(np.linalg.norm(m["shirt"] - np.asarray(identity.shirt), axis=1) < 3)


def test_analyzer_measures_nods_and_tells_identities_apart():
    (a, scene_a), (b, scene_b) = _identity(8), _identity(9)
    T = 30
    nod = np.where((np.arange(T) >= 10) & (np.arange(T) < 16), 1.0, 0.0)
    frames_a = render_clip(a, _tracks(T, pitch=nod), 256, 256, scene_a)
    frames_b = render_clip(b, _tracks(T), 256, 256, scene_b)
    m = analyze(frames_a, a)
    assert np.all(np.abs(m["pitch"] - nod) < 0.15)
    assert identity_error(m, a) < 12
    assert identity_error(m, b) > 50 and identity_error(analyze(frames_b, b), a) > 50


def test_vidu_synth_writes_playable_samples_that_prefilter_accepts(tmp_path):
    out, work = tmp_path / "synth data", str(tmp_path / "w")
    proc = cli("synth", "--n", "3", "--out", str(out), "--seconds", "3.2", "--workdir", work, "--seed", "4")
    table, meta = read_manifest(proc.stdout.strip())
    rows = table.to_pylist()
    assert meta["kind"] == "synth" and [r["status"] for r in rows] == ["ok"] * 3
    for r in rows:
        gt = json.loads(Path(r["gt_path"]).read_text())
        assert (r["frames"], r["width"], r["height"], r["fps"]) == (81, 256, 256, 25.0) == (
            gt["frames"], gt["width"], gt["height"], gt["fps"])
        assert json.loads(r["actions"]) == gt["actions"] and json.loads(r["identity"]) == gt["identity"]
        assert [(s["start"], s["end"]) for s in r["speech_segments"]] == [tuple(s) for s in gt["speech_segments"]]
        with av.open(r["path"]) as c:
            assert c.streams.video[0].codec_context.name == "h264" and c.streams.audio[0].codec_context.name == "aac"
            frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        assert frames.shape == (81, 256, 256, 3)
        assert [e[1] - e[0] for e in gt["events"]] == pytest.approx([INSTRUCTION_DELAY] * len(gt["events"]))
        m = analyze(frames, Identity.from_dict(gt["identity"]))  # through H.264 the analyzer still follows the mouth
        if np.std(gt["tracks"]["mouth"]) > 0.05:
            assert _corr(m["mouth"], gt["tracks"]["mouth"]) > 0.9
    again = cli("synth", "--n", "3", "--out", str(out), "--seconds", "3.2", "--workdir", work, "--seed", "4")
    assert again.stdout == proc.stdout and "reused" in again.stderr

    pre = cli("prefilter", str(out), "--workdir", work, "-q")
    rows = read_manifest(pre.stdout.strip())[0].to_pylist()
    status = {Path(r["path"]).name: (r["status"], r["reasons"]) for r in rows}
    videos = {k: v for k, v in status.items() if k.endswith(".mp4")}
    assert videos == {f"synth-4-{i:06d}.mp4": ("ok", []) for i in range(3)}
    assert [v for k, v in status.items() if k.endswith(".json")] == [("rejected", ["not_media"])] * 3


def test_bad_size_is_a_one_line_error(tmp_path):
    proc = cli("synth", "--n", "1", "--out", str(tmp_path / "o"), "--size", "255x256", "--workdir", str(tmp_path),
               check=False)
    assert proc.returncode == 2 and "even" in proc.stderr and "Traceback" not in proc.stderr


def test_region_masks_cover_the_parts_that_move():
    from stages.synth.render import region_masks
    identity, scene = _identity(5)
    T = 6
    tracks = _tracks(T, mouth=np.linspace(0, 1, T), eyes=np.linspace(1, 0, T), hand=np.linspace(0, 1, T))
    frames, masks = render_clip(identity, tracks, 128, 128, scene, masks=True)
    assert np.array_equal(frames, render_clip(identity, tracks, 128, 128, scene))
    assert set(masks) == {"face", "eyes", "mouth", "hands"}
    for k, m in masks.items():
        assert m.shape == (T, 128, 128) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1, k
    for track, region in (("mouth", "mouth"), ("eyes", "eyes"), ("hand", "hands")):
        only = _tracks(T, **{track: tracks[track]})
        f = render_clip(identity, only, 128, 128, scene).astype(int)
        changed = np.abs(f - f[:1]).max(-1) > 2  # [T, H, W]: pixels that move with this track alone
        m = region_masks(identity, only, 128, 128, scene)[region]
        assert changed.sum() > 20 and np.all(np.maximum(m, m[:1])[changed] > 0), track  # then or now


def test_training_clips_keep_the_instruction_the_clip_end_cuts():
    """cut_actions (what training renders) keeps every event a seed draws without it and adds at most
    the one the clip's end cuts, visible >= VISIBLE_S; 1.3 s clips then see an instruction act far more
    often (the held-out bench renders without it: its cases do not change)."""
    from stages.synth.world import VISIBLE_S, random_events
    seconds, plain, cut = 1.32, 0, 0
    for seed in range(200):
        a = random_events(np.random.default_rng(seed), seconds)
        b = random_events(np.random.default_rng(seed), seconds, cut_actions=True)
        assert b[:len(a)] == a and len(b) - len(a) in (0, 1)
        if len(b) > len(a):
            assert b[-1].start + VISIBLE_S <= seconds < b[-1].end
        plain, cut = plain + bool(a), cut + bool(b)
    assert plain < 60 and cut > 140            # ~1 in 5 clips holds a whole action; ~3 in 4 see one act


def test_the_analyzer_reads_a_slightly_blurred_frame_as_the_sharp_one():
    """A codec's round trip blurs edges by about a pixel (RESULTS.md 2026-12-04 session 44). An animal's head
    turned fully (and dropped a little) leaves a rim of fur a few pixels wide beside its muzzle, which the blur
    breaks: the muzzle, and the mouth in it, fell outside the face (mouth read absent, yaw 0.77). A white
    muzzle's blurred rim is lips-coloured and outgrew the mouth, whose thin lips the blur thinned: the rim was
    taken for the mouth. Both are the held-out clips that failed the codec's bar with the mouth intact."""
    from scipy.ndimage import gaussian_filter
    T = 9
    mouth = np.linspace(0.0, 0.8, T)
    for seed, style, pose in ((2_000_000_001, None, dict(yaw=1.0, pitch=-0.02)), (2_000_000_101, "animal", {})):
        s = make_sample(seed, fps=25, seconds=0.2, style=style, split="eval", draw=False)
        assert s.identity.style == "animal"
        frames = render_clip(s.identity, _tracks(T, mouth=mouth, **pose), 256, 256, s.scene)
        blurred = np.clip(gaussian_filter(frames.astype(np.float32), (0, 1.2, 1.2, 0)) + 0.5, 0, 255).astype(np.uint8)
        sharp, soft = analyze(frames, s.identity)["mouth"], analyze(blurred, s.identity)["mouth"]
        assert _corr(sharp, mouth) > 0.98, seed
        assert _corr(soft, mouth) > 0.95 and np.all(soft[mouth >= 0.3] > 0.1), (seed, soft)


def test_a_sliver_of_mouth_is_read_as_no_mouth():
    """A blurred shut mouth can leave a piece of lips a few pixels wide holding some inner-mouth pixels; its
    half-width after the lips' corners came out negative and the opening far below shut (-5.5, session 51).
    It now reads as no mouth, like a piece under 3 columns; a real mouth's piece reads as before."""
    from stages.synth.analyze import MIN_MOUTH_HALF_WIDTH, _mouth_shape
    a0 = 20.0
    lips = np.zeros((12, 60), bool)
    inner = np.zeros_like(lips)
    lips[4:8, 30:34] = True                      # 4 columns: half-width 2 - 0.12 x 20 < 0
    inner[5:7, 31:33] = True
    assert _mouth_shape(inner, lips, a0) == (0.0, 0.0, 0.0)
    lips[4:8, 14:46] = True                      # a mouth of this identity's width: 32 columns
    inner[5:7, 16:44] = True
    opening, a, _ = _mouth_shape(inner, lips, a0)
    assert a == 16 - 0.12 * a0 and a > MIN_MOUTH_HALF_WIDTH * a0
    assert opening == inner.sum() / (np.pi * a)
