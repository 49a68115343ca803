"""The common body of the curation-chain commands (filter, diarize, caption, embed): read the input
manifests (any earlier kind of the chain), run the stage over their ok rows, report."""
from __future__ import annotations

from pathlib import Path

from manifests.io import ManifestError, file_digest, ok_rows, read_manifest, workspace
from manifests.pipe import input_manifests
from manifests.schemas import CHAIN
from stages.run import RunResult, Stage, run_stage
from vidu_cli.report import finish


def chain_items(paths: list[Path], accepts: tuple[str, ...]) -> tuple[list[dict], list[str]]:
    """ok rows of the input manifests (whole rows) and a fingerprint of their content."""
    items, fp = [], []
    for p in paths:
        table, meta = read_manifest(p)
        if meta["kind"] not in accepts:
            raise ManifestError(f"{p} is a '{meta['kind']}' manifest; this stage reads {' | '.join(accepts)}")
        items += ok_rows(table)
        fp.append(file_digest(p))
    return items, fp


def run_chain(stage: Stage, from_: list[Path] | None, workdir, workers: int, quiet: bool, strict: bool,
              executor: str = "local", ray_address: str | None = None,
              accepts: tuple[str, ...] | None = None) -> RunResult:
    """Run a chain stage on the manifests given by --from or stdin; print the output path."""
    if accepts is None:
        accepts = CHAIN[: CHAIN.index(stage.kind)] if stage.kind in CHAIN else CHAIN
    root = workspace(workdir)
    paths = input_manifests(from_)
    items, fp = chain_items(paths, accepts)
    result = run_stage(stage, items, fp, [str(Path(p).resolve()) for p in paths], root, workers=workers,
                       quiet=quiet, executor=executor, ray_address=ray_address)
    finish(result, quiet, strict)
    return result
