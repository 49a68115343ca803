"""Active speaker and A/V offset with head motion (issue 20): ../shared's retalking_1 as a small face
(~100 px) in a 1080x1920 portrait that pans 400 px across the frame, bobs 120 px and rolls +-7 degrees
over its 6 s keeps its speech `onscreen` and reads in sync; with its audio 0.5 s late it is rejected
`av_desync`; the same moving face dubbed with another speaker is `offscreen` and rejected
(`offscreen_speech`). Negative controls: the face located in one frame only (instead of LOCATE_FRAMES
from the first to the last frame) gives a crop the moving face leaves, so no face is tracked; and
landmarks fitted in the box where the face was last detected (track_face without `follow`, as before)
read the late audio at a confidence under the minimum, so the desync would pass."""
from __future__ import annotations

import numpy as np
import pytest

import stages.sense.mouth as mouth
from stages.diarize import MIN_AV_CONFIDENCE, Diarize, av_offset
from stages.sense.media import clip_audio, load_audio
from tests.test_diarize_avsync import delayed
from tests.test_diarize_portrait import DUB_OFFSET_S, clip_row, variant

# scale to 300 px, roll +-0.12 rad, then a 1080x1920 window that pans 400 px and bobs 120 px over the face
MOVING = ("scale=300:-2,rotate=a='0.12*sin(2*PI*t/2.5)',pad=1480:2040:600:1100,"
          "crop=1080:1920:x='400*t/6':y='60+60*sin(2*PI*t/3)'")


@pytest.fixture(scope="module")
def media(shared_media, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("motion")
    face = shared_media / "talking" / "retalking_1.mp4"
    own = load_audio(face)
    speech = load_audio(shared_media / "speech" / "silero_test.wav")
    other = speech[DUB_OFFSET_S * 16000:DUB_OFFSET_S * 16000 + len(own)]
    other = other * np.sqrt(np.mean(own ** 2) / np.mean(other ** 2))
    return {"moving": variant(face, tmp / "moving.mp4", MOVING), "dub": variant(face, tmp / "dub.mp4", MOVING, other),
            "late": variant(face, tmp / "late.mp4", MOVING, delayed(own, 0.5))}


@pytest.fixture(scope="module")
def rows(media) -> dict:
    stage = Diarize()
    stage.setup()
    return {k: stage.process(clip_row(p)) for k, p in media.items()}


def _face_share(path) -> float:
    row = clip_row(path)
    _, landmarks = mouth.mouth_landmarks(str(path), row["start_s"], row["end_s"], None)
    return float(np.mean(~np.isnan(landmarks[:, 0, 0])))


def test_the_face_moves_more_than_twice_its_width(media):
    row = clip_row(media["moving"])
    region, face = mouth.locate_face(str(media["moving"]), row["start_s"], row["end_s"], None)
    assert (face[2] - face[0]) * 1080 > 300  # the union of the located boxes: ~100 px face, 400 px pan
    assert region[0] <= face[0] and face[2] <= region[2]


def test_moving_face_keeps_onscreen_speech(rows, media):
    r = rows["moving"]
    assert (r["status"], r["reasons"]) == ("ok", [])
    assert r["speakers"] == 1 and r["offscreen_s"] == 0 and r["onscreen_s"] > 3.0
    assert all(t["category"] == "onscreen" and t["confidence"] >= Diarize.min_sync for t in r["speech_turns"])
    assert abs(r["av_offset_frames"]) <= Diarize.max_av_offset and r["av_sync_confidence"] >= MIN_AV_CONFIDENCE
    assert _face_share(media["moving"]) > 0.9


def test_late_audio_on_the_moving_face_is_av_desync(rows):
    r, own = rows["late"], rows["moving"]
    assert 11 <= r["av_offset_frames"] - own["av_offset_frames"] <= 14  # 0.5 s = 12.5 frames later
    assert r["av_sync_confidence"] >= MIN_AV_CONFIDENCE
    assert (r["status"], r["reasons"]) == ("rejected", ["av_desync"])
    assert r["onscreen_s"] > 3.0 and r["offscreen_s"] == 0


def test_dub_over_the_moving_face_is_offscreen(rows):
    r = rows["dub"]
    assert r["onscreen_s"] == 0 and r["offscreen_s"] > 3.0
    assert all(t["category"] == "offscreen" and t["confidence"] is not None and t["confidence"] < Diarize.min_sync
               for t in r["speech_turns"])
    assert (r["status"], r["reasons"]) == ("rejected", ["offscreen_speech"])


def test_control_one_located_frame_loses_the_moving_face(media, monkeypatch):
    monkeypatch.setattr(mouth, "LOCATE_FRAMES", 1)
    assert _face_share(media["moving"]) == 0.0


def test_control_a_box_that_does_not_follow_misses_the_desync(media, rows, monkeypatch):
    """The same late clip with the landmarks fitted in the last detected box (no `follow`): the lip-sync
    curve's peak falls under the minimum confidence, so the clip would not be av_desync."""
    plain = mouth.track_face
    monkeypatch.setattr(mouth, "track_face", lambda *a, **k: plain(*a, **{**k, "follow": False}))
    row = clip_row(media["late"])
    times, landmarks = mouth.mouth_landmarks(str(media["late"]), row["start_s"], row["end_s"], None)
    offset, confidence = av_offset(times, landmarks, clip_audio(str(media["late"]), row["start_s"], row["end_s"]))
    assert confidence < MIN_AV_CONFIDENCE <= rows["late"]["av_sync_confidence"]
