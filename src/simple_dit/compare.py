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
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .diffusion import DEFAULT_GUIDANCE
from .errors import UserError

DEFAULT_LRS = (1e-4, 3e-4, 1e-3)
EVALS_NAME = "evals.jsonl"
SETTINGS_NAME = "compare.json"
GRID_PER_CLASS = 8
_NEVER = 10**12  # sample_every / checkpoint_every: no mid-segment grids or checkpoints

# ---- parsing -----------------------------------------------------------------------------------

_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "secs": 1.0, "seconds": 1.0, "m": 60.0, "min": 60.0, "mins": 60.0, "minutes": 60.0,
               "h": 3600.0, "hr": 3600.0, "hours": 3600.0}  # fmt: skip
_NUMBER = r"((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
_COUNT_RE = re.compile(rf"{_NUMBER}\s*([A-Za-z]?)\s*-?\s*(?i:(images?|imgs?|flops?))")
_TIME_RE = re.compile(rf"{_NUMBER}\s*(?i:({'|'.join(_TIME_UNITS)}))")


@dataclass(frozen=True)
class Budget:
    """A training budget: ``kind`` is "seconds", "images" or "flops", ``amount`` how many."""

    kind: str
    amount: float

    def __str__(self) -> str:
        if self.kind == "seconds":
            return f"{self.amount / 60:g}m" if self.amount >= 60 and self.amount % 60 == 0 else f"{self.amount:g}s"
        return f"{_compact(self.amount)}-{self.kind}"

    def describe(self) -> str:
        if self.kind == "seconds":
            return f"{self.amount:g} s of training on this machine"
        if self.kind == "images":
            return f"{self.amount:,.0f} training images"
        return f"{_compact(self.amount)} training FLOPs"


def _compact(x: float) -> str:
    """The shorter of 2000000000 and 2e9 (both exact)."""
    plain = f"{x:.12g}"
    mantissa, exponent = f"{x:.12e}".split("e")
    sci = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return sci if "e" in plain or (len(plain) > 6 and len(sci) < len(plain)) else plain


def parse_budget(text: str) -> Budget:
    """``90s``, ``10m``, ``1.5h`` (training seconds), ``5000-images``, ``200k-images``,
    ``1e15-flops``, ``500T-flops``."""
    raw = str(text).strip()
    s = raw.replace("_", "")
    hint = "expected e.g. 10m, 90s, 200k-images or 1e15-flops"
    if m := _COUNT_RE.fullmatch(s):
        if m.group(2) not in _SI:
            raise UserError(f"malformed budget {raw!r}: unknown multiplier {m.group(2)!r} (use k, M, G, T or P); {hint}")
        value = float(m.group(1)) * _SI[m.group(2)]
        kind = "images" if m.group(3).lower().startswith("im") else "flops"
    elif m := _TIME_RE.fullmatch(s):
        value = float(m.group(1)) * _TIME_UNITS[m.group(2).lower()]
        kind = "seconds"
    else:
        raise UserError(f"malformed budget {raw!r}: {hint}")
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"budget {raw!r} must be positive and finite")
    if kind == "images" and value < 1:
        raise UserError(f"budget {raw!r} is less than one image")
    return Budget(kind, value)


def parse_lrs(text: str | Sequence[float]) -> list[float]:
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if not parts or any(not p for p in parts):
            raise UserError(f"malformed --lrs {text!r}: expected comma-separated learning rates, e.g. 1e-4,3e-4,1e-3")
        try:
            lrs = [float(p) for p in parts]
        except ValueError:
            raise UserError(f"malformed --lrs {text!r}: expected comma-separated learning rates, e.g. 1e-4,3e-4,1e-3") from None
    else:
        lrs = [float(x) for x in text]
    if not lrs:
        raise UserError("--lrs is empty: give at least one learning rate")
    for lr in lrs:
        if not math.isfinite(lr) or lr <= 0:
            raise UserError(f"learning rate {lr:g} in --lrs must be positive and finite")
    names = [_lr_name(lr) for lr in lrs]
    if len(set(names)) != len(names):
        raise UserError(f"--lrs repeats a learning rate: {','.join(names)}")
    return lrs


