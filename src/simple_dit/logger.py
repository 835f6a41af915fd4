"""Where a run's numbers and pictures go: metrics.jsonl always, TensorBoard when it is installed,
Weights & Biases when asked for (``train --wandb``).

metrics.jsonl is the record of truth (strict JSON, one object per line, non-finite numbers written
as null); the other sinks are views of it.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .io import atomic_write, dumps_strict, loads_strict, write_json

METRICS_NAME = "metrics.jsonl"
WANDB_RUN_NAME = "wandb-run.json"  # the W&B run id, so that a resumed run continues the same W&B run
DEFAULT_WANDB_PROJECT = "simple-dit"


@dataclass
class WandbOptions:
    """Mirror a run to Weights & Biases: into ``project``, in ``group`` (compare's runs share one)."""

    project: str = DEFAULT_WANDB_PROJECT
    group: str | None = None

    def __post_init__(self):  # refused before anything is written, not by W&B once a run has started
        if not isinstance(self.project, str) or not self.project.strip():
            raise UserError(f"--wandb takes a W&B project name, got {self.project!r}")


class RunLogger:
    def __init__(self, run_dir: Path, *, enabled: bool = True, config: dict | None = None, wandb: WandbOptions | str | None = None):
        """``config`` (the run's recipe) goes to W&B; ``wandb`` is a project name or options, None for no W&B."""
        self.enabled = enabled
        # W&B first: a W&B that cannot start is a user error, raised before any file is opened.
        self.wandb = WandbSink(Path(run_dir), config or {}, wandb) if enabled and wandb else None
        self.metrics_path = Path(run_dir) / METRICS_NAME
        self.metrics_file = None  # opened by the first record: train.record_start may rewrite the file until then
        self.tensorboard = _tensorboard_writer(Path(run_dir) / "tb") if enabled else None

    def log(self, record: dict, *, scalars: dict[str, str] | None = None) -> None:
        """Append ``record`` (which holds "step") to metrics.jsonl; ``scalars`` maps record keys
        to TensorBoard tags."""
        if not self.enabled:
            return
        if self.metrics_file is None:
            self.metrics_file = open(self.metrics_path, "a")
        self.metrics_file.write(dumps_strict(record) + "\n")
        self.metrics_file.flush()
        if self.tensorboard is not None:
            for key, tag in (scalars or {}).items():
                if record.get(key) is not None:
                    self.tensorboard.add_scalar(tag, record[key], record["step"])
        if self.wandb is not None:
            self.wandb.log({tag: record[key] for key, tag in (scalars or {}).items() if record.get(key) is not None}, record["step"])

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image (a sample grid) at ``step``."""
        if not self.enabled:
            return
        if self.tensorboard is not None:
            arr = np.asarray(image.convert("RGB"))
            self.tensorboard.add_image(tag, arr, step, dataformats="HWC")
        if self.wandb is not None:
            self.wandb.image(tag, image, step)

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.close()


def is_eval_record(record: dict) -> bool:
    """A quality evaluation's record in metrics.jsonl (``train --eval-every``), as against a
    training window's (which has "loss")."""
    return any(key.startswith("eval_") for key in record)


def truncate_metrics(run_dir: Path, step: int, *, partial_window: bool = False) -> None:
    """Drop the records a killed run logged after its last checkpoint (they are about to be redone),
    with ``partial_window`` the training record of step ``step`` too (a stopped run's last, partial
    logging window, which the resumed run completes), the compile time logged at step ``step`` (by
    an attempt killed after compiling: the resumed run compiles anew and logs its own), and lines
    that are not records (torn or garbled): the readable ones around them stay."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = loads_strict(line)  # metrics.jsonl stays strict JSON: a hand-written NaN goes too
            redone = (partial_window and "loss" in record) or "compile_seconds" in record
            if record["step"] < step or (record["step"] == step and not redone):
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional at run time; metrics.jsonl always has everything
        return None
    return SummaryWriter(log_dir=str(log_dir))


class WandbSink:
    """The W&B run of a run directory, started (or, when ``run_dir`` holds a W&B id, continued)
    on creation and finished by ``close``. RunLogger uses one; compare uses one of its own for the
    evaluations it runs between training segments.

    Every value is logged with its training step as "step", W&B's x-axis for all of them; steps
    that a resumed run redoes (those after the last checkpoint of a killed run) are logged again,
    with the same values, since resuming is exact.
    """

    def __init__(self, run_dir: Path, config: dict, options: WandbOptions | str):
        self.run = _wandb_run(Path(run_dir), config, options)

    def log(self, values: dict, step: int) -> None:
        if values:
            self.run.log(values | {"step": step})

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image (a sample grid) at ``step``."""
        import wandb

        self.run.log({tag: wandb.Image(image.convert("RGB")), "step": step})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self) -> "WandbSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wandb_run(run_dir: Path, config: dict, options: WandbOptions | str):
    from .extras import require

    wandb = require("wandb", "wandb", "--wandb")
    options = WandbOptions(project=options) if isinstance(options, str) else options
    id_file = run_dir / WANDB_RUN_NAME
    previous = _read_wandb_record(id_file)
    run_id = previous.get("id") or secrets.token_hex(4)
    record = {"id": run_id, "project": options.project}
    write_json(id_file, record)  # before starting: a run that dies while W&B starts keeps its id
    started = previous.get("started")
    if isinstance(started, (int, float)) and int(time.time()) == int(started):
        # W&B names a run's local directory after the second it starts in: a second start within
        # the same second (compare's training segments and evaluations) would overwrite the first.
        time.sleep(1.01 - time.time() % 1)
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
    write_json(id_file, record | {"started": time.time()})
    return run


def _read_wandb_record(path: Path) -> dict:
    """What ``path`` records of the run's W&B run: its "id" (alphanumeric) and when it last
    "started"; nothing when there is no such file or it is damaged (a new W&B run is better than
    no run)."""
    try:
        record = json.loads(path.read_text())
        if not (isinstance(record, dict) and isinstance(record["id"], str) and record["id"].isalnum()):
            return {}
    except (OSError, ValueError, KeyError):
        return {}
    return record
