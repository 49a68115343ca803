"""stdin/stdout piping: stages print their output manifest path on stdout and read input
manifest paths from stdin, so `vidu prefilter raw/ | vidu clip` chains."""
from __future__ import annotations

import sys
from pathlib import Path

from manifests.io import ManifestError


def input_manifests(explicit: list[Path] | None, stdin=None) -> list[Path]:
    """`--from` paths if given, else the non-empty lines of stdin when it is not a terminal."""
    if explicit:
        return [Path(p) for p in explicit]
    stdin = sys.stdin if stdin is None else stdin
    if stdin is None or stdin.closed or stdin.isatty():
        raise ManifestError("no input manifest: pass --from PATH or pipe one in (e.g. vidu prefilter DIR | vidu clip)")
    paths = [Path(line.strip()) for line in stdin.read().splitlines() if line.strip()]
    if not paths:
        raise ManifestError("no input manifest on stdin (did the previous stage fail?)")
    return paths


def emit(path: Path) -> None:
    """Print the output manifest path on stdout (data channel)."""
    print(str(path), flush=True)
