import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests import catalog
from manifests.io import ManifestError, read_manifest, to_table, workspace, write_table
from manifests.schemas import CLIPS, SCHEMAS, VIDEOS
from stages.run import base_row


def _video_row(i: int, status: str = "ok") -> dict:
    return base_row("videos", id=f"v{i}", path=f"/data/{i}.mp4", status=status, run_id="r1",
                    reasons=[] if status == "ok" else ["low_fps"], width=640, height=360, phash=[1, 2**64 - 1])


def test_schemas_are_pinned():
    common = ["id", "parent_id", "status", "reasons", "run_id", "error"]
    for schema in SCHEMAS.values():
        assert schema.names[:6] == common
        assert schema.field("reasons").type == pa.list_(pa.string())
    assert VIDEOS.field("phash").type == pa.list_(pa.uint64())
    assert CLIPS.field("start_frame").type == pa.int64()


def test_write_is_atomic_and_roundtrips(tmp_path):
    path = tmp_path / "m" / "videos.parquet"
    rows = [_video_row(0), _video_row(1, "rejected")]
    write_table(to_table(rows, "videos"), path, {"kind": "videos", "run_id": "r1"})
    assert [p.name for p in path.parent.iterdir()] == ["videos.parquet"]  # no temp file left
    table, meta = read_manifest(path)
    assert meta == {"kind": "videos", "run_id": "r1"}
    back = table.to_pylist()
    assert back[1]["reasons"] == ["low_fps"] and back[0]["phash"] == [1, 2**64 - 1]
    assert table.schema.equals(VIDEOS, check_metadata=False)


def test_bad_rows_and_files_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="status 'maybe'"):
        to_table([_video_row(0, "maybe")], "videos")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(ManifestError, match="not a readable Parquet manifest"):
        read_manifest(junk)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    with pytest.raises(ManifestError, match="not a vidu manifest"):
        read_manifest(plain)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "missing.parquet")


def test_catalog_records_lineage_and_views(tmp_path):
    root = workspace(tmp_path / "w")
    out = root / "manifests" / "prefilter-x.parquet"
    write_table(to_table([_video_row(0), _video_row(1, "rejected")], "videos"), out, {"kind": "videos"})
    catalog.record_start(root, "prefilter-x", "prefilter", "videos", {"min_fps": 15.0}, "0.1.0", ["raw/"], str(out))
    assert catalog.runs(root)[0]["state"] == "running"
    catalog.record_end(root, "prefilter-x", "done", {"ok": 1, "rejected": 1}, 0, 1.5)
    (run,) = catalog.runs(root)
    assert (run["state"], run["rows_ok"], run["rows_rejected"], run["rows_error"]) == ("done", 1, 1, 0)
    assert catalog.find_run(root, "prefilter")["output"] == str(out)
    cols, rows = catalog.query(root, "SELECT status, count(*) FROM prefilter GROUP BY status ORDER BY status")
    assert rows == [("ok", 1), ("rejected", 1)]
    cols, rows = catalog.query(root, "SELECT count(*) FROM prefilter_latest")
    assert rows == [(2,)]
