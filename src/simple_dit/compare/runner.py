"""Running a comparison: its settings (and the ``compare.json`` that keeps one report directory to
one set of them), each (preset, lr) run trained in segments up to its evaluation points and scored
there into ``evals.jsonl``, the ``compare()`` orchestration, and the collection of the runs'
results with the pick of each preset's best learning rate."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..diffusion import DEFAULT_GUIDANCE
from ..errors import TrainingDiverged, UserError
from ..io import DirectoryLock, append_jsonl, ensure_writable_dir, read_jsonl, write_json
from .budget import DEFAULT_LRS, Budget, Target, eval_fractions, parse_budget, parse_lrs, parse_presets, run_name, schedule
from .report import GRID_PER_CLASS, write_report

EVALS_NAME = "evals.jsonl"
SETTINGS_NAME = "compare.json"

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
    guidance: float
    dataset: str
    seed: int
    precision: str

    # The settings that decide what a run directory and its evals.jsonl hold.
    RESULT_KEYS = ("budget", "fractions", "eval_n", "steps", "sampler", "guidance", "dataset", "seed", "precision")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("presets", "lrs", "fractions", "eval_n", "steps", "sampler", "guidance", "dataset", "seed", "precision")}
        d["budget"] = {"kind": self.budget.kind, "amount": self.budget.amount, "text": str(self.budget)}
        return d


def _check_settings(out_dir: Path, settings: Settings) -> None:
    """Refuse to mix results of different settings in one report directory."""
    path = out_dir / SETTINGS_NAME
    new = settings.to_dict()
    try:
        old = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict):
        for key in Settings.RESULT_KEYS:
            a, b = old.get(key), new[key]
            if key == "budget":
                a = (a.get("kind"), a.get("amount"), a.get("text")) if isinstance(a, dict) else a
                b = (b["kind"], b["amount"], b["text"])
            if a != b:
                shown_a, shown_b = (v[2] if key == "budget" and isinstance(v, tuple) else v for v in (a, b))
                raise UserError(
                    f"{out_dir} holds a comparison with {key.replace('_', '-')} {shown_a}, not {shown_b}; "
                    "rerun it with the same settings to resume it, or choose another --out"
                )
        # Presets and learning rates may differ: each (preset, lr) run has its own directory.
    write_json(path, new)


def _train(config, run_dir: Path, *, resume: bool, data_dir, device) -> None:
    """One training segment. Its end-of-run sample grid is skipped: each evaluation point draws
    and saves its own samples, and the grid can cost more than a short segment's training."""
    from ..train import train

    train(config, run_dir, resume=resume, data_dir=data_dir, device=device, progress=False, final_samples=False)


def _train_state(run_dir: Path) -> dict | None:
    """step, train_seconds and images_seen of the run's checkpoint (None before the first)."""
    from ..checkpoint import CHECKPOINT_NAME, load_weights

    if not (run_dir / CHECKPOINT_NAME).is_file():
        return None
    return load_weights(run_dir)[2]


class _Meters:
    """One QualityMeter per (dataset, data_dir), kept for the life of the process (the test
    features take seconds to compute)."""

    _cache: dict = {}

    @classmethod
    def get(cls, dataset: str, data_dir):
        from ..evaluate import QualityMeter

        key = (dataset, str(data_dir) if data_dir is not None else None)
        if key not in cls._cache:
            cls._cache[key] = QualityMeter(dataset, data_dir, progress=False)
        return cls._cache[key]


def _evaluate(run_dir: Path, settings: Settings, meter, device, grid_path: Path) -> dict:
    """Score the run's checkpoint (EMA weights) on ``eval_n`` fresh samples; save a grid of the
    first few per class."""
    from dataclasses import asdict

    from ..diffusion import check_sampler
    from ..sample import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(run_dir, device=device, precision=settings.precision)
    labels = pipe.cycled_labels(settings.eval_n)
    sampler = check_sampler(pipe.diffusion, settings.sampler)
    images = pipe(labels, sampler=sampler, steps=settings.steps, guidance=settings.guidance, seed=settings.seed)
    scores = {k: v for k, v in asdict(meter.score(images, labels)).items() if v is not None}
    first = slice(0, GRID_PER_CLASS * pipe.num_classes)
    pipe.save_grid(images[first], labels[first], grid_path)
    scores["sampler"] = sampler
    scores["eval_seconds"] = time.perf_counter() - start
    return scores


def run_config(preset: str, lr: float, settings: Settings):
    from ..config import get_preset

    config = get_preset(preset)
    config.train.lr = lr
    config.train.seed = settings.seed
    config.train.dataset = settings.dataset
    config.train.precision = settings.precision
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


