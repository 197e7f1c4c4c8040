"""The quality study: grids of training runs (arms x learning rates x seeds) through the real
loop, resumable across device calls, and a report. See docs/study.md.

    grid.py     Grid / Arm / StudyData, the plan (sweep, edge extension, seeds at the best lr)
    runner.py   running a plan inside a time budget; data preparation; packing the results
    results.py  result.json and metrics.jsonl of a run
    report.py   the markdown table and the plots
"""
from train.study.grid import Arm, Grid, RunSpec, StudyData, load_grid

__all__ = ["Arm", "Grid", "RunSpec", "StudyData", "load_grid"]