def parse_presets(text: str | Sequence[str]) -> list[str]:
    from .config import PRESETS

    names = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(p).strip() for p in text]
    if not names or any(not n for n in names):
        raise UserError(f"malformed --presets {text!r}: expected comma-separated preset names, e.g. unet-seed,dit-seed")
    for name in names:
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    if len(set(names)) != len(names):
        raise UserError(f"--presets repeats a preset: {','.join(names)}")
    return names


def eval_fractions(every: float) -> list[float]:
    """Evaluation points as fractions of the budget: every 0.25 -> 0.25, 0.5, 0.75, 1."""
    if not (isinstance(every, (int, float)) and math.isfinite(every) and 0 < every <= 1):
        raise UserError(f"--eval-every-frac must be in (0, 1], got {every}")
    n = math.ceil(1 / every - 1e-9)
    return [min(1.0, round(k * every, 12)) for k in range(1, n + 1)]


def _lr_name(lr: float) -> str:
    return f"{lr:g}"


def run_name(preset: str, lr: float) -> str:
    return f"{preset}_lr{_lr_name(lr)}"


# ---- the schedule of one run -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """An evaluation point: train until ``value`` optimiser steps (kind "steps") or training
    seconds (kind "seconds"), then score the checkpoint."""

    point: int  # 1-based
    fraction: float
    kind: str  # "steps" | "seconds"
    value: float

    def key(self) -> tuple[str, float]:
        return (self.kind, round(float(self.value), 6))

    def reached(self, state: dict) -> bool:
        if self.kind == "steps":
            return state["step"] >= self.value
        return state["train_seconds"] >= self.value - 1e-9


def images_per_budget(budget: Budget, gflops_per_image: float) -> float | None:
    """Images the budget pays for (None for a time budget)."""
    if budget.kind == "images":
        return budget.amount
    if budget.kind == "flops":
        return budget.amount / (3 * gflops_per_image * 1e9)
    return None


def schedule(budget: Budget, fractions: Sequence[float], batch_size: int, gflops_per_image: float) -> list[Target]:
    """The evaluation points of one run; points that round to the same step are merged."""
    if budget.kind == "seconds":
        return [Target(k + 1, f, "seconds", round(f * budget.amount, 9)) for k, f in enumerate(fractions)]
    images = images_per_budget(budget, gflops_per_image)
    targets: list[Target] = []
    for f in fractions:
        steps = max(1, round(f * images / batch_size))
        if targets and steps <= targets[-1].value:
            targets[-1] = Target(targets[-1].point, f, "steps", targets[-1].value)  # the later fraction wins
            continue
        targets.append(Target(len(targets) + 1, f, "steps", steps))
    return targets


# ---- evals.jsonl -------------------------------------------------------------------------------


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """The complete JSON lines of ``path``. A trailing line without its newline (a write that was
    interrupted) is ignored, and with ``repair`` cut off so that the next append starts cleanly;
    lines that are not JSON objects are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    records = []
    for line in complete.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: Path) -> list[dict]:
    """The training records of metrics.jsonl (a resumed run has already dropped the records of
    steps it redid, see train._truncate_metrics)."""
    return [rec for rec in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in rec]


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
    from .checkpoint import write_json

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
    from .train import train

    train(config, run_dir, resume=resume, data_dir=data_dir, device=device, progress=False, final_samples=False)


def _train_state(run_dir: Path) -> dict | None:
    """step, train_seconds and images_seen of the run's checkpoint (None before the first)."""
    from .checkpoint import CHECKPOINT_NAME, load_weights

    if not (run_dir / CHECKPOINT_NAME).is_file():
        return None
    return load_weights(run_dir)[2]


class _Meters:
    """One QualityMeter per (dataset, data_dir), kept for the life of the process (the test
    features take seconds to compute)."""

    _cache: dict = {}

    @classmethod
    def get(cls, dataset: str, data_dir):
        from .evaluate import QualityMeter

        key = (dataset, str(data_dir) if data_dir is not None else None)
        if key not in cls._cache:
            cls._cache[key] = QualityMeter(dataset, data_dir, progress=False)
        return cls._cache[key]


