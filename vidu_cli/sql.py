from __future__ import annotations

from typing import Annotated

import duckdb
import typer

from manifests import catalog
from manifests.io import workspace
from vidu_cli.options import Format, Workdir
from vidu_cli.report import clean_errors
from vidu_cli.tables import print_rows


def sql(
    query: Annotated[str, typer.Argument(help="SQL over the views named after stages and the runs table.")],
    allow_write_files: Annotated[bool, typer.Option(
        "--allow-write-files", help="Allow COPY ... TO and EXPORT DATABASE to write files.")] = False,
    workdir: Workdir = None,
    format: Format = None,
) -> None:
    """Query all manifests with DuckDB, read-only. Each stage has a view over all its finished runs
    (e.g. `prefilter`, `clip`) and one over its newest run (`prefilter_latest`).

    Example: vidu sql "SELECT unnest(reasons) AS r, count(*) FROM prefilter GROUP BY r"
    """
    with clean_errors():
        catalog.check_query(query, allow_write_files)  # before the workspace is touched
        try:
            columns, rows = catalog.query(workspace(workdir), query, allow_write_files)
        except duckdb.Error as e:
            raise ValueError(str(e).splitlines()[0]) from None
        print_rows(columns, rows, format)
