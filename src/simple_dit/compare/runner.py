"""Running a comparison: its settings (and the ``compare.json`` that keeps one report directory to
one set of them), each (preset, objective, lr, seed) run trained in segments up to its evaluation
points and scored there, at every guidance scale, into ``evals.jsonl``, the ``compare()``
orchestration, and the collection of the runs' results: seed means and spreads, each learning
rate's guidance and each preset's best learning rate, and the verdict."""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..checkpoint import CHECKPOINT_NAME, FINAL_GRID_NAME, check_not_inside_a_run
from ..config import is_number
from ..data import load_dataset
from ..diffusion import DEFAULT_GUIDANCE
from ..errors import Interrupted, TrainingDiverged, UserError
from ..evaluate import BOOTSTRAP_LEVEL, CI_METRICS, GUIDANCE_NAME, GUIDANCE_RULE, SIGNIFICANCE, check_floor_count, pick_guidance, write_guidance
from ..extras import require
from ..io import LOCK_NAME, DirectoryLock, append_jsonl, atomic_copy, ensure_writable_dir, is_temporary, read_jsonl, write_json
from ..logger import WandbOptions
from ..runtime import is_integer
from .budget import (
    DEFAULT_LRS, MIN_EVAL_EVERY_FRAC, Budget, Target, eval_fractions, parse_budget, parse_guidances, parse_lrs, parse_objectives, parse_presets,
    parse_seeds, run_name, schedule,
)  # fmt: skip
from .report import GRID_PER_CLASS, write_report

EVALS_NAME = "evals.jsonl"
SETTINGS_NAME = "compare.json"
CONFIRM_NAME = "confirm.jsonl"
# Confirmation samples are drawn with the run's seed plus this, so that they are independent of
# the samples that picked the learning rate and the guidance (the pick's bias from evaluation
# noise; the training seeds are the same).
CONFIRM_SEED_OFFSET = 1000

# ---- running -----------------------------------------------------------------------------------


@dataclass
class Settings:
    presets: list[str]
    lrs: list[float]
    budget: Budget
    fractions: list[float]
    eval_n: int
    steps: int
    sampler: str | None
    guidances: list[float]
    dataset: str
    seeds: list[int]
    precision: str
    objectives: list[str] | None = None  # None: each preset's own
    compile: bool = False  # how fast, not what: runs may be resumed with or without it
    final_n: int = 0  # samples per seed of each preset's confirmation at its best lr and guidance (0: none)
    # The runs every invocation of the comparison asked for, as (preset, objective, lr, seed): the
    # lists above are their union, not a grid of which every combination was asked. None: not
    # known (a comparison from before the record; its last invocation asked for the grid).
    asked: list[tuple] | None = None

    # The settings that decide what a run directory and its evals.jsonl hold. (Presets, learning
    # rates, seeds and objectives may change between invocations: each run has its own directory.)
    RESULT_KEYS = ("budget", "fractions", "eval_n", "steps", "sampler", "guidances", "dataset", "precision")

    def to_dict(self) -> dict:
        keys = ("presets", "objectives", "lrs", "seeds", "fractions", "eval_n", "steps", "sampler", "guidances", "dataset", "precision", "compile", "final_n")
        d = {k: getattr(self, k) for k in keys}
        d["budget"] = {"kind": self.budget.kind, "amount": self.budget.amount, "text": str(self.budget)}
        d["guidance_rule"] = GUIDANCE_RULE
        d["asked"] = None if self.asked is None else [{"preset": p, "objective": o, "lr": lr, "seed": seed} for p, o, lr, seed in self.asked]
        return d

    def grid(self) -> list[tuple]:
        """Every (preset, objective, lr, seed) of the lists, seed by seed (so that an interrupted
        comparison has whole sweeps of the first seeds), then preset, objective and learning rate."""
        from ..config import get_preset

        return [(preset, objective, lr, seed) for seed in self.seeds for preset in self.presets
                for objective in self.objectives or [get_preset(preset).diffusion.objective] for lr in self.lrs]  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        """Each list through the parser of its flag, so that a damaged compare.json is a one-line
        error here, not a traceback in the middle of a report."""
        from ..data import DATASETS
        from ..runtime import MAX_COUNT, PRECISIONS, check_positive_int

        if not (d["sampler"] is None or isinstance(d["sampler"], str)) or d["dataset"] not in DATASETS or d["precision"] not in PRECISIONS:
            raise ValueError("sampler, dataset and precision must be known names")
        fractions, final_n = d["fractions"], d.get("final_n", 0)
        if not (isinstance(fractions, list) and 0 < len(fractions) <= round(1 / MIN_EVAL_EVERY_FRAC) and all(is_number(f) and 0 < f <= 1 for f in fractions)
                and fractions == sorted(set(fractions)) and fractions[-1] == 1):  # fmt: skip
            raise ValueError(f"fractions must rise from above 0 to 1, got {fractions!r}")
        if not (is_integer(final_n) and (final_n == 0 or 6 <= final_n <= MAX_COUNT)) or not isinstance(d.get("compile", False), bool):
            raise ValueError("final_n must be 0 or at least 6, and compile true or false")
        asked = d.get("asked")
        if asked is not None:
            if not isinstance(asked, list):
                raise ValueError("asked must be a list of runs")
            asked = [(parse_presets([c["preset"]])[0], parse_objectives([c["objective"]])[0], parse_lrs([c["lr"]])[0], parse_seeds([c["seed"]])[0])
                     for c in asked]  # fmt: skip
        return cls(presets=parse_presets(d["presets"]), lrs=parse_lrs(d["lrs"]), budget=parse_budget(d["budget"]["text"]),
                   fractions=[float(f) for f in d["fractions"]], eval_n=check_positive_int(d["eval_n"], "eval_n"),
                   steps=check_positive_int(d["steps"], "steps"), sampler=d["sampler"], guidances=parse_guidances(d["guidances"]),
                   dataset=d["dataset"], seeds=parse_seeds(d["seeds"]), precision=d["precision"], objectives=parse_objectives(d.get("objectives")),
                   compile=d.get("compile", False), final_n=final_n, asked=asked)  # fmt: skip


# What a comparison writes into its directory (besides temporary files): anything else there is not its.
_COMPARISON_FILES = {SETTINGS_NAME, "runs", LOCK_NAME, "report.md", "report.html", "results.json", "verdict.png", "loss.png", "guidance_frontier.png"}


def _is_a_comparisons(name: str) -> bool:
    return name in _COMPARISON_FILES or fnmatch.fnmatch(name, "quality_vs_*.png") or fnmatch.fnmatch(name, "samples_*.png") or is_temporary(name)


def settings_on_disk(out_dir: Path) -> Settings:
    """The settings of the comparison in ``out_dir`` (its last invocation's, from compare.json)."""
    path = out_dir / SETTINGS_NAME
    if path.is_dir():
        raise UserError(f"{path} is a directory, where the comparison keeps its settings as a file; move it away")
    if not path.is_file():
        raise UserError(f"{out_dir} holds no comparison (no {SETTINGS_NAME})")
    try:
        return Settings.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UserError) as e:
        raise UserError(f"{path} is damaged or from an older simple-dit ({type(e).__name__}: {e}); "
                        "restore it (e.g. from git), or run the comparison again into another --out") from None  # fmt: skip


