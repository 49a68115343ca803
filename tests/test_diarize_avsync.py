"""vidu diarize's A/V offset per clip (`vidu eval`'s lip-sync proxy on diarize's own face track) on a
real talking head (retalking_1: variable frame rate, video starting at 0.033 s) whose audio is
delayed by known amounts: own audio |offset| <= 1; +0.5 s reads 12-13 frames later and is rejected
`av_desync` (or kept with --fix-av-offset, the lag recorded); +80 ms (2 frames) is kept at the default
threshold; another clip's audio (negative control) reads a large offset at a confidence under the
minimum and is not av_desync; no face, no speech or a clip too short (2.1 s): null offset, no av_desync."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from scipy.io import wavfile

from manifests.io import read_manifest, to_table, write_table
from stages.diarize import MIN_AV_CONFIDENCE, Diarize
from stages.run import base_row
from stages.sense.media import ffmpeg_exe, load_audio, open_container
from tests.conftest import cli

SR = 16000
# a 2.1 s clip of retalking_1 with 1.2 s of speech: its speaker z-score is 2.6 (2.1 with the retired
# first-frame-at-or-after sampling); on 2.1 s the z-score is noisy, [0, 2.1] read 1.4 then and -0.8 now
SHORT = (3.0, 5.1)


def clip_row(path, end_s: float | None = None, start_s: float = 0.0) -> dict:
    with open_container(path) as c:
        fps = float(c.streams.video[0].average_rate)
        end = float(c.duration / 1e6) if end_s is None else end_s
    return base_row("clips", id=path.stem, parent_id=path.stem, video_path=str(path), clip_index=0, shot_index=0,
                    start_s=start_s, end_s=end, start_frame=int(round(start_s * fps)), end_frame=int(round(end * fps)),
                    fps=fps, duration_s=end - start_s)


def remux(video, audio: np.ndarray, out):
    """The video stream of `video` with `audio` (16 kHz mono) as its sound track (AAC), cut to the shorter."""
    wav = out.with_suffix(".wav")
    wavfile.write(wav, SR, audio.astype(np.float32))
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(video), "-i", str(wav), "-map", "0:v", "-map", "1:a",
                    "-c:v", "copy", "-c:a", "aac", "-shortest", str(out)], check=True)
    return out


def delayed(x: np.ndarray, seconds: float) -> np.ndarray:
    """`x` starting `seconds` later (silence before), the same length."""
    return np.r_[np.zeros(int(round(seconds * SR)), np.float32), x][:len(x)]


@pytest.fixture(scope="module")
def media(shared_media, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("avsync")
    face = shared_media / "talking" / "retalking_1.mp4"
    own = load_audio(face)
    other = load_audio(shared_media / "talking" / "retalking_4.mp4")[:len(own)]
    return {"own": face,
            "late_500ms": remux(face, delayed(own, 0.5), tmp / "late_500ms.mp4"),
            "late_80ms": remux(face, delayed(own, 0.08), tmp / "late_80ms.mp4"),
            "other_voice": remux(face, other, tmp / "other_voice.mp4"),  # retalking_4's speech under retalking_1's face
            "no_face": remux(shared_media / "scenes" / "countdown.mp4", own, tmp / "no_face.mp4"),
            "no_speech": shared_media / "scenes" / "chaplin.mp4"}


@pytest.fixture(scope="module")
def rows(media) -> dict:
    stage = Diarize()
    stage.setup()
    out = {k: stage.process(clip_row(p)) for k, p in media.items()}
    out["too_short"] = stage.process(clip_row(media["own"], SHORT[1], SHORT[0]))  # 52 frames on the 25 fps grid < 55
    return out


def test_defaults():
    assert (Diarize.max_av_offset, Diarize.min_av_confidence, Diarize.fix_av_offset) == (3, MIN_AV_CONFIDENCE, False)
    assert MIN_AV_CONFIDENCE == 0.40


def test_own_audio_is_in_sync_and_kept(rows):
    r = rows["own"]
    assert (r["status"], r["reasons"]) == ("ok", [])
    assert abs(r["av_offset_frames"]) <= 1 and r["av_sync_confidence"] >= MIN_AV_CONFIDENCE
    assert r["av_shift_s"] is None
    assert r["onscreen_s"] > 3.0 and r["offscreen_s"] == 0


def test_audio_half_a_second_late_is_av_desync(rows):
    r = rows["late_500ms"]
    assert 12 <= r["av_offset_frames"] - rows["own"]["av_offset_frames"] <= 13  # 0.5 s = 12.5 frames later than its own
    assert r["av_sync_confidence"] >= MIN_AV_CONFIDENCE
    assert (r["status"], r["reasons"]) == ("rejected", ["av_desync"])
    assert r["av_shift_s"] is None
    # the speaker analysis reads the sound at the measured lag: the face is still the speaker
    assert r["onscreen_s"] > 2.5 and r["offscreen_s"] == 0


def test_two_frames_late_is_kept_at_the_default_threshold(rows):
    r = rows["late_80ms"]
    assert abs(r["av_offset_frames"]) <= Diarize.max_av_offset
    assert 1 <= r["av_offset_frames"] - rows["own"]["av_offset_frames"] <= 3  # 2 frames later than its own
    assert (r["status"], r["reasons"]) == ("ok", [])


def test_another_voice_reads_a_lag_without_confidence(rows):
    """Negative control: retalking_4's speech under retalking_1's face. The curve still has a peak
    (far from 0), but under the minimum confidence, so no av_desync: what rejects a dub is the
    active-speaker analysis (offscreen_speech), or nothing."""
    r, own = rows["other_voice"], rows["own"]
    assert abs(r["av_offset_frames"]) > Diarize.max_av_offset
    assert r["av_sync_confidence"] < MIN_AV_CONFIDENCE < own["av_sync_confidence"]
    assert "av_desync" not in r["reasons"] and r["av_shift_s"] is None


def test_unmeasurable_offset_is_null_and_never_rejects(rows):
    r = rows["no_face"]  # speech over a film leader: no face, the speech is offscreen
    assert r["clean_speech_s"] > 3.0 and r["onscreen_s"] == 0
    assert (r["status"], r["reasons"]) == ("rejected", ["offscreen_speech"])
    r = rows["no_speech"]
    assert (r["status"], r["reasons"]) == ("rejected", ["no_speech"])
    r = rows["too_short"]  # 2.1 s of the talking head: under the proxy's 2.2 s, otherwise a kept clip
    assert (r["status"], r["reasons"]) == ("ok", []) and r["onscreen_s"] > 1.0  # its 1.2 s of speech
    for k in ("no_face", "no_speech", "too_short"):
        assert (rows[k]["av_offset_frames"], rows[k]["av_sync_confidence"], rows[k]["av_shift_s"]) == (None, None, None), k


def test_cli_fix_av_offset_keeps_the_late_clip_with_its_lag(media, rows, tmp_path):
    clips = tmp_path / "clips.parquet"
    write_table(to_table([clip_row(media["late_500ms"]), clip_row(media["own"], SHORT[1], SHORT[0])],
                         "clips"), clips, {"kind": "clips"})
    proc = cli("diarize", "--from", str(clips), "--workdir", str(tmp_path / "w"), "--fix-av-offset")
    table, meta = read_manifest(proc.stdout.strip())
    assert meta["kind"] == "diarized"
    by_id = {r["id"]: r for r in table.to_pylist()}
    r = by_id["late_500ms"]
    assert (r["status"], r["reasons"]) == ("ok", [])
    assert r["av_offset_frames"] == rows["late_500ms"]["av_offset_frames"]
    assert r["av_sync_confidence"] == pytest.approx(rows["late_500ms"]["av_sync_confidence"])
    assert r["av_shift_s"] == pytest.approx(r["av_offset_frames"] / 25)
    assert all(t["category"] == "onscreen" and t["kept"] for t in r["speech_turns"])
    short = by_id["retalking_1"]
    assert (short["status"], short["reasons"]) == ("ok", [])
    assert (short["av_offset_frames"], short["av_sync_confidence"], short["av_shift_s"]) == (None, None, None)


def test_no_av_sync_skips_the_measurement(media, rows, monkeypatch, tmp_path):
    """--no-av-sync: the offset is never measured (the estimator is not called), its fields are null,
    and the late clip is judged on the rest (its lag then reads as offscreen speech or not: not av_desync)."""
    import stages.diarize as diarize
    monkeypatch.setattr(diarize, "av_offset", lambda *a: pytest.fail("measured with --no-av-sync"))
    stage = Diarize(av_sync=False)
    stage.setup()
    r = stage.process(clip_row(media["own"]))
    assert (r["av_offset_frames"], r["av_sync_confidence"], r["av_shift_s"]) == (None, None, None)
    assert (r["status"], r["reasons"]) == ("ok", []) and r["onscreen_s"] == rows["own"]["onscreen_s"]
    assert "av_desync" not in stage.process(clip_row(media["late_500ms"]))["reasons"]
    clips = tmp_path / "clips.parquet"
    write_table(to_table([clip_row(media["own"])], "clips"), clips, {"kind": "clips"})
    table, _ = read_manifest(cli("diarize", "--from", str(clips), "--workdir", str(tmp_path / "w"),
                                 "--no-av-sync").stdout.strip())
    assert table.to_pylist()[0]["av_offset_frames"] is None                # in this process: not measured either

