"""Stage 3: distillation of the causal teacher into a few-step streaming student (DMD, issue 17):
the student's self-rollout through the streaming engine (rollout.py) and the DMD losses (dmd.py)."""
