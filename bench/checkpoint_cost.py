"""What a checkpoint costs a comparison at each evaluation point: writing it (the weights, the EMA
weights, AdamW's state and the generators, fsynced) and loading its EMA weights back as the
evaluation does (``Pipeline.from_pretrained``).

    .venv/bin/python bench/checkpoint_cost.py [--preset dit-seed] [--repeats 5] [--dir /tmp]

Medians of ``--repeats``, in seconds, and the file's size; the last line is one JSON object. The
directory decides the disk measured (default: the system's temporary directory).
"""

import argparse
import copy
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from simple_dit.bench import run_script
from simple_dit.checkpoint import CHECKPOINT_NAME, save_checkpoint
from simple_dit.config import get_preset
from simple_dit.errors import UserError
from simple_dit.models import build_model
from simple_dit.runtime import count_arg
from simple_dit.sample import Pipeline
from simple_dit.train import TrainState, make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dit-seed")
    ap.add_argument("--repeats", type=count_arg(1), default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: the temporary directory)")
    args = ap.parse_args()
    if args.dir is not None and not Path(args.dir).is_dir():
        raise UserError(f"--dir {args.dir} is not a directory")
    config = get_preset(args.preset)
    torch.manual_seed(0)
    model = build_model(config.model)
    ema = copy.deepcopy(model)
    optimizer = make_optimizer(model, config, torch.device("cpu"))
    # One step, so that AdamW's state exists and is saved as a run's is.
    x = torch.randn(2, config.model.in_channels, config.model.input_size, config.model.input_size)
    model(x, torch.tensor([1, 2]), torch.tensor([1, 2])).square().mean().backward()
    optimizer.step()
    save_s, load_s = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as run_dir:
        for step in range(args.repeats):
            start = time.perf_counter()
            save_checkpoint(Path(run_dir), config=config, model=model, ema=ema, optimizer=optimizer,
                            train_state=dataclasses.asdict(TrainState(step=step + 1)))  # fmt: skip
            save_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            Pipeline.from_pretrained(run_dir, device="cpu")
            load_s.append(time.perf_counter() - start)
        size_mb = (Path(run_dir) / CHECKPOINT_NAME).stat().st_size / 1e6
    result = {"preset": args.preset, "checkpoint_mb": round(size_mb, 1), "save_s": round(statistics.median(save_s), 3),
              "save_s_range": [round(min(save_s), 3), round(max(save_s), 3)], "load_ema_s": round(statistics.median(load_s), 3),
              "repeats": args.repeats}  # fmt: skip
    print(f"{args.preset}: checkpoint {size_mb:,.0f} MB, written in {result['save_s']} s ({result['save_s_range'][0]}-{result['save_s_range'][1]}), "
          f"its EMA weights loaded in {result['load_ema_s']} s (medians of {args.repeats})")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    run_script(main)
