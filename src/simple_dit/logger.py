"""Where a run's numbers and pictures go: metrics.jsonl always, TensorBoard when it is installed,
Weights & Biases when asked for (``train --wandb``).

metrics.jsonl is the record of truth (strict JSON, one object per line, non-finite numbers written
as null); the other sinks are views of it.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .io import atomic_write, dumps_strict, write_json

METRICS_NAME = "metrics.jsonl"
WANDB_RUN_NAME = "wandb-run.json"  # the W&B run id, so that a resumed run continues the same W&B run
DEFAULT_WANDB_PROJECT = "simple-dit"


@dataclass
class WandbOptions:
    """Mirror a run to Weights & Biases: into ``project``, in ``group`` (compare's runs share one)."""

    project: str = DEFAULT_WANDB_PROJECT
    group: str | None = None


class RunLogger:
    def __init__(self, run_dir: Path, *, enabled: bool = True, config: dict | None = None, wandb: WandbOptions | str | None = None):
        """``config`` (the run's recipe) goes to W&B; ``wandb`` is a project name or options, None for no W&B."""
        self.enabled = enabled
        # W&B first: a W&B that cannot start is a user error, raised before any file is opened.
        self.wandb = _wandb_run(Path(run_dir), config or {}, wandb) if enabled and wandb else None
        self.metrics_file = open(Path(run_dir) / METRICS_NAME, "a") if enabled else None
        self.tensorboard = _tensorboard_writer(Path(run_dir) / "tb") if enabled else None

    def log(self, record: dict, *, scalars: dict[str, str] | None = None) -> None:
        """Append ``record`` (which holds "step") to metrics.jsonl; ``scalars`` maps record keys
        to TensorBoard tags."""
        if not self.enabled:
            return
        self.metrics_file.write(dumps_strict(record) + "\n")
        self.metrics_file.flush()
        if self.tensorboard is not None:
            for key, tag in (scalars or {}).items():
                if record.get(key) is not None:
                    self.tensorboard.add_scalar(tag, record[key], record["step"])
        if self.wandb is not None:
            values = {tag: record[key] for key, tag in (scalars or {}).items() if record.get(key) is not None}
            if values:
                self.wandb.log(values | {"step": record["step"]})

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image (a sample grid) at ``step``."""
        if not self.enabled:
            return
        if self.tensorboard is not None:
            arr = np.asarray(image.convert("RGB"))
            self.tensorboard.add_image(tag, arr, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image.convert("RGB")), "step": step})

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the records a killed run logged after its last checkpoint: they are about to be redone."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            break  # a torn or garbled line: everything after it is redone
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional at run time; metrics.jsonl always has everything
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _wandb_run(run_dir: Path, config: dict, options: WandbOptions | str):
    """Start (or, for a run that has a W&B id in ``run_dir``, continue) the run's W&B run.

    Every value is logged with its training step as "step", W&B's x-axis for all of them; steps
    that a resumed run redoes (those after the last checkpoint of a killed run) are logged again
    with the same values, since resuming is exact.
    """
    from .extras import require

    wandb = require("wandb", "wandb", "--wandb")
    options = WandbOptions(project=options) if isinstance(options, str) else options
    id_file = run_dir / WANDB_RUN_NAME
    run_id = _read_wandb_id(id_file) or secrets.token_hex(4)
    write_json(id_file, {"id": run_id, "project": options.project})
    try:
        run = wandb.init(
            project=options.project, group=options.group, name=run_dir.name, id=run_id, resume="allow", config=config,
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
        )  # fmt: skip
        run.config.update(config, allow_val_change=True)  # a resumed run's new stopping rule
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
    except Exception as e:  # no API key, no network in online mode, a bad project name, ...
        message = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--wandb: cannot start a W&B run ({message}); run `wandb login`, or set WANDB_MODE=offline and `wandb sync` later") from None
    return run


def _read_wandb_id(path: Path) -> str | None:
    """The W&B run id recorded in ``path``; None when there is none (or it is damaged: a new W&B
    run is better than no run)."""
    try:
        run_id = json.loads(path.read_text())["id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run_id if isinstance(run_id, str) and run_id.isalnum() else None
