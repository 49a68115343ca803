from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from manifests import catalog
from manifests.io import ManifestError, read_manifest, workspace
from vidu_cli.options import Format, Workdir
from vidu_cli.report import clean_errors
from vidu_cli.tables import print_rows


def show(
    target: Annotated[str, typer.Argument(help="A manifest path or a run id (or a unique prefix).")],
    status: Annotated[Optional[str], typer.Option(help="Only rows with this status (ok | rejected | error).")] = None,
    reason: Annotated[Optional[str], typer.Option(help="Only rows carrying this reason code.")] = None,
    where: Annotated[Optional[str], typer.Option(help="A DuckDB SQL condition, e.g. \"duration_s > 10\".")] = None,
    columns: Annotated[Optional[str], typer.Option(help="Comma-separated columns (default: all).")] = None,
    limit: Annotated[int, typer.Option(min=0, help="At most this many rows (0: all).")] = 50,
    workdir: Workdir = None,
    format: Format = None,
) -> None:
    """Show the rows of a manifest or of a run's output, with filters.

    Example: vidu show prefilter-3fa2 --status rejected --columns path,reasons,error
    """
    with clean_errors():
        path = Path(target)
        if not path.is_file():
            run = catalog.find_run(workspace(workdir), target)
            if run is None:
                raise ManifestError(f"{target!r} is neither a manifest file nor a known run id")
            path = Path(run["output"])
        read_manifest(path)  # validates the file and its schema
        conds = []
        args: list = []
        if status:
            conds.append("status = ?")
            args.append(status)
        if reason:
            conds.append("list_contains(reasons, ?)")
            args.append(reason)
        if where:
            conds.append(f"({where})")
        sql = f"SELECT {columns or '*'} FROM read_parquet(?)" + (" WHERE " + " AND ".join(conds) if conds else "")
        sql += f" LIMIT {int(limit)}" if limit else ""
        import duckdb

        try:
            cur = duckdb.connect().execute(sql, [str(path)] + args)
        except duckdb.Error as e:
            raise ValueError(f"bad filter or column: {str(e).splitlines()[0]}") from None
        print_rows([d[0] for d in cur.description], cur.fetchall(), format, title=str(path))