def _evaluate(run_dir: Path, settings: Settings, meter, device, grid_path: Path) -> dict:
    """Score the run's checkpoint (EMA weights) on ``eval_n`` fresh samples; save a grid of the
    first few per class."""
    from dataclasses import asdict

    from .diffusion import check_sampler
    from .sample import Pipeline

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
    from .config import get_preset

    config = get_preset(preset)
    config.train.lr = lr
    config.train.seed = settings.seed
    config.train.dataset = settings.dataset
    config.train.precision = settings.precision
    config.train.sample_every = _NEVER
    config.train.checkpoint_every = _NEVER
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
    from .checkpoint import CHECKPOINT_NAME

    evals_path = run_dir / EVALS_NAME
    name = run_dir.name
    if not (run_dir / CHECKPOINT_NAME).is_file():
        # Nothing to resume from: anything left here is from an attempt that never checkpointed.
        for stale in (EVALS_NAME, "metrics.jsonl"):
            (run_dir / stale).unlink(missing_ok=True)
    done = {(rec.get("target_kind"), round(float(rec.get("target", -1)), 6)) for rec in read_jsonl(evals_path, repair=True)}
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
            _train(config, run_dir, resume=state is not None, data_dir=data_dir, device=device)
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
    from .config import get_preset
    from .models import build_model, count_parameters, forward_gflops

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
    from .checkpoint import ensure_writable_dir
    from .config import get_preset
    from .data import DATASETS
    from .diffusion import check_sampler, make_process
    from .runtime import PRECISIONS, parse_device

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
    ensure_writable_dir(out_dir / "runs")
    _check_settings(out_dir, settings)

    stats = {p: _model_stats(p) for p in preset_names}
    plan = []
    for preset in preset_names:
        for lr in lr_list:
            targets = schedule(budget, fractions, stats[preset]["batch_size"], stats[preset]["gflops_per_image"])
            plan.append((preset, lr, out_dir / "runs" / run_name(preset, lr), targets))
    log(f"{len(plan)} run{'s' if len(plan) != 1 else ''} of {budget.describe()} each, {len(fractions)} evaluation points, {eval_n} samples per point")
    for preset, lr, run_dir, targets in plan:
        ensure_writable_dir(run_dir)
        _run_one(preset, lr, settings, run_dir, targets, data_dir=data_dir, device=device, log=log, meter=meter)

    meter = meter or _Meters.get(dataset, data_dir)
    floor = {k: v for k, v in dataclasses.asdict(meter.floor(eval_n, seed=seed)).items() if v is not None}
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


# ---- report ------------------------------------------------------------------------------------


def _style(presets: list[dict]):
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    dashes = ["-", "--", ":", "-."]
    styles = {}
    for i, entry in enumerate(presets):
        for j, run in enumerate(entry["runs"]):
            best = run["lr"] == entry["best_lr"]
            styles[(entry["preset"], run["lr"])] = dict(
                color=colours[i % len(colours)], linestyle=dashes[j % len(dashes)], linewidth=2.2 if best else 1.2,
                alpha=1.0 if best else 0.75, marker="o", markersize=4 if best else 3,
                label=f"{entry['preset']} lr={run['lr']:g}" + (" (best)" if best else ""),
            )  # fmt: skip
    return styles


_X_AXES = {
    "images": ("training images seen", lambda entry, e: e["images_seen"]),
    "seconds": ("training seconds", lambda entry, e: e["train_seconds"]),
    "flops": ("training FLOPs", lambda entry, e: e["images_seen"] * entry["train_flops_per_image"]),
}