def _run_one(
    preset: str, lr: float, settings: Settings, run_dir: Path, targets: list[Target], *, data_dir, device, log, meter=None
) -> None:
    from ..checkpoint import CHECKPOINT_NAME

    evals_path = run_dir / EVALS_NAME
    name = run_dir.name
    if not (run_dir / CHECKPOINT_NAME).is_file():
        # Nothing to resume from: anything left here is from an attempt that never checkpointed.
        for stale in (EVALS_NAME, "metrics.jsonl"):
            (run_dir / stale).unlink(missing_ok=True)
    records = read_jsonl(evals_path, repair=True)
    if any(rec.get("diverged") for rec in records):
        log(f"{name}: diverged earlier; not retried")
        return
    done = {(rec.get("target_kind"), round(float(rec.get("target", -1)), 6)) for rec in records}
    todo = [t for t in targets if t.key() not in done]
    if not todo:
        log(f"{name}: done ({len(targets)} evaluation points)")
        return
    for target in todo:
        state = _train_state(run_dir)
        if state is None or not target.reached(state):
            what = f"{int(target.value)} steps" if target.kind == "steps" else f"{target.value:.1f} s"
            log(f"{name}: training to {what} ({target.fraction:.0%} of the budget)")
            config = _set_stop(run_config(preset, lr, settings), target)
            try:
                _train(config, run_dir, resume=state is not None, data_dir=data_dir, device=device)
            except TrainingDiverged as e:
                # Too high a learning rate is a result of the sweep, not a failure of it: record it
                # and go on with the other runs.
                state = _train_state(run_dir) or {"step": 0, "images_seen": 0, "train_seconds": 0.0}
                append_jsonl(evals_path, {
                    "point": target.point, "fraction": target.fraction, "target_kind": target.kind, "target": target.value,
                    "step": state["step"], "images_seen": state["images_seen"], "train_seconds": state["train_seconds"],
                    "diverged": True, "message": str(e),
                })  # fmt: skip
                log(f"{name}: {e}")
                return
            state = _train_state(run_dir)
        meter = meter or _Meters.get(settings.dataset, data_dir)
        grid = run_dir / "eval_samples" / f"point_{target.point}.png"
        scores = _evaluate(run_dir, settings, meter, device, grid)
        record = {
            "point": target.point, "fraction": target.fraction, "target_kind": target.kind, "target": target.value,
            "step": state["step"], "images_seen": state["images_seen"], "train_seconds": state["train_seconds"],
            **scores, "grid": str(grid.relative_to(run_dir)),
        }  # fmt: skip
        append_jsonl(evals_path, record)
        shutil.copyfile(grid, run_dir / "samples.png")
        acc = record.get("label_accuracy")
        log(
            f"{name}: point {target.point}/{len(targets)} at {state['images_seen']:,} images, {state['train_seconds']:.1f} s: "
            f"FID {record['fid']:.2f}" + (f", label accuracy {acc:.3f}" if acc is not None else "")
        )


