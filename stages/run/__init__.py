"""Running stages: the contract (contract.py), the runner (runner.py), local and Ray executors."""
from stages.run.contract import RunResult, Stage, base_row, not_param, ranged
from stages.run.runner import run_stage

__all__ = ["RunResult", "Stage", "base_row", "not_param", "ranged", "run_stage"]
