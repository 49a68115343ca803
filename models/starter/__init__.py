"""The starter model: the weights `vidu stream` runs when no --ckpt is given (issue 16).

    models/starter/student.safetensors   the distilled 3-step student (bf16; its "sampling" record streams it)
    models/starter/codec.safetensors     the autoencoder it was trained with (encodes the reference, decodes)

Both are written by `benchmarks/teacher_recipe.py --phase starter` from a recipe run's folder, with the
run's lineage and `vidu eval --bench synth` scores in the student's metadata ("starter"); README and
benchmarks/RESULTS.md give the same numbers. Their size is guarded by tests/test_starter.py.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
STUDENT = HERE / "student.safetensors"
CODEC = HERE / "codec.safetensors"
SIZE_LIMIT = 40 * 2 ** 20       # bytes of both files together: issue 16's "<= 40 MB in all", read as MiB (41.9e6)


def starter_checkpoint() -> Path:
    """The starter student's path; a one-line FileNotFoundError when the package lacks it."""
    if not STUDENT.is_file() or not CODEC.is_file():
        raise FileNotFoundError(f"the starter model is missing from {HERE} (a damaged install?): give --ckpt, "
                                "or --preset for random weights")
    return STUDENT


def starter_summary() -> str:
    """One line: what the starter model is and how it scored."""
    from models.checkpoint import read_metadata
    info = read_metadata(starter_checkpoint()).get("starter") or {}
    s = info.get("scores") or {}
    parts = [f"the starter model ({info.get('model', 'distilled student')}"]
    if s:
        parts.append(f"; synth bench: lip-sync r {s['mouth_r']:.2f}, instructions {100 * s['instr_success']:.0f} %")
    return "".join(parts) + ")"
