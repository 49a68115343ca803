"""Manifest files: atomic Parquet writes, reads, and the workspace layout.

Workspace (default ./vidu-work, or VIDU_HOME, or --workdir):
    catalog.duckdb                 the run catalog
    manifests/<stage>-<key>.parquet   one finished manifest per stage run
    runs/<stage>-<key>/part-*.parquet rows finished by an unfinished run (resume points)
    corrupt/                       damaged part files and manifests, set aside (never trusted)

Text that is not valid Unicode (a file name that is not UTF-8 arrives from os.fsdecode as
surrogate-escaped text, e.g. b"caf\xe9.mp4" -> "caf\udce9.mp4") cannot be stored in Parquet or
DuckDB. `text_out` escapes every surrogate code point as U+FFFD followed by its 4 upper-case hex
digits ("caf\ufffdDCE9.mp4"), and a literal U+FFFD followed by 4 hex digits as "\ufffdFFFD" + those
digits; every other string is stored unchanged. `text_in` undoes it exactly, so
os.fsencode(text_in(stored)) gives back the original bytes. `to_table` escapes and `rows` unescapes.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schemas import SCHEMAS, STATUSES

META_KEY = b"vidu"


class ManifestError(Exception):
    """A manifest that cannot be read or does not fit its schema (one-line message)."""


class WorkspaceError(ManifestError):
    """The workspace cannot be used (not a folder, read-only, disk full, damaged): the message names
    the path and the fix."""


# ---------------------------------------------------------------------------------------------
# text that is not valid Unicode (see the module docstring)

ESC = "\ufffd"
_NEEDS_ESCAPE = re.compile("[\ud800-\udfff]|\ufffd(?=[0-9A-F]{4})")
_ESCAPED = re.compile("\ufffd([0-9A-F]{4})")


def text_out(s: str) -> str:
    """`s` as valid Unicode that `text_in` turns back into `s` (identity for ordinary text)."""
    if s.isascii():
        return s
    return _NEEDS_ESCAPE.sub(lambda m: ESC + f"{ord(m.group()):04X}", s)


def text_in(s: str) -> str:
    if ESC not in s:
        return s
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), s)


def _map_text(value, fn):
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_text(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_text(v, fn) for k, v in value.items()}
    return value


def json_text(value) -> str:
    """JSON of `value` with its strings escaped by `text_out` (DuckDB's JSON refuses lone surrogates)."""
    return json.dumps(_map_text(value, text_out), sort_keys=True)


_SURROGATE = re.compile("[\ud800-\udfff]")


def show_text(s: str) -> str:
    """`s` for a message: surrogates written as `text_out` writes them, the rest as is (for display:
    applying it twice changes nothing)."""
    return s if s.isascii() else _SURROGATE.sub(lambda m: ESC + f"{ord(m.group()):04X}", s)


def show_path(p: str | os.PathLike) -> str:
    """A path for a message: printable text, never an encoding error."""
    return show_text(os.fsdecode(p))


# ---------------------------------------------------------------------------------------------
# workspace

def os_fault(e: OSError, path: str | os.PathLike) -> WorkspaceError:
    """One line for an OSError met while writing `path` under the workspace: what, where, and the fix."""
    where = show_path(path)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return WorkspaceError(f"no space left on the device writing {where}: free some space (or pass --workdir "
                              f"DIR on another disk) and run the same command again; finished rows are kept")
    if e.errno == errno.EROFS:
        return WorkspaceError(f"{where} is on a read-only file system: pass --workdir DIR (or set VIDU_HOME) "
                              f"to a writable folder")
    if e.errno in (errno.EACCES, errno.EPERM):
        return WorkspaceError(f"no permission to write {where}: make it writable (chmod u+w) or pass --workdir "
                              f"DIR (or set VIDU_HOME) to a writable folder")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return WorkspaceError(f"{where} is not a folder: pass --workdir DIR (or set VIDU_HOME) to a folder")
    return WorkspaceError(f"cannot write {where}: {e.strerror or e}")


def workspace(workdir: str | os.PathLike | None = None) -> Path:
    source = "--workdir" if workdir else "VIDU_HOME" if os.environ.get("VIDU_HOME") else "the default workspace"
    root = Path(workdir or os.environ.get("VIDU_HOME") or "vidu-work").expanduser().resolve()
    if show_text(str(root)) != str(root):
        raise WorkspaceError(f"workspace {show_path(root)} (from {source}) has a name that is not UTF-8, which the "
                             f"DuckDB catalog cannot open: pass --workdir DIR (or set VIDU_HOME) to a folder with "
                             f"a UTF-8 name")
    if root.exists() and not root.is_dir():
        raise WorkspaceError(f"workspace {show_path(root)} (from {source}) is a file, not a folder: pass --workdir "
                             f"DIR or set VIDU_HOME to a folder (or move the file away)")
    try:
        (root / "manifests").mkdir(parents=True, exist_ok=True)
        (root / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_fault(e, e.filename or root) from None
    return root


def check_writable(root: Path) -> None:
    """Create and remove a file in the workspace, so a read-only or full one fails before any work."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".probe.", dir=root / "runs")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise os_fault(e, root) from None


def set_aside(path: Path, root: Path) -> Path:
    """Move a damaged file to <root>/corrupt/ (kept for inspection, never read again)."""
    dest_dir = root / "corrupt"
    dest_dir.mkdir(parents=True, exist_ok=True)
    name = f"{path.parent.name}-{path.name}" if path.parent.parent == root / "runs" else path.name
    dest = dest_dir / name
    n = 1
    while dest.exists():
        dest, n = dest_dir / f"{name}.{n}", n + 1
    os.replace(path, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# tables

def to_table(rows: list[dict], kind: str) -> pa.Table:
    schema = SCHEMAS[kind]
    for r in rows:
        if r["status"] not in STATUSES:
            raise ValueError(f"row {r['id']}: status {r['status']!r} not in {STATUSES}")
    cols = {f.name: [_map_text(r.get(f.name), text_out) for r in rows] if _has_text(f.type)
            else [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


def _has_text(t: pa.DataType) -> bool:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return True
    return any(_has_text(t.field(i).type) for i in range(t.num_fields))


def rows(table: pa.Table) -> list[dict]:
    """The rows of a manifest table as dicts, with `to_table`'s text escapes undone."""
    out = table.to_pylist()
    text = [f.name for f in table.schema if _has_text(f.type)]
    for r in out:
        for name in text:
            if r[name] is not None:
                r[name] = _map_text(r[name], text_in)
    return out


def write_table(table: pa.Table, path: Path, meta: dict) -> Path:
    """Write atomically: a temp file in the same folder, fsync, rename over the target. A write the
    device refuses (full, read-only) raises WorkspaceError naming the path; the target is untouched."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise os_fault(e, path) from None
        raise
    return path


def read_meta(path: Path) -> dict:
    md = pq.read_schema(path).metadata or {}
    return json.loads(md.get(META_KEY, b"{}"))


def read_manifest(path: str | os.PathLike) -> tuple[pa.Table, dict]:
    """Read a manifest and its metadata; raise ManifestError with a one-line reason."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest not found: {show_path(p)}")
    try:
        table = pq.read_table(p)
        meta = read_meta(p)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise ManifestError(f"not a readable Parquet manifest: {show_path(p)} ({type(e).__name__})") from None
    kind = meta.get("kind")
    if kind not in SCHEMAS:
        raise ManifestError(f"{show_path(p)} is not a vidu manifest (no known kind in its metadata)")
    table = _pinned(table, SCHEMAS[kind])
    if table is None:
        raise ManifestError(f"{show_path(p)}: columns do not match the pinned '{kind}' schema")
    return table, meta


def _pinned(table: pa.Table, schema: pa.Schema) -> pa.Table | None:
    """`table` in the pinned `schema`: as it is when it matches; a manifest written before nullable
    columns were added to its schema gains them as nulls, in the schema's order (an older `vidu eval`
    run stays comparable); None when anything else differs (a column missing that may not be null, one
    the schema lacks, another type)."""
    if table.schema.equals(schema, check_metadata=False):
        return table
    have = {f.name: f for f in table.schema}
    if set(have) - set(schema.names):
        return None
    cols = []
    for f in schema:
        if f.name in have:
            if not have[f.name].equals(f, check_metadata=False):
                return None
            cols.append(table.column(f.name))
        elif f.nullable:
            cols.append(pa.nulls(table.num_rows, f.type))
        else:
            return None
    return pa.Table.from_arrays(cols, schema=schema)


def ok_rows(table: pa.Table) -> list[dict]:
    return [r for r in rows(table) if r["status"] == "ok"]


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
