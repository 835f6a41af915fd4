"""Compare presets (and learning rates, objectives and guidance scales) at an equal training budget.

    simple-dit compare --presets unet-seed,dit-seed --budget 10m --lrs 1e-4,3e-4,1e-3 --seeds 0,1,2 \
        --objective eps,flow --guidances 1,1.5,2,3,4 --out cmp

Every (preset, objective, lr, seed) is an ordinary training run in
``OUT/runs/<preset>[_<objective>]_lr<lr>[_seed<seed>]/`` (the objective where it overrides the
preset's own, the seed where it is not 0), trained in segments up to each evaluation point
(25/50/75/100% of the budget by default) and scored there with ``evaluate.QualityMeter`` at every
guidance scale (no retraining: the same checkpoint sampled with the same labels and noise); the
scores, with bootstrap confidence intervals, go to the run's ``evals.jsonl``, one JSON object per
line. The budget is one of

- training time on this machine (``90s``, ``10m``, ``1.5h``): the run's ``train_seconds``, which
  counts optimiser steps only, not sample grids, checkpoints or evaluations;
- images seen (``5000-images``, ``200k-images``): converted to optimiser steps of the preset's batch;
- training FLOPs (``1e15-flops``, ``500T-flops``): 3 x forward FLOPs per image, converted to images.

Interrupting a comparison and starting it again resumes it: finished evaluation points are not
redone and a partial run continues from its last checkpoint (the end of its last segment); new
presets, learning rates, seeds or objectives can be added to a finished comparison the same way.
At the end each learning rate's guidance is picked on the seed means of its final scores
(``evaluate.GUIDANCE_RULE``), each preset's best learning rate on the seed-mean final FID (then
label accuracy), and ``OUT/report.md``, ``OUT/report.html`` (self-contained), ``OUT/results.json``
(every seed's numbers) and the PNG figures are written, with a verdict that calls a difference
only where a test over the seeds rejects equal means (``runner.difference_test``), else a tie
(or, where no test applies, says it did not test).

The parsing and the evaluation schedule are in ``budget``, the training and scoring in
``runner``, the figures and report files in ``report``; the command-line parser is in ``cli``.
"""

from __future__ import annotations

from .budget import (
    DEFAULT_LRS, Budget, Target, eval_fractions, images_per_budget, parse_budget, parse_guidances, parse_lrs,
    parse_objectives, parse_presets, parse_seeds, run_name, schedule,
)  # fmt: skip
from .report import GRID_PER_CLASS, NOTES, effect_lines, fmt_stat, verdict_lines, write_frontier_figure, write_report
from .runner import (
    EVALS_NAME, SETTINGS_NAME, PlannedRun, Settings, collect_results, compare, guidance_rows, pick_best, plan_runs,
    difference_test, effects, read_metrics, rewrite_report, run_config, seed_stats, settings_on_disk, verdict,
)  # fmt: skip

__all__ = [
    "DEFAULT_LRS", "EVALS_NAME", "GRID_PER_CLASS", "NOTES", "SETTINGS_NAME", "Budget", "PlannedRun", "Settings", "Target",
    "collect_results", "compare", "difference_test", "effect_lines", "effects", "eval_fractions", "fmt_stat", "guidance_rows", "images_per_budget", "parse_budget",
    "parse_guidances", "parse_lrs", "parse_objectives", "parse_presets", "parse_seeds", "pick_best", "plan_runs",
    "read_metrics", "rewrite_report", "run_config", "run_name", "schedule", "seed_stats", "settings_on_disk", "verdict", "verdict_lines",
    "write_frontier_figure", "write_report",
]  # fmt: skip
