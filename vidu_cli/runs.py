from __future__ import annotations

from vidu_cli.options import Format, Workdir
from vidu_cli.report import clean_errors
from vidu_cli.tables import print_rows
from manifests import catalog
from manifests.io import workspace

COLUMNS = ["run_id", "stage", "state", "rows_ok", "rows_rejected", "rows_error", "rows_reused", "seconds",
           "started_at", "code_version", "output"]


def runs(workdir: Workdir = None, format: Format = None) -> None:
    """List stage runs recorded in the catalog, oldest first.

    Example: vidu runs --format csv > runs.csv
    """
    with clean_errors():
        rows = catalog.runs(workspace(workdir))
        print_rows(COLUMNS, [tuple(r[c] for c in COLUMNS) for r in rows], format, title="runs")
