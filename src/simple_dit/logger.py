"""Where a run's numbers and pictures go: metrics.jsonl always, TensorBoard when it is installed.

metrics.jsonl is the record of truth (strict JSON, one object per line, non-finite numbers written
as null); the other sinks are views of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .io import atomic_write, dumps_strict

METRICS_NAME = "metrics.jsonl"


class RunLogger:
    def __init__(self, run_dir: Path, *, enabled: bool = True):
        self.enabled = enabled
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

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image (a sample grid) at ``step``."""
        if self.enabled and self.tensorboard is not None:
            arr = np.asarray(image.convert("RGB"))
            self.tensorboard.add_image(tag, arr, step, dataformats="HWC")

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


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
