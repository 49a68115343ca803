"""Printing query results: a rich table on a terminal, JSON lines or CSV for pipes."""
from __future__ import annotations

import csv
import json
import sys

from rich.console import Console
from rich.table import Table


def print_rows(columns: list[str], rows: list[tuple], fmt: str | None, title: str | None = None) -> None:
    fmt = fmt or ("table" if sys.stdout.isatty() else "jsonl")
    if fmt == "jsonl":
        for r in rows:
            sys.stdout.write(json.dumps(dict(zip(columns, r)), default=str) + "\n")
    elif fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        w.writerows(rows)
    else:  # table (options.Format admits only table, jsonl and csv)
        t = Table(title=title, title_justify="left")
        for c in columns:
            t.add_column(c, overflow="fold")
        for r in rows:
            t.add_row(*("" if v is None else str(v) for v in r))
        Console().print(t)
