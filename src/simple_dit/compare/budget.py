"""The budget of a comparison and the evaluation schedule of one run: parsing ``--budget``,
``--lrs``, ``--presets``, ``--seeds``, ``--objective``, ``--guidances`` and ``--eval-every-frac``,
run directory names, and the evaluation points (``Target``) a budget turns into for a preset of a
given batch size and cost per image."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from ..errors import UserError
from ..runtime import MAX_COUNT, check_seed

DEFAULT_LRS = (1e-4, 3e-4, 1e-3)

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
    if kind == "seconds" and value < 1:
        raise UserError(f"budget {raw!r} is less than a second of training")
    return Budget(kind, value)


def _parse_list(text, flag: str, convert, expected: str) -> list:
    """A comma-separated ``text`` (or a sequence, or one value) converted item by item; a
    ``UserError`` naming ``flag`` for an empty or malformed list or a repeated value."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else [text]
    try:
        if any(isinstance(p, bool) or p is None or (isinstance(p, str) and not p) for p in parts):  # True is not a learning rate
            raise ValueError
        values = [convert(p) for p in parts]
    except (ValueError, TypeError, OverflowError):
        raise UserError(f"malformed {flag} {text!r}: expected {expected}") from None
    if not values:
        raise UserError(f"{flag} is empty: expected {expected}")
    shown = [format(v, "g") if isinstance(v, float) else str(v) for v in values]
    if len(set(shown)) != len(shown):
        raise UserError(f"{flag} repeats a value: {','.join(shown)}")
    return values


def parse_lrs(text: str | Sequence[float]) -> list[float]:
    lrs = _parse_list(text, "--lrs", float, "comma-separated learning rates, e.g. 1e-4,3e-4,1e-3")
    for lr in lrs:
        if not math.isfinite(lr) or lr <= 0:
            raise UserError(f"learning rate {lr:g} in --lrs must be positive and finite")
    return lrs


def parse_seeds(text: str | int | Sequence[int], flag: str = "--seeds") -> list[int]:
    """``0,1,2`` (or one seed): training and sampling seeds, each its own run."""

    def seed(v) -> int:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError
        return check_seed(int(v), f"each seed in {flag}")

    return _parse_list(text, flag, seed, "comma-separated non-negative integers, e.g. 0,1,2")


def parse_guidances(text: str | float | Sequence[float], flag: str = "--guidances") -> list[float]:
    """``1,1.5,2,3,4`` (or one value): classifier-free guidance scales, each finite and >= 0."""
    values = _parse_list(text, flag, float, "comma-separated guidance scales, e.g. 1,1.5,2,3,4")
    from ..diffusion import check_guidance

    return [check_guidance(g, f"each guidance in {flag}") for g in values]


def parse_objectives(text: str | Sequence[str] | None) -> list[str] | None:
    """``eps,flow``: the training objectives that override each preset's own (None: its own)."""
    from ..diffusion import OBJECTIVES

    if text is None:
        return None
    values = _parse_list(text, "--objective", str.strip, f"comma-separated objectives from {', '.join(OBJECTIVES)}")
    for name in values:
        if name not in OBJECTIVES:
            raise UserError(f"unknown objective {name!r} in --objective; choose from: {', '.join(OBJECTIVES)}")
    return values


def parse_presets(text: str | Sequence[str]) -> list[str]:
    from ..config import PRESETS

    if not isinstance(text, (str, list, tuple)):
        raise UserError(f"--presets takes comma-separated preset names or a list of them, e.g. unet-seed,dit-seed; got {text!r}")
    names = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(p).strip() for p in text]
    if not names or any(not n for n in names):
        raise UserError(f"malformed --presets {text!r}: expected comma-separated preset names, e.g. unet-seed,dit-seed")
    for name in names:
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    if len(set(names)) != len(names):
        raise UserError(f"--presets repeats a preset: {','.join(names)}")
    return names


MIN_EVAL_EVERY_FRAC = 1e-3  # each evaluation samples and scores --eval-n images: more than 1000 a run is never meant (1e-9 would plan a billion)


def eval_fractions(every: float) -> list[float]:
    """Evaluation points as fractions of the budget: every 0.25 -> 0.25, 0.5, 0.75, 1."""
    if not (isinstance(every, (int, float)) and not isinstance(every, bool) and math.isfinite(every) and MIN_EVAL_EVERY_FRAC <= every <= 1):
        raise UserError(f"--eval-every-frac must be in [{MIN_EVAL_EVERY_FRAC:g}, 1] (at most {round(1 / MIN_EVAL_EVERY_FRAC)} evaluations per run), got {every}")
    # A step that lands within a millionth of the end is the end: 0.3333333 made points at 0.9999999 and 1.
    n = math.ceil(1 / every - 1e-6)
    return [round(k * every, 12) for k in range(1, n)] + [1.0]


def _lr_name(lr: float) -> str:
    return f"{lr:g}"


def run_name(preset: str, lr: float, seed: int = 0, objective: str | None = None) -> str:
    """``<preset>[_<objective>]_lr<lr>[_seed<seed>]``: the objective only where it overrides the
    preset's own, the seed only where it is not 0 (so a single-seed comparison keeps the names
    of earlier versions)."""
    return f"{preset}{'_' + objective if objective else ''}_lr{_lr_name(lr)}{f'_seed{seed}' if seed else ''}"


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

    def describe(self) -> str:
        return f"{int(self.value)} steps" if self.kind == "steps" else f"{self.value:.1f} s"

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
    if round(images / batch_size) > MAX_COUNT:
        raise UserError(f"budget {budget} is {_compact(images / batch_size)} steps at batch {batch_size}, more than a run can take ({MAX_COUNT:,})")
    if round(images / batch_size) < 1:  # a run would train one step all the same, and be reported at this budget
        raise UserError(f"budget {budget} is {images / batch_size:.2g} steps at batch {batch_size}, less than one step of training")
    targets: list[Target] = []
    for f in fractions:
        steps = max(1, round(f * images / batch_size))
        if targets and steps <= targets[-1].value:
            targets[-1] = Target(targets[-1].point, f, "steps", targets[-1].value)  # the later fraction wins
            continue
        targets.append(Target(len(targets) + 1, f, "steps", steps))
    return targets
