"""torch.compile vs eager for one training step (the step training runs), measured in one process:
eager, then compiled (its first steps include the compilation), then eager again.

    .venv/bin/python bench/compile_speedup.py [--preset dit-mini] [--batch-size 32] [--device cpu]
"""

import argparse
import time

import torch

from simple_dit import build_model, get_preset
from simple_dit.bench import median_seconds
from simple_dit.diffusion import make_process
from simple_dit.runtime import parse_device, resolve_precision
from simple_dit.train import make_optimizer, train_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dit-mini")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device")
    args = ap.parse_args()
    config = get_preset(args.preset)
    dev = parse_device(args.device)
    precision = resolve_precision(config.train.precision, dev)
    process = make_process(config.diffusion)
    torch.manual_seed(0)
    b, c, s = args.batch_size, config.model.in_channels, config.model.input_size
    x = torch.randn(b, c, s, s, device=dev)
    y = torch.randint(0, config.model.num_classes, (b,), device=dev)

    def images_per_s(model) -> float:
        optimizer = make_optimizer(model, config, dev)

        def step():
            train_step(model, process, optimizer, x, y, precision=precision, grad_clip=config.train.grad_clip)

        return b / median_seconds(step, dev, warmup=3, repeats=args.repeats)

    eager = build_model(config.model).to(dev)
    rate_eager = images_per_s(eager)
    start = time.perf_counter()
    try:
        rate_compiled = images_per_s(torch.compile(build_model(config.model).to(dev)))
        print(f"compile ok, {time.perf_counter() - start:.0f} s including the compilation and warm-up")
    except Exception as e:  # report and go on: eager is the fallback
        rate_compiled = None
        print("compile failed:", type(e).__name__, str(e)[:200])
    rate_eager_again = images_per_s(eager)
    compiled = "failed" if rate_compiled is None else f"{rate_compiled:.1f}"
    print(f"{args.preset} batch {b} ({precision}): eager {rate_eager:.1f} / {rate_eager_again:.1f} images/s, compiled {compiled} images/s")


if __name__ == "__main__":
    main()
