"""`vidu clip --materialize`: each clip file decodes to exactly frames [start_frame, end_frame) of
its source, counted as the decoder counts them (retalking_1: variable frame rate, video starting
at 0.033 s), with the source's content and timing."""

import av
import numpy as np
import pytest

from manifests.io import read_manifest, workspace
from stages.clip import Clip, cut_clip
from stages.run import run_stage
from stages.sense.media import video_index

SIDE = 64  # frames compared as 64x64 luma: the encoder's noise averages out, motion does not
TALKING = [f"retalking_{i}.mp4" for i in range(1, 6)]


def _decoded(path) -> tuple[np.ndarray, np.ndarray]:
    """[N, SIDE, SIDE] float32 luma and [N] presentation times (s) of every decoded frame."""
    with av.open(str(path)) as c:
        frames = [(f.reformat(width=SIDE, height=SIDE, format="gray").to_ndarray(), f.time) for f in c.decode(video=0)]
    return np.stack([f for f, _ in frames]).astype(np.float32), np.array([t for _, t in frames])


def _cuts(n: int, keyframes: list[int]) -> list[tuple[int, int]]:
    """~1 s pieces: at the very start, in the middle, at the end, and from each later keyframe."""
    cuts = [(0, 24), (n // 2 - 11, n // 2 + 14), (n - 27, n)]
    return cuts + [c for k in keyframes if k > 0 for c in ((k, k + 20), (k, n))]


def _mean_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b).mean(axis=(1, 2))


@pytest.mark.parametrize("name", TALKING)
def test_every_cut_holds_exactly_its_frames(shared_media, tmp_path, name):
    path = shared_media / "talking" / name
    index = video_index(path)
    src, src_t = _decoded(path)
    assert len(index) == len(src)  # the index counts what the decoder outputs
    assert np.allclose(index.pts * float(index.time_base), src_t)
    keyframes = [int(np.searchsorted(index.pts, k)) for k in index.keyframes]
    for a, b in _cuts(len(src), keyframes):
        out = tmp_path / f"{a}-{b}.mp4"
        method = cut_clip(str(path), index, a, b, out)
        got, got_t = _decoded(out)
        assert len(got) == b - a, (name, a, b, method)
        # timing kept, variable rate included: frame i shows at the source time of frame a + i
        assert np.abs((got_t - got_t[0]) - (src_t[a:b] - src_t[a])).max() < 1e-3
        diff = _mean_diff(got, src[a:b])
        if method == "copy":
            assert diff.max() == 0.0
        assert diff.max() < 0.5, (name, a, b, method, diff.max())  # grey levels of 255
        # negative control: the same frames one later or one earlier match worse
        for k in (-1, 1):
            if 0 <= a + k and b + k <= len(src):
                assert diff.mean() < 0.7 * _mean_diff(got, src[a + k:b + k]).mean(), (name, a, b, k)
        with av.open(str(out)) as c:
            (audio,) = c.streams.audio
            seconds = sum(f.samples for f in c.decode(audio)) / audio.rate
        assert seconds == pytest.approx(src_t[b] - src_t[a] if b < len(src) else index.time(b) - index.time(a),
                                        abs=0.05)


def test_copy_only_where_exact(shared_media, tmp_path):
    path = str(shared_media / "talking" / "retalking_1.mp4")
    index = video_index(path)
    key = int(np.searchsorted(index.pts, index.keyframes[1]))  # the second keyframe: frame 100
    assert key == 100 and len(index) == 135
    assert cut_clip(path, index, 0, len(index), tmp_path / "all.mp4") == "copy"
    assert cut_clip(path, index, key, len(index), tmp_path / "tail.mp4") == "copy"
    assert cut_clip(path, index, 0, key, tmp_path / "head.mp4") == "copy"  # ends where a keyframe starts
    assert cut_clip(path, index, 1, 30, tmp_path / "mid.mp4") == "reencode"
    assert cut_clip(path, index, key, key + 10, tmp_path / "key.mp4") == "reencode"
    with pytest.raises(ValueError, match=r"frames \[130, 136\) are not inside the video's 135 frames"):
        cut_clip(path, index, 130, 136, tmp_path / "bad.mp4")


def test_clip_stage_materializes_the_vfr_video(shared_media, tmp_path):
    """The issue-12 case: before, 'ffmpeg wrote 134 frames, expected 135' and no clips."""
    path = shared_media / "talking" / "retalking_1.mp4"
    out_dir = tmp_path / "clips"
    res = run_stage(Clip(materialize=str(out_dir)), [{"id": "r1", "path": str(path)}], ["x"], ["x"],
                    workspace(tmp_path / "w"), quiet=True)
    (row,) = read_manifest(res.path)[0].to_pylist()
    assert (row["status"], row["start_frame"], row["end_frame"], row["cut_method"]) == ("ok", 0, 135, "copy")
    # times of the first frame and of the end of the last one, not frame / average rate
    assert row["start_s"] == pytest.approx(507 / 15360) and row["end_s"] == pytest.approx(94203 / 15360)
    assert len(video_index(row["clip_path"])) == 135
    assert sorted(p.name for p in out_dir.iterdir()) == ["r1_0000.mp4"]


def test_rotated_source_is_written_upright(tmp_path):
    """A display matrix of 90 degrees (phone video): a copy keeps it, a re-encode turns the pixels."""
    import subprocess

    from stages.sense.media import ffmpeg_exe

    plain, rotated = tmp_path / "plain.mp4", tmp_path / "rotated.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=s=160x96:r=25:d=1", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", str(plain)], check=True)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-display_rotation", "90", "-i", str(plain), "-c", "copy", str(rotated)],
                   check=True)
    index = video_index(rotated)
    assert cut_clip(str(rotated), index, 0, 25, tmp_path / "copy.mp4") == "copy"
    assert cut_clip(str(rotated), index, 3, 20, tmp_path / "turned.mp4") == "reencode"
    with av.open(str(tmp_path / "copy.mp4")) as c:
        assert next(c.decode(video=0)).rotation == 90
    with av.open(str(tmp_path / "turned.mp4")) as c:
        turned = [f for f in c.decode(video=0)]
    with av.open(str(plain)) as c:
        src = [f.to_ndarray(format="rgb24").astype(float) for f in c.decode(video=0)][3:20]
    assert len(turned) == 17 and (turned[0].width, turned[0].height, turned[0].rotation) == (96, 160, 0)
    for f, s in zip(turned, src):
        upright = f.to_ndarray(format="rgb24").astype(float)
        assert np.abs(upright - np.rot90(s, 1)).mean() < 6.0  # counter-clockwise quarter turn (sharp test card)
        assert np.abs(upright - np.rot90(s, -1)).mean() > 30.0  # negative control: the other way round
