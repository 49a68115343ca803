"""The DuckDB run catalog: one row per stage run, with its lineage.

Connections are short-lived (open, write, close) so that two stages joined by a pipe, or a
`vidu runs` while a stage works, never hold the file lock at the same time for long; a locked
file is retried for a few seconds.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb

RUNS_DDL = """
CREATE TABLE IF NOT EXISTS runs (
    run_id        VARCHAR PRIMARY KEY,
    stage         VARCHAR NOT NULL,
    kind          VARCHAR NOT NULL,
    params        JSON,
    code_version  VARCHAR,
    inputs        JSON,
    output        VARCHAR,
    state         VARCHAR,      -- running | done | interrupted | failed
    rows_ok       BIGINT,
    rows_rejected BIGINT,
    rows_error    BIGINT,
    rows_reused   BIGINT,       -- rows taken from an earlier, unfinished attempt
    started_at    TIMESTAMP,
    ended_at      TIMESTAMP,
    seconds       DOUBLE,
    attempts      INTEGER
)
"""


class CatalogError(Exception):
    pass


@contextmanager
def connect(root: Path, read_only: bool = False, timeout_s: float = 30.0):
    path = root / "catalog.duckdb"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fresh = not path.exists()
            con = duckdb.connect(":memory:" if read_only and fresh else str(path), read_only=read_only and not fresh)
            break
        except duckdb.IOException as e:  # another process holds the lock
            if time.monotonic() > deadline:
                raise CatalogError(f"catalog {path} is locked by another process: {e}") from None
            time.sleep(0.1)
    try:
        if fresh or not read_only:
            con.execute(RUNS_DDL)
        yield con
    finally:
        con.close()


def record_start(root: Path, run_id: str, stage: str, kind: str, params: dict, code_version: str,
                 inputs: list[str], output: str) -> None:
    with connect(root) as con:
        con.execute(
            """INSERT INTO runs (run_id, stage, kind, params, code_version, inputs, output, state,
                                 started_at, attempts)
               VALUES (?, ?, ?, ?, ?, ?, ?, 'running', now(), 1)
               ON CONFLICT (run_id) DO UPDATE SET state = 'running', started_at = now(),
                   ended_at = NULL, code_version = excluded.code_version,
                   attempts = runs.attempts + 1""",
            [run_id, stage, kind, json.dumps(params, sort_keys=True), code_version,
             json.dumps(inputs), output],
        )


def record_end(root: Path, run_id: str, state: str, counts: dict[str, int], reused: int,
               seconds: float) -> None:
    with connect(root) as con:
        con.execute(
            """UPDATE runs SET state = ?, rows_ok = ?, rows_rejected = ?, rows_error = ?,
                   rows_reused = ?, ended_at = now(), seconds = ? WHERE run_id = ?""",
            [state, counts.get("ok", 0), counts.get("rejected", 0), counts.get("error", 0),
             reused, seconds, run_id],
        )


def runs(root: Path) -> list[dict]:
    with connect(root, read_only=True) as con:
        cur = con.execute("SELECT * FROM runs ORDER BY started_at")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def find_run(root: Path, prefix: str) -> dict | None:
    matches = [r for r in runs(root) if r["run_id"].startswith(prefix)]
    if len(matches) > 1:
        raise CatalogError(f"run id prefix {prefix!r} is ambiguous: {', '.join(r['run_id'] for r in matches)}")
    return matches[0] if matches else None


def query(root: Path, sql: str) -> tuple[list[str], list[tuple]]:
    """Run SQL with a view per stage over all its finished manifests (`<stage>`), the newest
    finished run's manifest (`<stage>_latest`), and the `runs` table."""
    with connect(root, read_only=True) as con:
        finished = con.execute(
            "SELECT stage, output FROM runs WHERE state = 'done' ORDER BY ended_at").fetchall()
        by_stage: dict[str, list[str]] = {}
        for stage, out in finished:
            if Path(out).is_file():
                by_stage.setdefault(stage, []).append(out)
        for stage, outs in by_stage.items():
            files = "[" + ", ".join("'" + o.replace("'", "''") + "'" for o in outs) + "]"
            con.execute(f'CREATE TEMP VIEW "{stage}" AS SELECT * FROM read_parquet({files}, union_by_name = true)')
            last = outs[-1].replace("'", "''")
            con.execute(f"CREATE TEMP VIEW \"{stage}_latest\" AS SELECT * FROM read_parquet('{last}')")
        cur = con.execute(sql)
        if cur.description is None:
            return [], []
        return [d[0] for d in cur.description], cur.fetchall()
