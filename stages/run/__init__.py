"""Running stages: the contract (contract.py), the runner (runner.py), local and Ray executors.

`run_stage` loads the runner (pyarrow, DuckDB, rich) on first use, so code that needs only the
contract's parameter helpers (the streaming engine on a GPU image without DuckDB) does not."""
from stages.run.contract import RunResult, Stage, base_row, not_param, ranged

__all__ = ["RunResult", "Stage", "base_row", "not_param", "ranged", "run_stage"]


def __getattr__(name: str):
    if name == "run_stage":
        from stages.run.runner import run_stage
        return run_stage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
