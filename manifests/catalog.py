"""The DuckDB run catalog: one row per stage run, with its lineage.

Connections are short-lived (open, write, close) so that two stages joined by a pipe, or a
`vidu runs` while a stage works, never hold the file lock at the same time for long; a locked
file is retried for a few seconds. A file that is not a DuckDB database (damaged) or cannot be
opened for another reason fails at once with the path and the fix. Paths are stored with
manifests.io.text_out (valid Unicode whatever the file name's bytes).
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb

from manifests.io import json_text, show_path, text_out

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


def _open_error(path: Path, e: duckdb.Error) -> CatalogError | None:
    """The one-line error for a catalog that cannot be opened; None for a lock held by another process
    (worth waiting for)."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    where = show_path(path)
    if re.search(r"lock", msg, re.I) and not re.search(r"read-only|permission", msg, re.I):
        return None
    if re.search(r"read-only file system", msg, re.I):
        return CatalogError(f"catalog {where} is on a read-only file system: pass --workdir DIR (or set "
                            f"VIDU_HOME) to a writable folder")
    if re.search(r"permission denied", msg, re.I):
        return CatalogError(f"no permission to open catalog {where}: make it writable (chmod u+w) or pass "
                            f"--workdir DIR")
    if re.search(r"no space", msg, re.I):
        return CatalogError(f"no space left on the device for catalog {where}: free some space and run the "
                            f"same command again")
    return CatalogError(f"catalog {where} is corrupt or unreadable ({msg}): move it aside (mv {where} "
                        f"{where}.bad) and run again; a new catalog is started, manifests are kept")


@contextmanager
def connect(root: Path, read_only: bool = False, timeout_s: float = 30.0):
    path = root / "catalog.duckdb"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fresh = not path.exists()
            con = duckdb.connect(":memory:" if read_only and fresh else str(path), read_only=read_only and not fresh)
            break
        except duckdb.Error as e:
            err = _open_error(path, e)
            if err is not None:
                raise err from None
            if time.monotonic() > deadline:
                raise CatalogError(f"catalog {show_path(path)} is locked by another process (still after "
                                   f"{timeout_s:.0f} s): wait for it to finish, or pass --workdir DIR") from None
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
            [run_id, stage, kind, json_text(params), code_version, json_text(inputs), text_out(output)],
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


READ_STATEMENTS = ("SELECT",)  # also DESCRIBE, SHOW, SUMMARIZE, FROM ..., VALUES, WITH ...
FILE_WRITING_STATEMENTS = ("COPY", "EXPORT")


def _statement_kind(statement) -> str:
    kind = statement.type.name
    if kind == "EXPLAIN":  # EXPLAIN [ANALYZE] runs its inner statement: judge that one
        inner = re.sub(r"^\s*EXPLAIN\s+(ANALYZE\s+)?", "", statement.query, flags=re.I)
        inner_statements = duckdb.connect().extract_statements(inner) if inner != statement.query else []
        return inner_statements[0].type.name if len(inner_statements) == 1 else kind
    return kind


def check_query(sql: str, allow_write_files: bool = False) -> None:
    """Refuse what a query tool must not do: empty input, changes to the catalog or its views, and
    (unless `allow_write_files`) writing files with COPY ... TO / EXPORT DATABASE."""
    try:
        statements = duckdb.connect().extract_statements(sql)
    except duckdb.Error as e:
        raise ValueError(str(e).splitlines()[0]) from None
    if not statements:
        raise ValueError('empty query: give a SQL statement, e.g. vidu sql "SELECT * FROM runs"')
    for st in statements:
        kind = _statement_kind(st)
        if kind in FILE_WRITING_STATEMENTS:
            if not allow_write_files:
                raise ValueError(f"{kind} writes files and vidu sql is read-only: add --allow-write-files to "
                                 f"write them")
        elif kind not in READ_STATEMENTS:
            raise ValueError(f"{kind} statements are refused: vidu sql is read-only (SELECT, DESCRIBE, SHOW, "
                             f"SUMMARIZE, EXPLAIN; COPY/EXPORT with --allow-write-files)")


def query(root: Path, sql: str, allow_write_files: bool = False) -> tuple[list[str], list[tuple]]:
    """Run SQL with a view per stage over all its finished manifests (`<stage>`), the newest
    finished run's manifest (`<stage>_latest`), and the `runs` table. Read-only (see check_query)."""
    check_query(sql, allow_write_files)
    with connect(root, read_only=True) as con:
        finished = con.execute(
            "SELECT stage, output FROM runs WHERE state = 'done' ORDER BY ended_at").fetchall()
        by_stage: dict[str, list[str]] = {}
        for stage, out in finished:
            if Path(out).is_file():  # (a workspace whose path is not UTF-8 gets no views: DuckDB cannot name it)
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


# --- A/B votes (stages/eval/ab.py): one row per criterion judged on one pair of videos
VOTES_DDL = """
CREATE TABLE IF NOT EXISTS votes (
    vote_id     VARCHAR PRIMARY KEY,
    run_a       VARCHAR NOT NULL,
    run_b       VARCHAR NOT NULL,
    sample_id   VARCHAR NOT NULL,
    criterion   VARCHAR NOT NULL,   -- controllability | motion | sync | overall
    choice      VARCHAR NOT NULL,   -- a | b | tie (unblinded: which run was preferred)
    a_side      VARCHAR NOT NULL,   -- left | right: where run A was shown
    voter       VARCHAR,
    created_at  TIMESTAMP
)
"""
VOTE_COLUMNS = ("vote_id", "run_a", "run_b", "sample_id", "criterion", "choice", "a_side", "voter")


def record_votes(root: Path, votes: list[dict]) -> None:
    """Insert votes (dicts with VOTE_COLUMNS) in one transaction."""
    with connect(root) as con:
        con.execute(VOTES_DDL)
        con.executemany(f"INSERT INTO votes ({', '.join(VOTE_COLUMNS)}, created_at) VALUES "
                        f"({', '.join('?' for _ in VOTE_COLUMNS)}, now())",
                        [[v[k] for k in VOTE_COLUMNS] for v in votes])


def read_votes(root: Path, run_a: str, run_b: str) -> list[dict]:
    """Votes on the pair (run_a, run_b), oldest first; [] when none were cast."""
    with connect(root, read_only=True) as con:
        if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'votes'").fetchone()[0]:
            return []
        cur = con.execute("SELECT * FROM votes WHERE run_a = ? AND run_b = ? ORDER BY created_at, vote_id",
                          [run_a, run_b])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]
