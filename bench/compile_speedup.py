"""torch.compile vs eager for one training step (the step training runs, ``train.make_step``),
measured in one process: eager, then compiled (compiled before its timing), then eager again.

    .venv/bin/python bench/compile_speedup.py [--preset dit-mini] [--batch-size 32] [--device cpu]
"""

import argparse
import time

import torch

from simple_dit import build_model, get_preset
from simple_dit.bench import median_seconds, run_script
from simple_dit.diffusion import make_process
from simple_dit.runtime import count_arg, parse_device
from simple_dit.train import make_optimizer, make_step, training_precision


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dit-mini")
    ap.add_argument("--batch-size", type=count_arg(1), default=32)
    ap.add_argument("--repeats", type=count_arg(1), default=10)
    ap.add_argument("--device")
    args = ap.parse_args()
    config = get_preset(args.preset)
    dev = parse_device(args.device)
    precision = training_precision(config.train.precision, dev)
    process = make_process(config.diffusion).ready_for(dev)
    torch.manual_seed(0)
    b, c, s = args.batch_size, config.model.in_channels, config.model.input_size
    x = torch.randn(b, c, s, s, device=dev)
    y = torch.randint(0, config.model.num_classes, (b,), device=dev)

    def images_per_s(model, compile: bool) -> float:
        """Through ``train.make_step``: the step training takes, with --compile as training
        compiles it (on a GPU, captured as one CUDA graph), compiled and warmed up before the timing."""
        optimizer = make_optimizer(model, config, dev)
        step, _ = make_step(model, model, process, optimizer, x, y, precision=precision, grad_clip=config.train.grad_clip,
                            compile=compile, capture=compile and dev.type == "cuda")  # fmt: skip
        return b / median_seconds(lambda: step(x, y), dev, warmup=3, repeats=args.repeats)

    eager = build_model(config.model).to(dev)
    rate_eager = images_per_s(eager, compile=False)
    start = time.perf_counter()
    rate_compiled = images_per_s(build_model(config.model).to(dev), compile=True)  # where the compiler fails, one line says so
    print(f"compiled, {time.perf_counter() - start:.0f} s including the compilation and warm-up")
    rate_eager_again = images_per_s(eager, compile=False)
    print(f"{args.preset} batch {b} ({precision}): eager {rate_eager:.1f} / {rate_eager_again:.1f} images/s, compiled {rate_compiled:.1f} images/s")


if __name__ == "__main__":
    run_script(main)