def _comparison_in(out_dir: Path) -> dict | None:
    """The settings recorded in ``out_dir`` (None for an empty directory, or one holding only
    what a comparison killed before recording them wrote); anything else is refused."""
    path = out_dir / SETTINGS_NAME
    if not out_dir.is_dir():
        return None
    if not path.exists():
        others = sorted(p.name for p in out_dir.iterdir() if not _is_a_comparisons(p.name))
        if others:
            raise UserError(f"{out_dir} is not empty and holds no comparison ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                            "choose another --out")  # fmt: skip
        if (out_dir / "runs").is_dir() and any((out_dir / "runs").iterdir()):
            raise UserError(f"{out_dir} holds runs but no {SETTINGS_NAME} to say which settings they were trained with; restore it or choose another --out")
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    damaged = UserError(f"{path} is damaged, so its runs' settings are unknown; restore it (e.g. from git) or choose another --out")
    if not isinstance(old, dict):
        raise damaged
    if "seeds" in old:  # this version's (an older one's is read by _check_settings)
        try:
            Settings.from_dict(old)
        except (ValueError, TypeError, KeyError, AttributeError, UserError):
            raise damaged from None
    return old


def _check_settings(out_dir: Path, settings: Settings) -> Settings:
    """Refuse to mix results of different settings in one report directory; return ``settings``
    with the runs asked for by every invocation so far, as recorded."""
    path = out_dir / SETTINGS_NAME
    old = _comparison_in(out_dir)
    earlier = []
    if old is not None and "seeds" in old:
        recorded = Settings.from_dict(old)
        earlier = recorded.asked
        if earlier is None:  # one from before the record: its last grid, and its runs on disk, were asked for
            earlier = recorded.grid()
            if (out_dir / "runs").is_dir():
                earlier += [(run.preset, run.objective, run.lr, run.seed) for run in runs_on_disk(out_dir, recorded, [], {})]
    settings = dataclasses.replace(settings, asked=list(dict.fromkeys(earlier + settings.grid())))
    new = settings.to_dict()
    if old is not None:
        if "seeds" not in old:  # written before --seeds and --guidances
            if old.get("seed", 0) != 0:
                raise UserError(
                    f"{out_dir} holds a comparison of an older simple-dit with --seed {old['seed']}, whose run directories "
                    "are not named by seed; choose another --out"
                )
            old["guidances"] = [old["guidance"]] if "guidance" in old else None
        for key in Settings.RESULT_KEYS:
            a, b = old.get(key), new[key]
            if key == "budget":
                a = (a.get("kind"), a.get("amount"), a.get("text")) if isinstance(a, dict) else a
                b = (b["kind"], b["amount"], b["text"])
            if a != b:
                shown_a, shown_b = (
                    v[2] if key == "budget" and isinstance(v, tuple) else ",".join(f"{x:g}" for x in v) if isinstance(v, list) else v
                    for v in (a, b)
                )
                raise UserError(
                    f"{out_dir} holds a comparison with {key.replace('_', '-')} {shown_a}, not {shown_b}; "
                    "rerun it with the same settings to resume it, or choose another --out"
                )
    write_json(path, new)
    return settings


def _train(config, run_dir: Path, *, resume: bool, data_dir, device, wandb=None) -> None:
    """One training segment. Its end-of-run sample grid is skipped: each evaluation point draws
    and saves its own samples, and the grid can cost more than a short segment's training."""
    from ..train import train

    train(config, run_dir, resume=resume, data_dir=data_dir, device=device, progress=False, final_samples=False, wandb=wandb)


def _wandb_evaluation(run_dir: Path, config, wandb, record: dict, grid: Path) -> None:
    """An evaluation point's scores and grid, into the run's W&B run (which its training
    segments log to as well)."""
    from PIL import Image

    from ..logger import WandbSink

    with WandbSink(run_dir, config.to_dict(), wandb) as sink, Image.open(grid) as image:
        sink.log({f"eval/{k}": record[k] for k in ("fid", "label_accuracy", "precision", "recall", "guidance") if record.get(k) is not None}, record["step"])
        sink.image("eval_samples", image, record["step"])


def _train_state(run_dir: Path) -> dict | None:
    """step, train_seconds and images_seen of the run's checkpoint (None before the first)."""
    from ..checkpoint import load_weights

    if not (run_dir / CHECKPOINT_NAME).is_file():
        return None
    return load_weights(run_dir)[2]


class _Meters:
    """One QualityMeter per (dataset, data_dir), kept for the life of the process (the test
    features take seconds to compute)."""

    _cache: dict = {}

    @classmethod
    def get(cls, dataset: str, data_dir, log):
        from ..evaluate import QualityMeter

        key = (dataset, str(data_dir) if data_dir is not None else None)
        if key not in cls._cache:
            started = time.perf_counter()
            cls._cache[key] = QualityMeter(dataset, data_dir, progress=False)
            log(f"evaluator ready in {time.perf_counter() - started:.1f} s")  # its classifier and test features
        return cls._cache[key]


def _evaluate(
    run_dir: Path, settings: Settings, meter, device, grid_path: Path | None, seed: int | None = None, *,
    n: int | None = None, guidances: Sequence[float] | None = None,
) -> dict:  # fmt: skip
    """Score the run's checkpoint (EMA weights) on ``n`` (default ``eval_n``) fresh samples drawn
    with ``seed`` at each of ``guidances`` (default: the settings'; the same labels and noise for
    each): the scale ``pick_guidance`` picks gives the top-level scores, ``by_guidance`` holds them
    all. Save a grid of the picked scale's first few per class to ``grid_path`` (if given)."""
    from dataclasses import asdict

    from ..diffusion import GUIDE_EVERY_STEP, check_sampler
    from ..sample import Pipeline

    start = time.perf_counter()
    seed = settings.seeds[0] if seed is None else seed
    pipe = Pipeline.from_pretrained(run_dir, device=device, precision=settings.precision)
    labels = pipe.cycled_labels(n or settings.eval_n)
    sampler = check_sampler(pipe.diffusion, settings.sampler)
    rows, images = [], {}
    for g in guidances or settings.guidances:
        # Every step guided, for both objectives alike (flow models default to a shorter interval).
        images[g] = pipe(labels, sampler=sampler, steps=settings.steps, guidance=g, guidance_interval=GUIDE_EVERY_STEP, seed=seed)
        rows.append({"guidance": g, **{k: v for k, v in asdict(meter.score(images[g], labels)).items() if v is not None}})
    picked = pick_guidance(rows)
    if grid_path is not None:
        first = slice(0, GRID_PER_CLASS * pipe.num_classes)
        pipe.save_grid(images[picked["guidance"]][first], labels[first], grid_path)
    return {**picked, "by_guidance": rows, "sampler": sampler, "eval_seconds": time.perf_counter() - start}


def run_config(preset: str, lr: float, settings: Settings, seed: int | None = None, objective: str | None = None):
    """The recipe of one run: ``preset`` at ``lr`` and ``seed`` (default: the first of the
    settings), trained with ``objective`` (default: the preset's own)."""
    from ..config import get_preset

    config = get_preset(preset)
    if objective is not None:
        config.diffusion.objective = objective
    config.train.lr = lr
    config.train.seed = settings.seeds[0] if seed is None else seed
    config.train.dataset = settings.dataset
    config.train.precision = settings.precision
    config.train.compile = settings.compile
    config.train.sample_every = 0  # each evaluation point draws its own grid
    config.train.checkpoint_every = 0  # each segment ends with a checkpoint
    return config


def _set_stop(config, target: Target):
    tc = config.train
    if target.kind == "steps":
        tc.max_steps, tc.minutes = int(target.value), 0.0
    else:
        tc.max_steps, tc.minutes = 0, target.value / 60
    return config


def _record_guidance(run_dir: Path, settings: Settings, targets: list[Target], seed: int) -> None:
    """With several guidance scales, a finished run records in guidance.json the scale its final
    evaluation picked, so that sample, eval and the Python API use it by default."""
    records = read_evals(run_dir)
    last = next((r for r in records if (r.get("target_kind"), round(float(r.get("target", -1)), 6)) == targets[-1].key()), None)
    if len(settings.guidances) < 2 or last is None or "by_guidance" not in last:
        return
    write_guidance(run_dir, last["by_guidance"], n=settings.eval_n, sampler=last.get("sampler"), steps=settings.steps,
                   seed=seed, ema=True, step=last.get("step"), source="simple-dit compare, final evaluation point")  # fmt: skip


def _point_record(target: Target, state: dict, device, settings: Settings) -> dict:
    """What every evals.jsonl record says about its evaluation point and the run's progress there,
    and how it trained: on which machine (a comparison's runs may come from several: see
    ``_run_config_on_disk``), in which precision (``auto`` is the machine's) and whether compiled.
    Under a time budget the last two change how many images a run sees."""
    import torch

    from ..runtime import device_name, resolve_precision

    return {
        "point": target.point, "fraction": target.fraction, "target_kind": target.kind, "target": target.value,
        "step": state["step"], "images_seen": state["images_seen"], "train_seconds": state["train_seconds"],
        "machine": device_name(torch.device(device)), "train_precision": resolve_precision(settings.precision, torch.device(device)),
        "compiled": state.get("compiled", False),
    }  # fmt: skip


def _run_one(
    preset: str, lr: float, settings: Settings, run_dir: Path, targets: list[Target], *, seed: int | None = None,
    objective: str | None = None, data_dir, device, log, meter=None, wandb=None,
) -> None:  # fmt: skip
    """Train and score one run up to each of its ``targets`` not yet in its evals.jsonl (and, with
    ``wandb`` options, log both to the run's W&B run)."""
    seed = settings.seeds[0] if seed is None else seed
    name = run_dir.name
    todo = _targets_to_do(run_dir, targets)
    if todo is None:
        log(f"{name}: diverged earlier; not retried")
        return
    if not todo:
        # A finished run needs no weights to be reported: its records may have been kept (e.g. in
        # git) without its checkpoint.
        log(f"{name}: done ({len(targets)} evaluation point{'s' if len(targets) != 1 else ''})")
    for target in todo:
        config = _set_stop(run_config(preset, lr, settings, seed, objective), target)
        state = _train_state(run_dir)
        if state is None or not target.reached(state):
            log(f"{name}: training to {target.describe()} ({target.fraction:.0%} of the budget)")
            try:
                _train(config, run_dir, resume=state is not None, data_dir=data_dir, device=device, wandb=wandb)
            except TrainingDiverged as e:
                _record_divergence(run_dir, target, e, device, log, settings)
                return
        meter = meter or _Meters.get(settings.dataset, data_dir, log)
        _score_point(run_dir, target, len(targets), settings, seed, meter=meter, device=device, log=log, config=config, wandb=wandb)
    _record_guidance(run_dir, settings, targets, seed)
    _confirm_run(run_dir, settings, targets, seed, meter=meter, data_dir=data_dir, device=device, log=log)


def _targets_to_do(run_dir: Path, targets: list[Target]) -> list[Target] | None:
    """The run's targets not yet in its evals.jsonl, or None if it diverged. A run with neither
    checkpoint nor any sign of a scored point starts over: its other files are from an attempt
    that never checkpointed."""
    records = read_evals(run_dir, repair=True)
    if any(rec.get("diverged") for rec in records):
        return None
    done = {(rec.get("target_kind"), round(float(rec.get("target", -1)), 6)) for rec in records}
    todo = [t for t in targets if t.key() not in done]
    if todo and not (run_dir / CHECKPOINT_NAME).is_file():
        # Scored from a checkpoint, so its weights were deleted since (and its records too, where
        # only a point's grid is left).
        scored = records or read_confirmations(run_dir) or (run_dir / FINAL_GRID_NAME).exists() or any((run_dir / "eval_samples").glob("point_*"))
        if scored:
            raise UserError(f"{run_dir / EVALS_NAME} has no record of evaluation point {todo[0].point} ({todo[0].describe()}) and the "
                            f"run's weights are gone: restore the file, or delete {run_dir} to train the run again")  # fmt: skip
        for stale in (EVALS_NAME, CONFIRM_NAME, "metrics.jsonl", GUIDANCE_NAME):
            (run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "eval_samples", ignore_errors=True)
        return todo
    # A point is scored before the run trains on, so a missing one that the run is past was lost
    # from the file (edited, or restored from an older copy): scoring the later weights in its
    # place would put a wrong point on the curves. A later record, or a step count past a step
    # target, shows it; a time target's checkpoint may overshoot the next target after one slow step.
    state = _train_state(run_dir) if todo else None
    for t in todo:
        if any(u.key() in done for u in targets if u.point > t.point) or (state is not None and t.kind == "steps" and state["step"] > t.value):
            raise UserError(f"{run_dir / EVALS_NAME} has no record of evaluation point {t.point} ({t.describe()}), but the run has trained past it; "
                            f"its weights there are gone: restore the file, or delete {run_dir} to train the run again")  # fmt: skip
    return todo


def _record_divergence(run_dir: Path, target: Target, error: TrainingDiverged, device, log, settings: Settings) -> None:
    """Too high a learning rate is a result of the sweep, not a failure of it: record it, so that
    the comparison goes on with the other runs and never retries this one."""
    state = _train_state(run_dir) or {"step": 0, "images_seen": 0, "train_seconds": 0.0}
    append_jsonl(run_dir / EVALS_NAME, _point_record(target, state, device, settings) | {"diverged": True, "message": str(error)})
    log(f"{run_dir.name}: {error}")


def _score_point(run_dir: Path, target: Target, n_targets: int, settings: Settings, seed: int, *, meter, device, log,
                 config=None, wandb=None) -> None:  # fmt: skip
    """Score the run's checkpoint as its evaluation point ``target`` (into evals.jsonl; with
    ``wandb`` options, into the W&B run of ``config`` too)."""
    state = _train_state(run_dir)
    grid = run_dir / "eval_samples" / f"point_{target.point}.png"
    scores = _evaluate(run_dir, settings, meter, device, grid, seed)
    record = _point_record(target, state, device, settings) | scores | {"grid": str(grid.relative_to(run_dir))}
    append_jsonl(run_dir / EVALS_NAME, record)
    atomic_copy(grid, run_dir / FINAL_GRID_NAME)
    if wandb is not None:
        _wandb_evaluation(run_dir, config, wandb, record, grid)
    acc = record.get("label_accuracy")
    log(
        f"{run_dir.name}: point {target.point}/{n_targets} at {state['images_seen']:,} images, {state['train_seconds']:.1f} s: "
        f"FID {record['fid']:.2f}" + (f", label accuracy {acc:.3f}" if acc is not None else "")
        + (f" at guidance {record['guidance']:g}" if len(settings.guidances) > 1 else "")
    )


def _train_together(group: list[PlannedRun], settings: Settings, *, data_dir, device, log, meter) -> None:
    """Train ``group`` (runs of one preset and objective) as one batched network to each of its
    evaluation points in turn, scoring every run at each point; ``_run_one`` then finds their
    points done and only finishes them (guidance, confirmation)."""
    from ..batched import train_together

    for target in group[0].targets:
        pending = []
        for run in group:
            todo = _targets_to_do(run.run_dir, run.targets)
            if todo and todo[0].key() == target.key():
                pending.append(run)
        states = {run.run_dir: _train_state(run.run_dir) for run in pending}
        training = [run for run in pending if states[run.run_dir] is None or not target.reached(states[run.run_dir])]
        diverged = {}
        if training:
            log(f"{len(training)} runs of {training[0].preset} together: training to {target.describe()} ({target.fraction:.0%} of the budget)")
            configs = [(_set_stop(run_config(run.preset, run.lr, settings, run.seed, run.override), target), run.run_dir,
                        states[run.run_dir] is not None) for run in training]  # fmt: skip
            started = time.perf_counter()
            diverged = train_together(configs, data_dir=data_dir, device=device)
            # Each run's train_seconds is its share of the group's steps, so the runs' records do not
            # show the group's own pace (steps, setup and checkpoints): this line does.
            log(f"{training[0].preset} group: {target.describe()} reached in {time.perf_counter() - started:.1f} s wall")
            for run_dir, error in diverged.items():
                _record_divergence(run_dir, target, error, device, log, settings)
        meter = meter or _Meters.get(settings.dataset, data_dir, log)
        started = time.perf_counter()
        for run in pending:
            if run.run_dir not in diverged:
                _score_point(run.run_dir, target, len(run.targets), settings, run.seed, meter=meter, device=device, log=log)
        log(f"{group[0].preset} group: point {target.point} scored in {time.perf_counter() - started:.1f} s wall")


def groups_together(plan: list[PlannedRun], size: int) -> list[list[PlannedRun]]:
    """The plan's runs of each preset and objective, in plan order, in groups of up to ``size``."""
    by_kind: dict[tuple, list[PlannedRun]] = {}
    for run in plan:
        by_kind.setdefault((run.preset, run.objective), []).append(run)
    return [runs[i : i + size] for runs in by_kind.values() for i in range(0, len(runs), size)]


def _final_record(run_dir: Path, targets: list[Target]) -> dict | None:
    """The evals.jsonl record of the run's last evaluation point (None before it, or diverged)."""
    last = next((r for r in read_evals(run_dir) if (r.get("target_kind"), round(float(r.get("target", -1)), 6)) == targets[-1].key()), None)
    return None if last is None or last.get("diverged") or last.get("fid") is None else last


def _confirm_run(run_dir: Path, settings: Settings, targets: list[Target], seed: int, *, meter, data_dir, device, log,
                 guidance: float | None = None) -> bool:  # fmt: skip
    """With ``final_n``, score the finished run once more on ``final_n`` fresh samples, at
    ``guidance`` (None: the guidance its own final evaluation picked), into confirm.jsonl; return
    whether it scored. Done as soon as the run finishes, while its weights are on disk, at its own
    pick (the first seed's pick is often its preset's: a comparison that outlives its checkpoints,
    records kept in git across machines, then still has its confirmations), and again when the
    report's pick of its learning rate's guidance (on the seed means) differs."""
    final = _final_record(run_dir, targets)
    if not settings.final_n or final is None:
        return False
    g = _own_pick(settings, final) if guidance is None else guidance
    if _confirmed(settings, {"final": final, "confirmed": read_confirmations(run_dir)}, g):
        return False
    state = _train_state(run_dir)
    if state is None or state["step"] != final["step"]:
        log(f"{run_dir.name}: its weights at step {final['step']} are gone; it cannot be confirmed at guidance {g:g}")
        return False
    log(f"{run_dir.name}: confirming guidance {g:g} on {settings.final_n:,} fresh samples")
    meter = meter or _Meters.get(settings.dataset, data_dir, log)
    scores = _evaluate(run_dir, settings, meter, device, None, seed + CONFIRM_SEED_OFFSET, n=settings.final_n, guidances=[g])
    scores.pop("by_guidance")
    append_jsonl(run_dir / CONFIRM_NAME, _confirmation_key(settings, final, g) | scores | {"seed": seed + CONFIRM_SEED_OFFSET})
    return True


def _model_stats(preset: str) -> dict:
    from ..config import get_preset
    from ..models import parameters_and_gflops

    config = get_preset(preset)
    params, gflops = parameters_and_gflops(config.model)
    return {
        "arch": config.model.arch,
        "params": params,
        "gflops_per_image": gflops,
        "batch_size": config.train.batch_size,
        "description": config.description,
    }


def compare(
    presets: str | Sequence[str],
    budget: str | Budget,
    out_dir: str | os.PathLike,
    *,
    lrs: str | Sequence[float] = DEFAULT_LRS,
    eval_every_frac: float = 0.25,
    eval_n: int = 1000,
    steps: int = 20,
    sampler: str | None = None,
    guidance: float | None = None,
    dataset: str = "mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device=None,
    precision: str = "auto",
    log: Callable[[str], None] | None = None,
    meter=None,
    seeds: str | Sequence[int] | None = None,
    objectives: str | Sequence[str] | None = None,
    guidances: str | Sequence[float] | None = None,
    wandb: str | None = None,
    compile: bool = False,
    final_n: int | None = None,
    together: int = 1,
) -> dict:
    """Train and score every (preset, objective, lr, seed) at the same budget; write the report;
    return results.json's content.

    ``seeds`` (default: ``[seed]``) are the training and sampling seeds, ``objectives`` override
    each preset's own (default: none), ``guidances`` (default: ``[guidance]``) are the guidance
    scales scored at every evaluation point. ``meter`` is the ``evaluate.QualityMeter`` to score
    with (default: one for ``dataset``, made once per process). ``wandb`` (a W&B project) logs
    every run to Weights & Biases, grouped under the name of ``out_dir``. ``compile`` trains with
    ``torch.compile`` (see ``train``). ``final_n`` > 0 scores the runs of each preset's best
    learning rate once more, at its guidance picked on the seed means, on ``final_n`` fresh samples
    (seeds offset by ``CONFIRM_SEED_OFFSET``): the report's confirmed table and verdict.
    ``together`` > 1 trains up to that many runs of the same preset and objective at once, as one
    batched network (``batched.train_together``; for budgets of images or FLOPs: runs trained
    together share their clock)."""
    from ..config import get_preset
    from ..data import DATASETS
    from ..diffusion import check_sampler, make_process
    from ..runtime import MAX_COUNT, PRECISIONS, check_positive_int, parse_device

    require("matplotlib", "report", "simple-dit compare")  # now, not after hours of training
    if wandb is not None:
        require("wandb", "wandb", "--wandb")
    if log is not None and not callable(log):
        raise UserError(f"log must be a function taking one line of text, got {type(log).__name__}")
    if meter is not None and not callable(getattr(meter, "score", None)):  # found out only after every run had trained
        raise UserError(f"meter must be an evaluate.QualityMeter, got {type(meter).__name__}")
    log = log or (lambda msg: print(f"compare: {msg}", file=sys.stderr, flush=True))
    preset_names = parse_presets(presets)
    budget = budget if isinstance(budget, Budget) else parse_budget(budget)
    lr_list = parse_lrs(lrs)
    seed_list = parse_seeds(seed if seeds is None else seeds)
    objective_list = parse_objectives(objectives)
    if guidance is not None and guidances is not None:  # one of them would be ignored without a word
        raise UserError("give guidance (one scale) or guidances (several), not both")
    guidance_list = parse_guidances([DEFAULT_GUIDANCE if guidance is None else guidance] if guidances is None else guidances)
    fractions = eval_fractions(eval_every_frac)
    if not is_integer(eval_n) or not 6 <= eval_n <= MAX_COUNT:
        raise UserError(f"--eval-n must be an integer of at least 6, got {eval_n}")
    if final_n is None:  # not given: the comparison's own, so that resuming it without the flag keeps its confirmations
        try:
            final_n = json.loads((Path(out_dir) / SETTINGS_NAME).read_text()).get("final_n", 0)
        except (OSError, ValueError, AttributeError):
            final_n = 0
        if not (is_integer(final_n) and (final_n == 0 or 6 <= final_n <= MAX_COUNT)):
            final_n = 0  # none yet, or a damaged record: refused below, with the reason
    if not is_integer(final_n) or not (final_n == 0 or 6 <= final_n <= MAX_COUNT):
        raise UserError(f"--final-n must be 0 (no confirmation) or an integer of at least 6, got {final_n}")
    together = check_positive_int(together, "--runs-together")
    if together > 1 and wandb is not None:
        raise UserError("--wandb logs each run's training as it trains, one run at a time; it does not combine with --runs-together")
    if together > 1 and budget.kind == "seconds":
        raise UserError("--runs-together needs a budget of images or FLOPs: runs trained together share one clock, so a time budget would not be each run's")
    steps = check_positive_int(steps, "--steps")
    if not isinstance(compile, bool):  # "no" would be true
        raise UserError(f"compile must be True or False, got {compile!r}")
    eval_n, final_n = int(eval_n), int(final_n)  # NumPy ints would not save as JSON
    if not isinstance(dataset, str) or dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    for flag, n in (("--eval-n", eval_n), ("--final-n", final_n)):  # known now, not after every run has trained
        check_floor_count(n, dataset, f"{flag} {n:,} is")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    for preset in preset_names:  # e.g. --sampler euler for an eps model, or more steps than it has: fail now, not after training
        for objective in objective_list or [get_preset(preset).diffusion.objective]:
            process = make_process(dataclasses.replace(get_preset(preset).diffusion, objective=objective))
            check_sampler(process, sampler)
            process.check_steps(steps)
    stats = {p: _model_stats(p) for p in preset_names}
    for preset in preset_names:  # a budget of more steps than a run can take
        schedule(budget, fractions, stats[preset]["batch_size"], stats[preset]["gflops_per_image"])
    device = parse_device(device)
    settings = Settings(preset_names, lr_list, budget, fractions, eval_n, steps, sampler, guidance_list, dataset, seed_list, precision, objective_list, compile, final_n)
    out_dir = Path(out_dir)
    if (out_dir / CHECKPOINT_NAME).exists():
        raise UserError(f"{out_dir} holds a training run; a comparison needs a directory of its own (--out)")
    check_not_inside_a_run(out_dir)
    _comparison_in(out_dir)  # before the lock, so that a refused directory is left as it was
    wandb_options = None if wandb is None else WandbOptions(wandb, group=out_dir.resolve().name)
    for split in ("train", "test"):  # found (or downloaded) before anything is written: a comparison without data leaves no directory
        load_dataset(dataset, split, data_dir)
    ensure_writable_dir(out_dir)
    with DirectoryLock(out_dir):
        settings = _check_settings(out_dir, settings)  # again under the lock
        ensure_writable_dir(out_dir / "runs")
        return _run_all(out_dir, settings, stats, data_dir=data_dir, device=device, log=log, meter=meter, wandb=wandb_options, together=together)


@dataclass(frozen=True)
class PlannedRun:
    preset: str
    objective: str  # the objective it trains with
    override: str | None  # the objective when it overrides the preset's own, else None
    lr: float
    seed: int
    run_dir: Path
    targets: list


def plan_runs(out_dir: Path, settings: Settings, stats: dict) -> list[PlannedRun]:
    """Every run of this invocation's grid, in ``Settings.grid``'s order."""
    plan = []
    for preset, objective, lr, seed in settings.grid():
        targets = schedule(settings.budget, settings.fractions, stats[preset]["batch_size"], stats[preset]["gflops_per_image"])
        override = _override(preset, objective)
        plan.append(PlannedRun(preset, objective, override, lr, seed, out_dir / "runs" / run_name(preset, lr, seed, override), targets))
    return plan


def _override(preset: str, objective: str) -> str | None:
    """``objective`` where it overrides the preset's own (as run names say it), else None."""
    from ..config import get_preset

    return objective if objective != get_preset(preset).diffusion.objective else None


def runs_on_disk(out_dir: Path, settings: Settings, planned: list[PlannedRun], stats: dict) -> list[PlannedRun]:
    """The runs that earlier invocations with the same settings left in ``out_dir`` and this one
    did not plan (other presets, objectives, learning rates or seeds), so that the report covers
    the directory: e.g. a grid of learning rates for one objective, then the other objective at the
    best learning rate only. Adds the ``_model_stats`` of their presets to ``stats``."""
    from ..config import PRESETS

    planned_dirs = {run.run_dir.name for run in planned}
    found = []
    for run_dir in sorted(p for p in (out_dir / "runs").iterdir() if p.is_dir() and p.name not in planned_dirs):
        if not (run_dir / EVALS_NAME).is_file():
            continue
        try:
            config = _run_config_on_disk(run_dir)
        except (UserError, OSError, ValueError, TypeError, KeyError):
            continue  # not a run (or a damaged one): the report covers what it can read
        if config.preset not in PRESETS:
            continue
        objective = config.diffusion.objective
        override = _override(config.preset, objective)
        if run_dir.name != run_name(config.preset, config.train.lr, config.train.seed, override):
            continue
        if config.preset not in stats:
            stats[config.preset] = _model_stats(config.preset)
        targets = schedule(settings.budget, settings.fractions, stats[config.preset]["batch_size"], stats[config.preset]["gflops_per_image"])
        found.append(PlannedRun(config.preset, objective, override, config.train.lr, config.train.seed, run_dir, targets))
    return found


def _run_config_on_disk(run_dir: Path):
    """The run's config: its checkpoint's, or the config.json its training wrote (a finished run
    kept without its weights)."""
    from ..checkpoint import load_config, read_config_json

    if (run_dir / CHECKPOINT_NAME).is_file():
        try:
            return load_config(run_dir)
        except UserError:  # a damaged checkpoint: the report needs only the records, config.json among them
            pass
    return read_config_json(run_dir)


def _covering(settings: Settings, runs: list[PlannedRun]) -> Settings:
    """``settings`` with the presets, learning rates, seeds and objectives of all ``runs``."""
    def union(first: list, more) -> list:
        return first + [x for x in dict.fromkeys(more) if x not in first]

    objectives = settings.objectives
    if objectives is not None or any(r.override for r in runs):
        objectives = union(list(objectives or []), [r.objective for r in runs])
    return dataclasses.replace(
        settings, presets=union(settings.presets, [r.preset for r in runs]), lrs=sorted({*settings.lrs, *(r.lr for r in runs)}),
        seeds=sorted({*settings.seeds, *(r.seed for r in runs)}), objectives=objectives,
    )  # fmt: skip


def _own_pick(settings: Settings, final: dict) -> float:
    """The guidance a run's final evaluation picked (records from before guidance sweeps have
    none: they were scored at the first scale)."""
    return final.get("guidance", settings.guidances[0])


def _confirmation_key(settings: Settings, final: dict, guidance: float) -> dict:
    return {"n": settings.final_n, "guidance": guidance, "steps": settings.steps, "step": final["step"]}


def _confirmed(settings: Settings, run: dict, guidance: float | None) -> dict | None:
    """The run's confirmation under ``settings`` of its final point at ``guidance``, or None."""
    if not run.get("final") or guidance is None:
        return None
    key = _confirmation_key(settings, run["final"], guidance)
    return next((c for c in run.get("confirmed", []) if all(c.get(k) == v for k, v in key.items())), None)


def _run_all(out_dir: Path, settings: Settings, stats: dict, *, data_dir, device, log, meter, wandb=None, together: int = 1) -> dict:
    """``stats``: the ``_model_stats`` of each preset of ``settings``."""
    budget, eval_n = settings.budget, settings.eval_n
    plan = plan_runs(out_dir, settings, stats)
    log(
        f"{len(plan)} run{'s' if len(plan) != 1 else ''} of {budget.describe()} each, {len(settings.fractions)} evaluation point{'s' if len(settings.fractions) != 1 else ''}, "
        f"{eval_n} samples per point and guidance scale ({', '.join(f'{g:g}' for g in settings.guidances)})"
    )
    for run in plan:
        ensure_writable_dir(run.run_dir)
    try:
        if together > 1:
            for group in groups_together(plan, together):
                _train_together(group, settings, data_dir=data_dir, device=device, log=log, meter=meter)
        for run in plan:
            _run_one(run.preset, run.lr, settings, run.run_dir, run.targets, seed=run.seed, objective=run.override,
                     data_dir=data_dir, device=device, log=log, meter=meter, wandb=wandb)  # fmt: skip
    except Interrupted as e:  # training's own words would point to train's --resume
        raise Interrupted(e.signum, f"stopped by {signal.Signals(e.signum).name}; the run in training checkpointed, "
                                    "and the same compare command continues the comparison") from None  # fmt: skip
    return _report(out_dir, settings, plan, stats, data_dir=data_dir, device=device, log=log, meter=meter)


def _report(out_dir: Path, settings: Settings, plan: list[PlannedRun], stats: dict, *, data_dir, device, log, meter,
            floors: dict | None = None, machine: dict | None = None, report_only: bool = False) -> dict:  # fmt: skip
    """Write the report of the ``plan``'s runs and of every other run ``out_dir`` holds (``floors``:
    real-data floors by ``_floor_specs`` key, each scored here where it is not given; ``machine``:
    the one that trained, where it is not this one; ``report_only``: confirm no run, and leave out a
    confirmation floor that cannot be scored instead of failing; otherwise the runs of each
    preset's best learning rate are confirmed at its picked guidance where they are not yet)."""
    floors = dict(floors or {})
    specs = _floor_specs(settings)

    def score_floor(key: str) -> None:
        nonlocal meter
        n, seed = specs[key]
        meter = meter or _Meters.get(settings.dataset, data_dir, log)
        floors[key] = {k: v for k, v in dataclasses.asdict(meter.floor(n, seed=seed)).items() if v is not None} | {"seed": seed}

    if "floor" not in floors:
        score_floor("floor")
    earlier = runs_on_disk(out_dir, settings, plan, stats)
    covering = _covering(settings, plan + earlier)
    results = collect_results(out_dir, covering, stats, plan + earlier, floors, device, machine=machine)
    if not report_only and _confirm_at_picks(out_dir, covering, results, plan + earlier, tried=plan, data_dir=data_dir, device=device,
                                           log=log, meter=meter):  # fmt: skip
        results = collect_results(out_dir, covering, stats, plan + earlier, floors, device, machine=machine)
    if "confirmed_floor" in specs and "confirmed_floor" not in floors and any(e["confirmed_stats"] for e in results["presets"]):
        try:
            score_floor("confirmed_floor")
        except UserError as e:
            if not report_only:
                raise
            log(f"the confirmed table's real-data floor at {specs['confirmed_floor'][0]:,} samples is left out ({e}); --data-dir scores it")
        results["confirmed_floor"] = floors.get("confirmed_floor")
    write_report(out_dir, results)
    log(f"wrote report.md, report.html and results.json to {out_dir}")
    return results


def rewrite_report(out_dir: str | os.PathLike, *, data_dir: str | None = None, device=None, log: Callable[[str], None] | None = None, meter=None) -> dict:
    """Write the report of what the comparison in ``out_dir`` holds now, training and scoring
    nothing, under its last settings; return results.json's content. The real-data floors and the
    machine block come from the last report where it has them (a missing selection floor is
    scored, which needs the dataset; a missing confirmation floor is left out without one).
    E.g. an interim report of a long grid from its records (no weights needed), while the grid
    itself goes on in another directory. Unfinished runs appear with the points they have."""
    from ..runtime import parse_device

    require("matplotlib", "report", "simple-dit compare --report-only")
    log = log or (lambda msg: print(f"compare: {msg}", file=sys.stderr, flush=True))
    out_dir, device = Path(out_dir), parse_device(device)
    settings = settings_on_disk(out_dir)
    with DirectoryLock(out_dir):
        settings = settings_on_disk(out_dir)  # again under the lock: a comparison may have just ended
        # The runs of its settings in their usual order, then whatever else the directory holds.
        stats = {p: _model_stats(p) for p in settings.presets}
        held = [run for run in plan_runs(out_dir, settings, stats) if (run.run_dir / EVALS_NAME).is_file()]
        if not (out_dir / "runs").is_dir() or not (held or runs_on_disk(out_dir, settings, held, stats)):  # an empty report would replace the last one
            raise UserError(f"{out_dir} holds no runs yet")
        last = _last_results(out_dir)
        return _report(out_dir, settings, held, stats, data_dir=data_dir, device=device, log=log, meter=meter,
                       floors=_saved_floors(last, settings), machine=_saved_machine(last), report_only=True)  # fmt: skip


def _confirm_at_picks(out_dir: Path, settings: Settings, results: dict, runs: list[PlannedRun], *, tried: list[PlannedRun], **kwargs) -> bool:
    """Confirm every finished run of each preset's best learning rate at that preset's picked
    guidance (a seed whose own pick was another scale was confirmed at that one when it finished);
    return whether any was scored. ``tried``: the runs whose confirmation at their own pick was
    already attempted (scored, or found without weights) in this invocation."""
    planned = {str(run.run_dir.relative_to(out_dir)): run for run in runs}
    tried_dirs = {run.run_dir for run in tried}
    scored = False
    for entry in results["presets"]:
        for run in entry["runs"]:
            p = planned.get(run["run_dir"])
            if not (settings.final_n and p and run["lr"] == entry["best_lr"] and run["final"]):
                continue
            if p.run_dir in tried_dirs and _own_pick(settings, run["final"]) == entry["best_guidance"]:
                continue
            scored |= _confirm_run(p.run_dir, settings, p.targets, p.seed, guidance=entry["best_guidance"], **kwargs)
    return scored


def _last_results(out_dir: Path) -> dict | None:
    try:
        last = json.loads((out_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return last if isinstance(last, dict) else None


def _saved_machine(last: dict | None) -> dict | None:
    """The machine block of the last report: the process that trained and scored, not the one
    rewriting the report from its records (which may be another computer)."""
    machine = (last or {}).get("machine")
    if isinstance(machine, dict) and isinstance(machine.get("device"), str) and is_integer(machine.get("torch_threads")) \
            and isinstance(machine.get("torch"), str):  # fmt: skip
        return {k: machine[k] for k in ("device", "torch_threads", "torch")}
    return None


def _floor_specs(settings: Settings) -> dict[str, tuple[int, int]]:
    """The real-data floors a report shows, as (sample count, seed): the selection's, and with
    ``final_n`` the confirmation's, scored at its own count (FID's bias depends on n)."""
    specs = {"floor": (settings.eval_n, settings.seeds[0])}
    if settings.final_n:
        specs["confirmed_floor"] = (settings.final_n, settings.seeds[0] + CONFIRM_SEED_OFFSET)
    return specs


def _saved_floors(last: dict | None, settings: Settings) -> dict:
    """The real-data floors of the last report that were scored as ``settings`` would score them
    (same dataset, sample count and seed): a report rewritten from records then needs no dataset."""
    saved = {}
    try:
        if last is None or last["settings"]["dataset"] != settings.dataset:
            return saved
        for key, (n, seed) in _floor_specs(settings).items():
            floor = last.get(key)
            # Reports before floors recorded their seed drew them at their comparison's first seed.
            if (_are_scores(floor) and floor.get("n") == n and floor.get("seed", seed if key == "confirmed_floor" else last["settings"]["seeds"][0]) == seed
                    and is_number(floor.get("fid")) and is_number(floor.get("label_accuracy"))):  # fmt: skip
                saved[key] = floor
    except (KeyError, TypeError, IndexError):
        pass  # no usable report yet: the floors are scored again
    return saved


# ---- results -----------------------------------------------------------------------------------


def _sort_key(final: dict | None) -> tuple:
    """Lower is better: final FID (NaN and missing last), then higher label accuracy."""
    if not final:
        return (1, math.inf, 0.0)
    fid = final.get("fid", math.nan)
    acc = final.get("label_accuracy") or 0.0
    return (0, fid if math.isfinite(fid) else math.inf, -acc)


def pick_best(runs: Sequence[dict]) -> dict:
    """The run (or learning rate) whose ``final`` scores are best: lowest FID, ties broken by
    label accuracy (the first of equal runs wins)."""
    return min(runs, key=lambda r: _sort_key(r.get("final")))


def read_metrics(run_dir: Path) -> list[dict]:
    """The training records of metrics.jsonl (a resumed run has already dropped the records of
    steps it redid, see train._truncate_metrics)."""
    return [rec for rec in read_jsonl(Path(run_dir) / "metrics.jsonl")
            if is_integer(rec.get("step")) and "loss" in rec and all(rec.get(k) is None or is_number(rec[k]) for k in ("loss", "images_per_s"))]  # fmt: skip


def guidance_rows(record: dict, default_guidance: float | None = None) -> list[dict]:
    """The scores of an evaluation record at each guidance scale (a record of an older version
    holds one, at its top level; a diverged one none)."""
    if "by_guidance" in record:
        return record["by_guidance"]
    if record.get("fid") is None:
        return []
    return [{"guidance": record.get("guidance", default_guidance), **{k: v for k, v in record.items() if k in _SCORE_KEYS}}]


_SCORE_KEYS = {"n", "fid", "label_accuracy", "precision", "recall", "class_balance_tv"} | {f"{m}_ci" for m in CI_METRICS}


def read_evals(run_dir: Path, *, repair: bool = False) -> list[dict]:
    """The evaluation records of the run's evals.jsonl. A record this version cannot read (edited
    by hand, or from a damaged file) is refused with its line number: skipped, its point would
    count as not scored, and the run's weights may be gone."""
    return _checked_records(Path(run_dir) / EVALS_NAME, _is_eval_record, repair=repair)


def read_confirmations(run_dir: Path) -> list[dict]:
    """The confirmation records of the run's confirm.jsonl, checked as ``read_evals`` does."""
    return _checked_records(Path(run_dir) / CONFIRM_NAME, lambda rec: _are_scores(rec) and is_integer(rec.get("step")))


def _checked_records(path: Path, readable: Callable[[dict], bool], repair: bool = False) -> list[dict]:
    records = read_jsonl(path, repair=repair, strict=True)
    bad = next((i for i, rec in enumerate(records, 1) if not readable(rec)), None)
    if bad is not None:
        raise UserError(f"record {bad} of {path} is not one this version wrote (damaged or edited by hand): restore the file, or delete the record")
    return records


def _is_eval_record(rec: dict) -> bool:
    """Where the record was taken (point, target, step, images, seconds), and its scores unless it
    records a divergence."""
    where = (rec.get("target_kind") in ("steps", "seconds") and is_number(rec.get("target")) and is_integer(rec.get("point"))
             and is_integer(rec.get("step")) and is_number(rec.get("images_seen")) and is_number(rec.get("train_seconds")))  # fmt: skip
    if not where or rec.get("diverged"):
        return where
    rows = rec.get("by_guidance", [{"guidance": 0}])  # absent in records of older versions
    grid = rec.get("grid", "")  # a file of the run's own, which the report copies
    return (_are_scores(rec) and isinstance(rows, list) and bool(rows) and all(_are_scores(row) and is_number(row.get("guidance")) for row in rows)
            and isinstance(rec.get("sampler", ""), (str, type(None))) and isinstance(grid, str) and not Path(grid).is_absolute()
            and ".." not in Path(grid).parts)  # fmt: skip


def _are_scores(rec) -> bool:
    """Scores as ``evaluate.Scores`` writes them: numbers (null where not finite), intervals [lo, hi]."""
    def score(v) -> bool:  # the writer puts null for a score that is not finite
        return v is None or (is_number(v) and math.isfinite(v))

    def interval(v) -> bool:
        return v is None or (isinstance(v, list) and len(v) == 2 and all(score(x) for x in v))

    return (isinstance(rec, dict) and score(rec.get("guidance"))
            and all(score(rec.get(k)) for k in _SCORE_KEYS if not k.endswith("_ci"))
            and all(interval(rec.get(f"{m}_ci")) for m in CI_METRICS))  # fmt: skip


def seed_stats(values: Sequence[float | None], ci: Sequence[float] | None = None) -> dict:
    """The mean of one metric over seeds and its spread: the standard deviation with 3 or more
    seeds, the min-max range with 2, half the bootstrap interval ``ci`` with 1. ``lo``/``hi`` is
    the interval shown (mean -/+ std, min-max, or ``ci``). A missing or non-finite value (a
    diverged seed) makes the mean NaN."""
    values = list(values)
    out = {"mean": math.nan, "spread": None, "kind": None, "lo": None, "hi": None, "values": values}
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return out
    mean = statistics.fmean(values)
    out["mean"] = mean
    if len(values) >= 3:
        sd = statistics.stdev(values)
        out.update(spread=sd, kind="std", lo=mean - sd, hi=mean + sd)
    elif len(values) == 2:
        out.update(spread=max(values) - min(values), kind="min-max", lo=min(values), hi=max(values))
    elif ci and all(is_number(x) and math.isfinite(x) for x in ci):  # a record may hold [null, null]
        out.update(spread=(ci[1] - ci[0]) / 2, kind="ci", lo=ci[0], hi=ci[1])
    return out


def _stats_at(records: list[dict | None], guidance: float | None, default_guidance: float) -> dict:
    """``seed_stats`` of each metric at ``guidance`` (None: each record's own, single, scale) over
    the seeds' ``records``."""
    rows = []
    for rec in records:
        rows.append(next((r for r in guidance_rows(rec or {}, default_guidance) if guidance is None or r["guidance"] == guidance), {}))
    return {m: seed_stats([r.get(m) for r in rows], rows[0].get(f"{m}_ci") if len(rows) == 1 else None) for m in CI_METRICS}


def _means(stats: dict) -> dict:
    return {m: s["mean"] for m, s in stats.items()}


def _aggregate_lr(runs: list[dict], settings: Settings) -> dict:
    """One learning rate of one preset over its seeds: its guidance (``pick_guidance`` on the
    seed means of the final scores), the seed statistics there, and the mean curve of each metric
    over the evaluation points (at that guidance). A seed still in training (in an interim report)
    counts once it has finished; a diverged one counts at once, and makes the means NaN."""
    default_g = settings.guidances[0]
    counted = [r for r in runs if r["complete"] or r["diverged"]]
    finals = [None if r["diverged"] else r["final"] for r in counted]
    guidances = [g for g in settings.guidances if any(row["guidance"] == g for f in finals if f for row in guidance_rows(f, default_g))]
    by_guidance = [{"guidance": g, **_stats_at(finals, g, default_g)} for g in guidances]
    picked = pick_guidance([{"guidance": row["guidance"], **_means({m: row[m] for m in CI_METRICS})} for row in by_guidance]) if by_guidance else None
    g = picked["guidance"] if picked else None
    stats = _stats_at(finals, g, default_g) if picked else {m: seed_stats([]) for m in CI_METRICS}
    curve = []
    for point in range(1, min((len(r["evals"]) for r in counted), default=0) + 1):
        at = [next((e for e in r["evals"] if e.get("point") == point), None) for r in counted]
        if any(e is None or "step" not in e for e in at):
            break
        curve.append({
            "point": point,
            **{k: statistics.fmean(e[k] for e in at) for k in ("step", "images_seen", "train_seconds")},
            **_stats_at(at, g, default_g),
        })  # fmt: skip
    final = None
    if picked and math.isfinite(stats["fid"]["mean"]):
        final = {"guidance": g, **_means(stats),
                 **{k: statistics.fmean(f[k] for f in finals) for k in ("step", "images_seen", "train_seconds")}}  # fmt: skip
    speeds = [r["images_per_s"] for r in runs if r["images_per_s"]]
    return {
        # Complete: every seed of the comparison has a finished run here (one not yet started has no record to count).
        "lr": runs[0]["lr"], "seeds": [r["seed"] for r in counted],
        "complete": all(r["complete"] for r in runs) and set(settings.seeds) <= {r["seed"] for r in runs},
        "diverged": any(r["diverged"] for r in runs), "guidance": g, "final": final, "stats": stats,
        "guidances": by_guidance, "curve": curve, "images_per_s": statistics.median(speeds) if speeds else None,
    }  # fmt: skip


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` >= 1 degrees of freedom (not necessarily whole,
    as Welch's are). With t = sqrt(df) tan(theta) the density is proportional to
    cos(theta)^(df-1) on (-pi/2, pi/2), bounded for df >= 1: the tail is that integral from
    atan(|t|/sqrt(df)) to pi/2 (Simpson's rule) over its whole, whose closed form is
    sqrt(pi) Gamma(df/2) / (2 Gamma((df+1)/2))."""
    if not df >= 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df > 1000:  # the density is a sharp peak for the rule below, and the normal's to 4 digits
        return math.erfc(abs(t) / math.sqrt(2))
    start, intervals = math.atan(abs(t) / math.sqrt(df)), 2000
    h = (math.pi / 2 - start) / intervals
    weights = (1 if i in (0, intervals) else 4 if i % 2 else 2 for i in range(intervals + 1))
    tail = h / 3 * sum(w * math.cos(start + i * h) ** (df - 1) for i, w in enumerate(weights))
    whole = math.sqrt(math.pi) / 2 * math.exp(math.lgamma(df / 2) - math.lgamma((df + 1) / 2))
    return min(1.0, max(0.0, tail / whole))


def difference_test(a: dict, b: dict) -> dict:
    """Whether two ``seed_stats`` differ in mean, as ``{"p", "test"}``: Welch's t-test over the
    seeds where both have two or more; with one seed each, a z-test on the bootstrap intervals
    (evaluation noise only: one seed says nothing of the spread between training seeds); with one
    seed against several, or no interval, no test (p None)."""
    na, nb = len(a["values"]), len(b["values"])
    difference = abs(a["mean"] - b["mean"])
    if na >= 2 and nb >= 2:
        va, vb = statistics.variance(a["values"]) / na, statistics.variance(b["values"]) / nb
        if va + vb == 0:  # identical seeds on both sides (e.g. label accuracies of 1.0) say nothing of the spread
            return {"p": None, "test": None} if difference else {"p": 1.0, "test": "welch"}
        df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
        return {"p": student_t_two_sided_p(difference / math.sqrt(va + vb), df), "test": "welch"}
    if na == nb == 1 and a["kind"] == b["kind"] == "ci":
        z_level = statistics.NormalDist().inv_cdf(0.5 + BOOTSTRAP_LEVEL / 2)
        se = math.hypot((a["hi"] - a["lo"]) / 2, (b["hi"] - b["lo"]) / 2) / z_level
        if se == 0:  # as for identical seeds: no variation measured is no evidence of none
            return {"p": None, "test": None} if difference else {"p": 1.0, "test": "bootstrap"}
        return {"p": math.erfc(difference / se / math.sqrt(2)), "test": "bootstrap"}
    return {"p": None, "test": None}


def verdict(entries: list[dict], stats_key: str = "best_stats") -> list[dict]:
    """For FID and label accuracy: the leading preset (at its best learning rate and guidance)
    and, for each other, the difference of the seed means, its ``difference_test`` and whether it
    is a tie (p >= ``SIGNIFICANCE``; None where it cannot be tested). ``stats_key``: the scores of
    the selection ("best_stats") or of the confirmation ("confirmed_stats")."""
    out = []
    for metric, lower_is_better in (("fid", True), ("label_accuracy", False)):
        ranked = [e for e in entries if e.get(stats_key) and math.isfinite(e[stats_key][metric]["mean"])]
        ranked.sort(key=lambda e: e[stats_key][metric]["mean"] * (1 if lower_is_better else -1))
        if len(ranked) < 2:
            continue
        lead = ranked[0][stats_key][metric]
        others = []
        for e in ranked[1:]:
            s = e[stats_key][metric]
            test = difference_test(lead, s)
            others.append({"label": e["label"], "difference": abs(lead["mean"] - s["mean"]), "seeds": [len(lead["values"]), len(s["values"])],
                           **test, "tie": None if test["p"] is None else test["p"] >= SIGNIFICANCE})  # fmt: skip
        out.append({"metric": metric, "lower_is_better": lower_is_better, "leader": ranked[0]["label"], "others": others})
    return out


def pairwise(entries: list[dict], stats_key: str = "best_stats") -> list[dict]:
    """Every pair of presets scored under ``stats_key``, in the entries' order, with the
    ``difference_test`` of FID and of label accuracy: the verdict tests each against the leader
    only, and the question may be about two others (e.g. the UNet against the DiT, both behind a
    smaller DiT)."""
    scored = [e for e in entries if e.get(stats_key) and all(math.isfinite(e[stats_key][m]["mean"]) for m in ("fid", "label_accuracy"))]
    return [{"a": a["label"], "b": b["label"], **{m: difference_test(a[stats_key][m], b[stats_key][m]) for m in ("fid", "label_accuracy")}}
            for a, b in itertools.combinations(scored, 2)]  # fmt: skip


def effects(entries: list[dict], stats_key: str = "best_stats") -> list[dict]:
    """The backbone's effect apart from the objective's: the verdict among the presets trained with
    one objective ("backbone", fixed: the objective) and among the objectives of one preset
    ("objective", fixed: the preset). Empty for a comparison of one objective, whose verdict already
    is the backbones'. A group is judged only on entries that have ``stats_key`` scores, so its
    members are always scored on the same number of samples."""
    if len({e["objective"] for e in entries}) < 2:
        return []
    out = []
    for factor, other in (("backbone", "objective"), ("objective", "preset")):
        for fixed in dict.fromkeys(e[other] for e in entries):
            group = [e for e in entries if e[other] == fixed]
            if len(group) > 1 and (v := verdict(group, stats_key)):
                out.append({"factor": factor, "fixed": fixed, "verdict": v})
    return out


def collect_results(out_dir: Path, settings: Settings, stats: dict, plan: list[PlannedRun], floors: dict, device,
                    machine: dict | None = None) -> dict:  # fmt: skip
    import torch

    from ..runtime import device_name

    presets: dict[tuple, dict] = {}
    for run in plan:
        preset = run.preset
        entry = presets.setdefault((preset, run.objective), {
            "preset": preset, "objective": run.objective, "label": f"{preset} ({run.objective})",
            "objective_override": settings.objectives is not None, **stats[preset], "runs": [],
        })  # fmt: skip
        entry["train_flops_per_image"] = 3 * stats[preset]["gflops_per_image"] * 1e9
        evals = sorted(read_evals(run.run_dir), key=lambda r: (r["step"], r.get("point", 0)))
        metrics = read_metrics(run.run_dir)
        speeds = [m["images_per_s"] for m in metrics if m.get("images_per_s")]
        batch = stats[preset]["batch_size"]
        entry["runs"].append({
            "lr": run.lr,
            "seed": run.seed,
            "objective": run.objective,
            "run_dir": str(run.run_dir.relative_to(out_dir)),
            "eval_points": len(run.targets),
            "complete": len(evals) >= len(run.targets),
            "diverged": any(e.get("diverged") for e in evals),
            "images_per_s": statistics.median(speeds) if speeds else None,
            "final": evals[-1] if evals else None,
            "evals": evals,
            "confirmed": read_confirmations(run.run_dir),
            "loss": [{"step": m["step"], "images_seen": m["step"] * batch, "loss": m["loss"]} for m in metrics if "loss" in m],
        })  # fmt: skip
    for entry in presets.values():
        entry["lrs"] = [_aggregate_lr([r for r in entry["runs"] if r["lr"] == lr], settings) for lr in settings.lrs
                        if any(r["lr"] == lr for r in entry["runs"])]  # fmt: skip
        # Learning rates scored on every seed this preset and objective has runs of, where any is:
        # a mean over other seeds (or over fewer) is not the same measurement.
        seeds = {r["seed"] for r in entry["runs"]}
        best = pick_best([a for a in entry["lrs"] if a["final"] and set(a["seeds"]) >= seeds] or entry["lrs"])
        entry["best_lr"] = best["lr"] if best["final"] else None
        entry["best_guidance"] = best["guidance"] if best["final"] else None
        entry["best"] = best["final"]
        entry["best_stats"] = best["stats"]
        entry["images_per_s"] = best["images_per_s"]
        # Every seed at the guidance picked on the seed means: pooling seeds confirmed at different
        # scales would count the scales' difference as seed spread.
        confirmed = [_confirmed(settings, r, entry["best_guidance"]) for r in entry["runs"] if r["lr"] == entry["best_lr"] and r["final"]]
        entry["confirmed_stats"] = None
        if settings.final_n and confirmed and all(confirmed):
            entry["confirmed_stats"] = _stats_at(confirmed, None, settings.guidances[0])
    device = torch.device(device)
    entries = list(presets.values())
    held = {(e["preset"], r["objective"], r["lr"], r["seed"]): r for e in entries for r in e["runs"]}
    unfinished = []  # asked for, and not counted in any mean (unknown where what was asked is)
    for preset, objective, lr, seed in settings.asked or []:
        run = held.get((preset, objective, lr, seed))
        if not (run and (run["complete"] or run["diverged"])):
            run_dir = out_dir / "runs" / run_name(preset, lr, seed, _override(preset, objective))
            started = any((run_dir / name).is_file() for name in (CHECKPOINT_NAME, "metrics.jsonl", EVALS_NAME))  # in training, or stopped
            unfinished.append({"preset": preset, "objective": objective, "lr": lr, "seed": seed, "started": started})
    # Scores at different sample counts are not comparable (FID's bias depends on n): the
    # confirmed verdict needs every preset confirmed.
    # A preset with no scores at all (every lr diverged, or unfinished) is out of both verdicts alike.
    judged = [e for e in entries if e["best"]]
    every_confirmed = bool(judged) and all(e["confirmed_stats"] for e in judged)
    return {
        "settings": settings.to_dict(),
        "floor": floors["floor"],
        "confirmed_floor": floors.get("confirmed_floor"),
        "machine": machine or {"device": device_name(device), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "presets": entries,
        "unfinished": unfinished,
        "verdict": verdict(entries),
        "confirmed_verdict": verdict(entries, "confirmed_stats") if every_confirmed else [],
        "effects": effects(entries),
        "confirmed_effects": effects(entries, "confirmed_stats"),
        "pairwise": pairwise(entries),
        "confirmed_pairwise": pairwise(entries, "confirmed_stats"),
    }
