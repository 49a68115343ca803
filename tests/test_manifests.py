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


def test_older_manifests_gain_later_nullable_columns(tmp_path):
    """A manifest written before nullable columns joined its schema reads with them as nulls, in the
    pinned order; anything else that differs is still refused."""
    full = to_table([_video_row(0), _video_row(1, "rejected")], "videos")
    nullable = [f.name for f in VIDEOS if f.nullable and f.name not in ("parent_id", "error")][:2]
    assert len(nullable) == 2
    old = full.drop_columns(nullable)
    path = write_table(old, tmp_path / "old.parquet", {"kind": "videos"})
    table, _ = read_manifest(path)
    assert table.schema.equals(VIDEOS, check_metadata=False)
    assert all(v is None for k in nullable for v in table.column(k).to_pylist())
    assert table.drop_columns(nullable).equals(old)
    for name, bad in (("required", full.drop_columns(["path"])),                         # a non-null column missing
                      ("extra", full.append_column("surprise", pa.array([1, 2]))),       # a column the schema lacks
                      ("retyped", full.set_column(full.schema.get_field_index("width"), "width",
                                                  pa.array(["640", "640"])))):        # another type
        f = write_table(bad, tmp_path / f"{name}.parquet", {"kind": "videos"})
        with pytest.raises(ManifestError, match="do not match the pinned 'videos' schema"):
            read_manifest(f)


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


def test_non_utf8_text_roundtrips_through_a_manifest(tmp_path):
    import os

    from manifests.io import ok_rows, rows

    name = os.fsdecode(b"/data/caf\xe9.mp4")
    row = _video_row(0)
    row.update(path=name, error="cannot read /data/caf\udce9.mp4", reasons=["x\udcff"])
    path = write_table(to_table([row, _video_row(1)], "videos"), tmp_path / "v.parquet", {"kind": "videos"})
    table, _ = read_manifest(path)
    assert table.column("path").to_pylist() == ["/data/caf\ufffdDCE9.mp4", "/data/1.mp4"]  # valid UTF-8 on disk
    back = rows(table)
    assert back[0] == row and back[1] == _video_row(1)
    assert os.fsencode(ok_rows(table)[0]["path"]) == b"/data/caf\xe9.mp4"
    with pytest.raises(UnicodeEncodeError):  # negative control: what pyarrow does without the escape
        pa.array([name])


def test_catalog_takes_non_utf8_inputs(tmp_path):
    import json
    import os

    root = workspace(tmp_path / "w")
    raw = os.fsdecode(b"/media/caf\xe9.mp4")
    catalog.record_start(root, "prefilter-x", "prefilter", "videos", {"model": raw}, "0", [raw], str(root / "o"))
    (run,) = catalog.runs(root)
    assert json.loads(run["inputs"]) == ["/media/caf\ufffdDCE9.mp4"]
    assert json.loads(run["params"]) == {"model": "/media/caf\ufffdDCE9.mp4"}