def _log_y(ax) -> None:
    """A log y axis labelled with plain numbers (minor ticks too when it spans little)."""
    from matplotlib import ticker

    ax.set_yscale("log")
    plain = ticker.FuncFormatter(lambda v, _: f"{v:.4g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if hi / max(lo, 1e-12) < 20 else ticker.NullFormatter())


def _quality_figure(results: dict, axis: str, path: Path) -> Path:
    """FID and label accuracy against one measure of compute, a line per (preset, lr)."""
    import matplotlib.pyplot as plt

    x_label, x_of = _X_AXES[axis]
    styles = _style(results["presets"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    floor = results["floor"]
    for ax, metric, title in ((axes[0], "fid", "FID (lower is better)"), (axes[1], "label_accuracy", "label accuracy (higher is better)")):
        for entry in results["presets"]:
            for run in entry["runs"]:
                pts = [(x_of(entry, e), e[metric]) for e in run["evals"] if e.get(metric) is not None]
                if pts:
                    ax.plot(*zip(*pts), **styles[(entry["preset"], run["lr"])])
        if metric == "fid":
            _log_y(ax)
            if "fid" in floor:  # a line would squash the curves into the top of the axis
                title = f"FID (lower is better; real data {floor['fid']:.3g})"
        elif metric in floor:
            ax.axhline(floor[metric], color="grey", linewidth=0.8, linestyle=":", label=f"real data ({floor[metric]:.3g})")
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(x_label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.22)  # (tight_layout costs seconds)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _loss_figure(results: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    styles = _style(results["presets"])
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for entry in results["presets"]:
        for run in entry["runs"]:
            pts = [(p["images_seen"], p["loss"]) for p in run["loss"]]
            if pts:
                st = dict(styles[(entry["preset"], run["lr"])], marker=None)
                ax.plot(*zip(*pts), **st)
    ax.set_xlabel("training images seen")
    ax.set_ylabel("training loss (mean per log window)")
    _log_y(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.13, top=0.96)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sample_grid(out_dir: Path, entry: dict, results: dict) -> Path | None:
    """The best run's last evaluation grid, copied to OUT/samples_<preset>.png (drawn again from
    the checkpoint if it is missing)."""
    best = next((r for r in entry["runs"] if r["lr"] == entry["best_lr"]), None)
    if best is None or best["final"] is None:
        return None
    run_dir = out_dir / best["run_dir"]
    dest = out_dir / f"samples_{entry['preset']}.png"
    src = run_dir / best["final"].get("grid", "")
    if best["final"].get("grid") and src.is_file():
        shutil.copyfile(src, dest)
        return dest
    from .sample import Pipeline

    s = results["settings"]
    pipe = Pipeline.from_pretrained(run_dir, precision=s["precision"])
    labels = pipe.cycled_labels(min(s["eval_n"], GRID_PER_CLASS * pipe.num_classes))
    images = pipe(labels, sampler=s["sampler"], steps=s["steps"], guidance=s["guidance"], seed=s["seed"])
    return pipe.save_grid(images, labels, dest)


def _fmt(value, spec: str = ".3f", missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def _summary_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["preset", "params (M)", "GFLOPs / image (fwd)", "train images/s", "best lr", "FID", "label acc.", "precision", "recall", "images seen", "train s"]
    rows = []
    for e in results["presets"]:
        b = e["best"] or {}
        rows.append([
            e["preset"], f"{e['params'] / 1e6:.2f}", f"{e['gflops_per_image']:.3f}", _fmt(e["images_per_s"], ".0f"),
            _fmt(e["best_lr"], "g"), _fmt(b.get("fid"), ".2f"), _fmt(b.get("label_accuracy")), _fmt(b.get("precision")),
            _fmt(b.get("recall")), _fmt(b.get("images_seen"), ",d"), _fmt(b.get("train_seconds"), ".1f"),
        ])  # fmt: skip
    f = results["floor"]
    rows.append(["real data (floor)", "", "", "", "", _fmt(f.get("fid"), ".2f"), _fmt(f.get("label_accuracy")),
                 _fmt(f.get("precision")), _fmt(f.get("recall")), "", ""])  # fmt: skip
    return head, rows


def _run_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    head = ["preset", "lr", "eval points", "FID", "label acc.", "precision", "recall", "images seen", "train s", "train images/s"]
    rows = []
    for e in results["presets"]:
        for r in e["runs"]:
            f = r["final"] or {}
            mark = " *" if r["lr"] == e["best_lr"] else ""
            rows.append([
                e["preset"], f"{r['lr']:g}{mark}", f"{len(r['evals'])}/{r['eval_points']}", _fmt(f.get("fid"), ".2f"),
                _fmt(f.get("label_accuracy")), _fmt(f.get("precision")), _fmt(f.get("recall")),
                _fmt(f.get("images_seen"), ",d"), _fmt(f.get("train_seconds"), ".1f"), _fmt(r["images_per_s"], ".0f"),
            ])  # fmt: skip
    return head, rows


def _md_table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(head, rows) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _settings_line(results: dict) -> str:
    s = results["settings"]
    m = results["machine"]
    used = sorted({e["sampler"] for p in results["presets"] for r in p["runs"] for e in r["evals"] if "sampler" in e})
    sampler = "/".join(used) or s["sampler"] or "default sampler"
    threads = f"{m['torch_threads']} torch thread" + ("s" if m["torch_threads"] != 1 else "")
    return (
        f"Budget {s['budget']['text']} per run; learning rates {', '.join(f'{lr:g}' for lr in s['lrs'])}; "
        f"scored at {', '.join(f'{f:.0%}' for f in s['fractions'])} of the budget on {s['eval_n']} samples "
        f"({sampler}, {s['steps']} steps, guidance {s['guidance']:g}, seed {s['seed']}, EMA weights) against the "
        f"{s['dataset']} test split; trained on {m['device']} with {threads}, precision {s['precision']}."
    )


NOTES = (
    "Training seconds count optimiser steps only (no sample grids, checkpoints or evaluations). "
    "Training FLOPs are 3 x the forward FLOPs per image x images seen. "
    "FID is measured in the feature space of the package's small evaluator CNN (not Inception) and is biased upwards "
    "for small sample counts: compare only numbers with the same n, and against the real-data floor (training images scored the same way). "
    "The best learning rate of a preset has the lowest final FID (ties: the highest label accuracy)."
)


def write_report(out_dir: Path, results: dict) -> dict[str, Path]:
    """Write the figures, report.md, report.html and results.json into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    from .checkpoint import atomic_write, write_json

    out_dir = Path(out_dir)
    figures = {f"quality_vs_{axis}": _quality_figure(results, axis, out_dir / f"quality_vs_{axis}.png") for axis in _X_AXES}
    figures["loss"] = _loss_figure(results, out_dir / "loss.png")
    grids = {}
    for entry in results["presets"]:
        g = _sample_grid(out_dir, entry, results)
        entry["samples"] = g.name if g else None
        if g:
            grids[entry["preset"]] = g
    results["figures"] = {k: p.name for k, p in figures.items()}
    write_json(out_dir / "results.json", results)

    title = "simple-dit comparison: " + " vs ".join(e["preset"] for e in results["presets"])
    captions = {
        "quality_vs_images": "Quality against training images seen",
        "quality_vs_seconds": "Quality against training time",
        "quality_vs_flops": "Quality against training compute",
        "loss": "Training loss",
    }

    def grid_caption(entry) -> str:
        b = entry["best"] or {}
        return f"{entry['preset']} at lr {entry['best_lr']:g}: FID {_fmt(b.get('fid'), '.2f')}, label accuracy {_fmt(b.get('label_accuracy'))}"

    with_grid = [e for e in results["presets"] if e["preset"] in grids]
    md = [f"# {title}", "", _settings_line(results), "", "## Summary", "", _md_table(*_summary_rows(results)), ""]
    md += ["## Samples (each preset at its best learning rate)", ""]
    if with_grid:
        md += ["| " + " | ".join(grid_caption(e) for e in with_grid) + " |", "|" + "---|" * len(with_grid)]
        md += ["| " + " | ".join(f"![{e['preset']}]({grids[e['preset']].name})" for e in with_grid) + " |", ""]
    for key, path in figures.items():
        md += [f"## {captions[key]}", "", f"![{captions[key]}]({path.name})", ""]
    md += ["## All runs", "", _md_table(*_run_rows(results)), "", "`*` marks the best learning rate of each preset.", ""]
    md += ["## Notes", "", NOTES, ""]
    atomic_write(out_dir / "report.md", lambda tmp: Path(tmp).write_text("\n".join(md)))

    css = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        ".grids{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}figure{margin:0}"
        "figcaption{font-size:14px;margin-top:4px}img{max-width:100%;image-rendering:pixelated}.note{color:#555;font-size:14px}"
    )
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{css}</style></head><body>", f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(_settings_line(results))}</p>",
        '<h2 id="summary">Summary</h2>', _html_table(*_summary_rows(results)),
        '<h2 id="samples">Samples (each preset at its best learning rate)</h2>', '<div class="grids">',
    ]  # fmt: skip
    for e in with_grid:
        parts.append(
            f'<figure><img src="{_data_uri(grids[e["preset"]])}" alt="samples of {html.escape(e["preset"])}">'
            f"<figcaption>{html.escape(grid_caption(e))}</figcaption></figure>"
        )
    parts.append("</div>")
    for key, path in figures.items():
        parts += [f'<h2 id="{key}">{html.escape(captions[key])}</h2>', f'<img src="{_data_uri(path)}" alt="{html.escape(captions[key])}">']
    parts += ['<h2 id="runs">All runs</h2>', _html_table(*_run_rows(results)), '<p class="note">* marks the best learning rate of each preset.</p>']
    parts += ['<h2 id="notes">Notes</h2>', f'<p class="note">{html.escape(NOTES)}</p>', "</body></html>", ""]
    atomic_write(out_dir / "report.html", lambda tmp: Path(tmp).write_text("\n".join(parts)))
    return {"report.md": out_dir / "report.md", "report.html": out_dir / "report.html", "results.json": out_dir / "results.json", **figures, **grids}


# ---- command line ------------------------------------------------------------------------------


def add_compare_parser(sub) -> None:
    from .diffusion import GaussianDiffusion, RectifiedFlow

    p = sub.add_parser("compare", help="train presets at several learning rates for the same budget and write a report")
    p.add_argument("--presets", required=True, help="comma-separated presets, e.g. unet-seed,dit-seed")
    p.add_argument("--budget", required=True, help="per run: training time (90s, 10m, 1h), images (200k-images) or FLOPs (1e15-flops)")
    p.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in DEFAULT_LRS), help="comma-separated learning rates (default 1e-4,3e-4,1e-3)")
    p.add_argument("--out", required=True, type=Path, help="report directory (created; rerun with the same --out to resume)")
    p.add_argument("--eval-every-frac", type=float, default=0.25, help="evaluate every this fraction of the budget (default 0.25)")
    p.add_argument("--eval-n", type=int, default=1000, help="samples per evaluation (default 1000)")
    p.add_argument("--steps", "--sample-steps", dest="steps", type=int, default=20, help="sampler steps of the evaluation samples (default 20)")
    p.add_argument("--sampler", choices=sorted({*GaussianDiffusion.samplers, *RectifiedFlow.samplers}),
                   help="default: ddim for eps models, euler for flow models")  # fmt: skip
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"classifier-free guidance of the evaluation samples (default {DEFAULT_GUIDANCE:g})")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    p.add_argument("--data-dir", help="directory with the IDX .gz files (default $SIMPLE_DIT_DATA, then the user cache)")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed (default 0)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def cmd_compare(args) -> None:
    results = compare(
        args.presets, args.budget, args.out, lrs=args.lrs, eval_every_frac=args.eval_every_frac, eval_n=args.eval_n,
        steps=args.steps, sampler=args.sampler, guidance=args.guidance, dataset=args.dataset, data_dir=args.data_dir,
        seed=args.seed, device=args.device, precision=args.precision,
    )  # fmt: skip
    for e in results["presets"]:
        b = e["best"] or {}
        print(f"{e['preset']}: best lr {_fmt(e['best_lr'], 'g')}, FID {_fmt(b.get('fid'), '.2f')}, label accuracy {_fmt(b.get('label_accuracy'))}")
    print(f"report: {args.out / 'report.html'}")
