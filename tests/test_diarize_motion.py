"""Active speaker with head motion (issue 20): ../shared's retalking_1 as a small face (~100 px) in a
1080x1920 portrait that pans 400 px across the frame, bobs 120 px and rolls +-7 degrees over its 6 s
keeps its speech `onscreen`; the same moving face dubbed with another speaker is `offscreen` and
rejected (`offscreen_speech`). Negative control: the face located in one frame only (instead of
LOCATE_FRAMES spread over the clip) gives a crop the moving face leaves, no face is tracked, and
the clip's own speech would be called offscreen. The A/V offset is not measured here (--no-av-sync:
tests/test_diarize_avsync.py covers it)."""
from __future__ import annotations

import numpy as np
import pytest

import stages.sense.mouth as mouth
from stages.diarize import Diarize
from stages.sense.media import load_audio
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
    return {"moving": variant(face, tmp / "moving.mp4", MOVING), "dub": variant(face, tmp / "dub.mp4", MOVING, other)}


@pytest.fixture(scope="module")
def rows(media) -> dict:
    stage = Diarize(av_sync=False)
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
    assert _face_share(media["moving"]) > 0.9


def test_dub_over_the_moving_face_is_offscreen(rows):
    r = rows["dub"]
    assert r["onscreen_s"] == 0 and r["offscreen_s"] > 3.0
    assert all(t["category"] == "offscreen" and t["confidence"] is not None and t["confidence"] < Diarize.min_sync
               for t in r["speech_turns"])
    assert (r["status"], r["reasons"]) == ("rejected", ["offscreen_speech"])


def test_control_one_located_frame_loses_the_moving_face(media, monkeypatch):
    monkeypatch.setattr(mouth, "LOCATE_FRAMES", 1)
    assert _face_share(media["moving"]) == 0.0
