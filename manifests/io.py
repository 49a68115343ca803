"""Manifest files: atomic Parquet writes, reads, and the workspace layout.

Workspace (default ./vidu-work, or VIDU_HOME, or --workdir):
    catalog.duckdb                 the run catalog
    manifests/<stage>-<key>.parquet   one finished manifest per stage run
    runs/<stage>-<key>/part-*.parquet rows finished by an unfinished run (resume points)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schemas import SCHEMAS, STATUSES

META_KEY = b"vidu"


class ManifestError(Exception):
    """A manifest that cannot be read or does not fit its schema (one-line message)."""


def workspace(workdir: str | os.PathLike | None = None) -> Path:
    root = Path(workdir or os.environ.get("VIDU_HOME") or "vidu-work").expanduser().resolve()
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    return root


def to_table(rows: list[dict], kind: str) -> pa.Table:
    schema = SCHEMAS[kind]
    for r in rows:
        if r["status"] not in STATUSES:
            raise ValueError(f"row {r['id']}: status {r['status']!r} not in {STATUSES}")
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


def write_table(table: pa.Table, path: Path, meta: dict) -> Path:
    """Write atomically: a temp file in the same folder, fsync, rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_meta(path: Path) -> dict:
    md = pq.read_schema(path).metadata or {}
    return json.loads(md.get(META_KEY, b"{}"))


def read_manifest(path: str | os.PathLike) -> tuple[pa.Table, dict]:
    """Read a manifest and its metadata; raise ManifestError with a one-line reason."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest not found: {p}")
    try:
        table = pq.read_table(p)
        meta = read_meta(p)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise ManifestError(f"not a readable Parquet manifest: {p} ({type(e).__name__})") from None
    kind = meta.get("kind")
    if kind not in SCHEMAS:
        raise ManifestError(f"{p} is not a vidu manifest (no known kind in its metadata)")
    if not table.schema.equals(SCHEMAS[kind], check_metadata=False):
        raise ManifestError(f"{p}: columns do not match the pinned '{kind}' schema")
    return table, meta


def ok_rows(table: pa.Table) -> list[dict]:
    return [r for r in table.to_pylist() if r["status"] == "ok"]


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
