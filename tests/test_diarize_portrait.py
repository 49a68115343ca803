"""Active speaker on portrait and 1080p frames (issue 20): ../shared talking heads padded into a
1080x1920 portrait and a 1920x1080 frame with a small face keep their speech `onscreen`; the
portrait face dubbed with another speaker is `offscreen` and its clip is rejected
(`offscreen_speech`). Controls: at the 480 px analysis size alone (the old path) the portrait shows
no face, and with `max_offscreen_share` 1 the dub passes."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from scipy.io import wavfile

from stages.diarize import Diarize
from stages.run import base_row
from stages.sense.media import clip_frames, ffmpeg_exe, load_audio, open_container
from stages.sense.mouth import FACE_FPS, FACE_MAX_SIDE, track_face

DUB_OFFSET_S = 20  # into silero_test.wav; the dub's z-score is measured at about -0.5


def variant(src, out, vf: str, audio=None):
    """`src` re-encoded through the ffmpeg filter `vf` at 25 fps (H.264 ultrafast), with its own
    sound or the 16 kHz mono `audio`."""
    cmd = [ffmpeg_exe(), "-v", "error", "-y", "-i", str(src)]
    if audio is not None:
        wav = out.with_suffix(".wav")
        wavfile.write(wav, 16000, audio.astype(np.float32))
        cmd += ["-i", str(wav), "-map", "0:v", "-map", "1:a", "-shortest"]
    cmd += ["-vf", vf, "-r", "25", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(out)]
    subprocess.run(cmd, check=True)
    return out


def clip_row(path) -> dict:
    with open_container(path) as c:
        duration = float(c.duration / 1e6)
    return base_row("clips", id=path.stem, parent_id=path.stem, video_path=str(path), clip_index=0, shot_index=0,
                    start_s=0.0, end_s=duration, start_frame=0, end_frame=int(round(duration * 25)), fps=25.0,
                    duration_s=duration)


@pytest.fixture(scope="module")
def media(shared_media, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("portrait")
    face1, face2 = (shared_media / "talking" / f"retalking_{i}.mp4" for i in (1, 2))
    own = load_audio(face1)
    speech = load_audio(shared_media / "speech" / "silero_test.wav")
    other = speech[DUB_OFFSET_S * 16000:DUB_OFFSET_S * 16000 + len(own)]
    other = other * np.sqrt(np.mean(own ** 2) / np.mean(other ** 2))
    # portrait: the 524 px square scaled to 300 px (a ~100 px face) low in a 1080x1920 frame
    portrait = "scale=300:-2,pad=1080:1920:(ow-iw)/2:1100"
    return {"portrait": variant(face1, tmp / "portrait.mp4", portrait),
            # 1080p: the clip 450 px high at the right of a 1920x1080 frame (a ~220 px face)
            "hd": variant(face2, tmp / "hd.mp4", "scale=-2:450,pad=1920:1080:1100:300"),
            "dub": variant(face1, tmp / "dub.mp4", portrait, other)}


@pytest.fixture(scope="module")
def stage():
    s = Diarize()
    s.setup()
    return s


@pytest.fixture(scope="module")
def rows(media, stage) -> dict:
    return {k: stage.process(clip_row(p)) for k, p in media.items()}


@pytest.mark.parametrize("key, shape", [("portrait", (480, 270)), ("hd", (270, 480))])
def test_the_old_analysis_size_finds_no_face(media, key, shape):
    """The cause: at 480 px on the longer side the faces are ~25 and ~55 px, under HOG's ~80 px, so
    the old path (these frames only) had no mouth track and called all the speech offscreen."""
    frames, _ = clip_frames(media[key], 0.0, 1.0, fps=FACE_FPS, max_side=FACE_MAX_SIDE)
    assert frames.shape[1:3] == shape
    track = track_face(frames)
    assert track.detected.sum() == 5 and not track.found.any()


@pytest.mark.parametrize("key", ["portrait", "hd"])
def test_small_faces_keep_onscreen_speech(rows, key):
    r = rows[key]
    assert r["status"] == "ok" and r["reasons"] == [], key
    assert r["speakers"] == 1 and r["offscreen_s"] == 0 and r["onscreen_s"] > 3.0
    assert all(t["category"] == "onscreen" and t["confidence"] >= Diarize.min_sync for t in r["speech_turns"])


def test_dub_over_portrait_face_is_offscreen_and_rejected(rows):
    r = rows["dub"]
    assert r["onscreen_s"] == 0 and r["offscreen_s"] > 3.0
    assert all(t["category"] == "offscreen" and t["confidence"] is not None and t["confidence"] < Diarize.min_sync
               for t in r["speech_turns"])
    assert r["status"] == "rejected" and r["reasons"] == ["offscreen_speech"]


def test_offscreen_share_option_flips_the_verdict(media):
    loose = Diarize(max_offscreen_share=1.0)
    loose.setup()
    r = loose.process(clip_row(media["dub"]))
    assert r["offscreen_s"] > 3.0 and r["status"] == "ok" and r["reasons"] == []
