"""Whether two identical training runs train the same weights on a device, and, where they do not,
which of PyTorch's switches makes them. On an H200, two identical fp32 unet-tiny runs parted by
rounding (tests/conftest.py, ``repeatable``) with the UNet's upsampling already free of atomic
additions, while the DiT repeated bit for bit; this names the culprit on the next GPU.

    .venv/bin/python bench/repeatability.py --device cuda [--preset unet-tiny] [--precision fp32] [--steps 12] [--compile]

Each setting trains the run twice with ``simple_dit.train`` (as the test does) and prints the
largest weight difference between the two; on the CPU every setting should print 0.

- as-trained: nothing changed.
- cudnn-deterministic: cuDNN may pick only deterministic convolution algorithms.
- without-cudnn: PyTorch's own CUDA kernels for convolutions and BatchNorm.
- contiguous: the UNet in the contiguous layout instead of channels-last, under which
  PyTorch trains BatchNorm with cuDNN's "persistent" kernels.
- deterministic-algorithms: ``torch.use_deterministic_algorithms(True, warn_only=True)``; the ops
  PyTorch knows to have no deterministic kernel are listed from its warnings.

The last line is one JSON object.
"""

import argparse
import contextlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from simple_dit.bench import run_script
from simple_dit.checkpoint import largest_weight_difference
from simple_dit.config import get_preset
from simple_dit.models.unet import UNetCond
from simple_dit.runtime import count_arg, device_name, parse_device
from simple_dit.train import train


@contextlib.contextmanager
def cudnn_flag(name: str, value: bool):
    before = getattr(torch.backends.cudnn, name)
    setattr(torch.backends.cudnn, name, value)
    try:
        yield
    finally:
        setattr(torch.backends.cudnn, name, before)


@contextlib.contextmanager
def contiguous_unet():
    before = UNetCond.memory_format
    UNetCond.memory_format = torch.contiguous_format
    try:
        yield
    finally:
        UNetCond.memory_format = before


@contextlib.contextmanager
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


SETTINGS = {
    "as-trained": contextlib.nullcontext,
    "cudnn-deterministic": lambda: cudnn_flag("deterministic", True),
    "without-cudnn": lambda: cudnn_flag("enabled", False),
    "contiguous": contiguous_unet,
    "deterministic-algorithms": deterministic_algorithms,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="unet-tiny")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=count_arg(1), default=12)
    ap.add_argument("--batch-size", type=count_arg(1), default=16)
    ap.add_argument("--device")
    ap.add_argument("--compile", action="store_true", help="train with --compile (on a GPU: the step replayed as one CUDA graph)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of: " + ", ".join(SETTINGS))
    args = ap.parse_args()
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or not names:
        ap.error(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")
    dev = parse_device(args.device)
    config = get_preset(args.preset)
    tc = config.train
    tc.max_steps, tc.sample_every, tc.checkpoint_every, tc.eval_every, tc.log_every = args.steps, 0, 0, 0, 4
    tc.precision, tc.batch_size, tc.compile = args.precision, args.batch_size, args.compile
    print(f"{args.preset} ({args.precision}{', compiled' if args.compile else ''}), {args.steps} steps of {args.batch_size}, "
          f"twice per setting, on {device_name(dev)}, torch {torch.__version__}", flush=True)  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with SETTINGS[name]():
                    runs = [Path(tmp, f"{name}-{i}") for i in range(2)]
                    for run in runs:
                        train(config, run, progress=False, device=dev, final_samples=False)
            nondeterministic = sorted({str(w.message).split(" does not have a deterministic")[0]
                                       for w in caught if "does not have a deterministic" in str(w.message)})  # fmt: skip
            results[name] = {"largest_difference": largest_weight_difference(*runs), "seconds": round(time.perf_counter() - start, 1)}
            if nondeterministic:
                results[name]["nondeterministic_ops"] = nondeterministic
            print(f"  {name:25s} largest weight difference {results[name]['largest_difference']:.3g}  "
                  f"({results[name]['seconds']} s for both runs)" + (f"; without a deterministic kernel: {', '.join(nondeterministic)}"
                                                                    if nondeterministic else ""), flush=True)  # fmt: skip
    print(json.dumps({"preset": args.preset, "precision": args.precision, "compiled": args.compile, "steps": args.steps,
                      "batch_size": args.batch_size, "device": device_name(dev), "torch": torch.__version__,
                      "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"), "settings": results}))  # fmt: skip


if __name__ == "__main__":
    run_script(main)
