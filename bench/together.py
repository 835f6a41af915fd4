"""K runs of one preset trained one after another against the same K trained together as one
batched network (``compare --runs-together K``), timed interleaved in one process so that the
ratio is fair on a machine whose speed drifts. Both sides do the same work per round: one
optimiser step of each of the K models, draws included.

    .venv/bin/python bench/together.py --preset dit-mini --runs 3 --repeats 5 [--device cuda] [--batch-size B]

Prints images/s (of all K runs) for both and their ratio; the last line is one JSON object.
"""

import argparse
import json

import torch

from simple_dit.bench import interleaved_median_seconds, run_script, step_together
from simple_dit.config import get_preset
from simple_dit.diffusion import make_process
from simple_dit.models import build_model
from simple_dit.runtime import count_arg, device_name, keep_freed_memory, parse_device, resolve_precision
from simple_dit.train import make_optimizer, train_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dit-mini")
    ap.add_argument("--runs", type=count_arg(1), default=3)
    ap.add_argument("--batch-size", type=count_arg(1))
    ap.add_argument("--repeats", type=count_arg(1), default=5)
    ap.add_argument("--device")
    args = ap.parse_args()
    keep_freed_memory()
    config = get_preset(args.preset)
    device = parse_device(args.device)
    precision = resolve_precision("auto", device)
    batch = args.batch_size or config.train.batch_size
    diffusion = make_process(config.diffusion)
    torch.manual_seed(0)
    size = config.model.input_size
    x = torch.randn(batch, config.model.in_channels, size, size, device=device)
    y = torch.randint(0, config.model.num_classes, (batch,), device=device)

    alone_models = [build_model(config.model).to(device).train() for _ in range(args.runs)]
    alone_optimizers = [make_optimizer(m, config, device) for m in alone_models]

    def one_after_another():
        for model, optimizer in zip(alone_models, alone_optimizers):
            train_step(model, diffusion, optimizer, x, y, precision=precision, grad_clip=config.train.grad_clip)

    together = step_together(build_model(config.model).to(device).train(), config, diffusion, x, y, args.runs, precision=precision, compile=False)

    seconds = interleaved_median_seconds({"one after another": one_after_another, "together": together}, device, warmup=2, repeats=args.repeats)
    images = args.runs * batch
    result = {
        "preset": args.preset, "runs": args.runs, "batch_size": batch, "precision": precision, "device": device_name(device),
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "one_after_another_images_per_s": images / seconds["one after another"], "together_images_per_s": images / seconds["together"],
    }  # fmt: skip
    result["together_over_one_after_another"] = seconds["one after another"] / seconds["together"]
    for name, s in seconds.items():
        print(f"{name:>18}: {images / s:10.1f} images/s")
    print(f"{'ratio':>18}: {result['together_over_one_after_another']:10.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    run_script(main)