def _model_stats(preset: str) -> dict:
    from ..config import get_preset
    from ..models import build_model, count_parameters, forward_gflops

    config = get_preset(preset)
    model = build_model(config.model)
    return {
        "arch": config.model.arch,
        "params": count_parameters(model),
        "gflops_per_image": forward_gflops(model, config.model.input_size),
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
    guidance: float = DEFAULT_GUIDANCE,
    dataset: str = "mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device=None,
    precision: str = "auto",
    log: Callable[[str], None] | None = None,
    meter=None,
) -> dict:
    """Train and score every (preset, lr) at the same budget; write the report; return results.json's content.

    ``meter`` is the ``evaluate.QualityMeter`` to score with (default: one for ``dataset``, made
    once per process)."""
    from ..config import get_preset
    from ..data import DATASETS
    from ..diffusion import check_sampler, make_process
    from ..runtime import PRECISIONS, parse_device

    log = log or (lambda msg: print(f"compare: {msg}", file=sys.stderr, flush=True))
    preset_names = parse_presets(presets)
    budget = budget if isinstance(budget, Budget) else parse_budget(budget)
    lr_list = parse_lrs(lrs)
    fractions = eval_fractions(eval_every_frac)
    if isinstance(eval_n, bool) or not isinstance(eval_n, int) or eval_n < 6:
        raise UserError(f"--eval-n must be an integer of at least 6, got {eval_n}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise UserError(f"--steps must be a positive integer, got {steps}")
    if not math.isfinite(guidance) or guidance <= 0:
        raise UserError(f"--guidance must be positive, got {guidance}")
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    for preset in preset_names:  # e.g. --sampler euler for an eps model: fail now, not after training
        check_sampler(make_process(get_preset(preset).diffusion), sampler)
    device = parse_device(device)
    settings = Settings(preset_names, lr_list, budget, fractions, eval_n, steps, sampler, float(guidance), dataset, seed, precision)
    out_dir = Path(out_dir)
    ensure_writable_dir(out_dir)
    with DirectoryLock(out_dir):
        ensure_writable_dir(out_dir / "runs")
        _check_settings(out_dir, settings)
        return _run_all(out_dir, settings, data_dir=data_dir, device=device, log=log, meter=meter)


def _run_all(out_dir: Path, settings: Settings, *, data_dir, device, log, meter) -> dict:
    preset_names, budget, eval_n = settings.presets, settings.budget, settings.eval_n

    stats = {p: _model_stats(p) for p in preset_names}
    plan = []
    for preset in preset_names:
        for lr in settings.lrs:
            targets = schedule(budget, settings.fractions, stats[preset]["batch_size"], stats[preset]["gflops_per_image"])
            plan.append((preset, lr, out_dir / "runs" / run_name(preset, lr), targets))
    log(f"{len(plan)} run{'s' if len(plan) != 1 else ''} of {budget.describe()} each, {len(settings.fractions)} evaluation points, {eval_n} samples per point")
    for preset, lr, run_dir, targets in plan:
        ensure_writable_dir(run_dir)
        _run_one(preset, lr, settings, run_dir, targets, data_dir=data_dir, device=device, log=log, meter=meter)

    meter = meter or _Meters.get(settings.dataset, data_dir)
    floor = {k: v for k, v in dataclasses.asdict(meter.floor(eval_n, seed=settings.seed)).items() if v is not None}
    results = collect_results(out_dir, settings, stats, plan, floor, device)
    write_report(out_dir, results)
    log(f"wrote report.md, report.html and results.json to {out_dir}")
    return results


# ---- results -----------------------------------------------------------------------------------


def _sort_key(final: dict | None) -> tuple:
    """Lower is better: final FID (NaN and missing last), then higher label accuracy."""
    if not final:
        return (1, math.inf, 0.0)
    fid = final.get("fid", math.nan)
    acc = final.get("label_accuracy") or 0.0
    return (0, fid if math.isfinite(fid) else math.inf, -acc)


def pick_best(runs: Sequence[dict]) -> dict:
    """The run whose ``final`` scores are best: lowest FID, ties broken by label accuracy (the
    first of equal runs wins)."""
    return min(runs, key=lambda r: _sort_key(r.get("final")))


def read_metrics(run_dir: Path) -> list[dict]:
    """The training records of metrics.jsonl (a resumed run has already dropped the records of
    steps it redid, see train._truncate_metrics)."""
    return [rec for rec in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in rec]


def collect_results(out_dir: Path, settings: Settings, stats: dict, plan, floor: dict, device) -> dict:
    import platform

    import torch

    presets: dict[str, dict] = {}
    for preset, lr, run_dir, targets in plan:
        entry = presets.setdefault(preset, {"preset": preset, **stats[preset], "runs": []})
        entry["train_flops_per_image"] = 3 * stats[preset]["gflops_per_image"] * 1e9
        evals = sorted(read_jsonl(run_dir / EVALS_NAME), key=lambda r: (r["step"], r.get("point", 0)))
        metrics = read_metrics(run_dir)
        speeds = [m["images_per_s"] for m in metrics if m.get("images_per_s")]
        batch = stats[preset]["batch_size"]
        entry["runs"].append({
            "lr": lr,
            "run_dir": str(run_dir.relative_to(out_dir)),
            "eval_points": len(targets),
            "complete": len(evals) >= len(targets),
            "diverged": any(e.get("diverged") for e in evals),
            "images_per_s": statistics.median(speeds) if speeds else None,
            "final": evals[-1] if evals else None,
            "evals": evals,
            "loss": [{"step": m["step"], "images_seen": m["step"] * batch, "loss": m["loss"]} for m in metrics if "loss" in m],
        })  # fmt: skip
    for entry in presets.values():
        best = pick_best(entry["runs"])
        entry["best_lr"] = best["lr"] if best["final"] else None
        entry["best"] = best["final"]
        entry["images_per_s"] = best["images_per_s"]
    device = torch.device(device)
    return {
        "settings": settings.to_dict(),
        "floor": floor,
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "presets": list(presets.values()),
    }
