"""`vidu eval`: score generated avatar video (stages/eval/video.py) with the metrics of
stages/eval/metrics/ (identity, lip sync, quality, drift, instruction following)."""
