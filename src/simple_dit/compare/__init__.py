"""Compare presets (and learning rates) at an equal training budget.

    simple-dit compare --presets unet-seed,dit-seed --budget 10m --lrs 1e-4,3e-4,1e-3 --out cmp

Every (preset, lr) pair is an ordinary training run in ``OUT/runs/<preset>_lr<lr>/``, trained in
segments up to each evaluation point (25/50/75/100% of the budget by default) and scored there
with ``evaluate.QualityMeter``; the scores go to the run's ``evals.jsonl``, one JSON object per
line. The budget is one of

- training time on this machine (``90s``, ``10m``, ``1.5h``): the run's ``train_seconds``, which
  counts optimiser steps only, not sample grids, checkpoints or evaluations;
- images seen (``5000-images``, ``200k-images``): converted to optimiser steps of the preset's batch;
- training FLOPs (``1e15-flops``, ``500T-flops``): 3 x forward FLOPs per image, converted to images.

Interrupting a comparison and starting it again resumes it: finished evaluation points are not
redone and a partial run continues from its last checkpoint (the end of its last segment). At the
end the best learning rate of each preset (lowest final FID, then highest label accuracy) is
picked and ``OUT/report.md``, ``OUT/report.html`` (self-contained), ``OUT/results.json`` and the
PNG figures are written.

The parsing and the evaluation schedule are in ``budget``, the training and scoring in
``runner``, the figures and report files in ``report``; the command-line parser is in ``cli``.
"""

from __future__ import annotations

from .budget import (
    DEFAULT_LRS, Budget, Target, eval_fractions, images_per_budget, parse_budget, parse_lrs, parse_presets, run_name,
    schedule,
)  # fmt: skip
from .report import GRID_PER_CLASS, NOTES, write_report
from .runner import EVALS_NAME, SETTINGS_NAME, Settings, collect_results, compare, pick_best, read_metrics, run_config

__all__ = [
    "DEFAULT_LRS", "EVALS_NAME", "GRID_PER_CLASS", "NOTES", "SETTINGS_NAME", "Budget", "Settings", "Target",
    "collect_results", "compare", "eval_fractions", "images_per_budget", "parse_budget", "parse_lrs", "parse_presets",
    "pick_best", "read_metrics", "run_config", "run_name", "schedule", "write_report",
]  # fmt: skip
