"""Does bf16 training lose quality? Train one preset twice, fp32 and bf16 autocast, same seed and
steps, and compare the loss on held-out test images.

    .venv/bin/python bench/precision_loss.py [--preset dit-tiny] [--steps 300] [--n 2000] [--device cpu]

Both runs are ordinary `simple_dit.train` runs (under a temporary directory). The validation
loss is the training objective on the first n test images with the same timesteps and noise for
both models (fixed seed), computed in fp32 from the raw (not EMA) weights. Prints one line per run
and, last, one JSON object with both losses and their relative difference (the target is < 2%).
"""

import argparse
import json
import tempfile
import time

import torch

from simple_dit import build_model, get_preset
from simple_dit.bench import run_script
from simple_dit.checkpoint import load_weights
from simple_dit.data import load_dataset
from simple_dit.diffusion import make_process
from simple_dit.runtime import count_arg, parse_device
from simple_dit.train import train


@torch.no_grad()
def validation_loss(config, weights, dataset, n: int, device, batch_size: int = 500, seed: int = 1234) -> float:
    model = build_model(config.model).to(device).eval()
    model.load_state_dict(weights)
    process = make_process(config.diffusion)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the objective draws t and noise from the global RNG: same draws for every model
    total = 0.0
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(n, start + batch_size))
        x0, y = dataset.batch(index)
        total += process.training_loss(model, x0.to(device), y.to(device)).item() * len(index)
    torch.random.set_rng_state(generator_state)
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dit-tiny")
    ap.add_argument("--steps", type=count_arg(1), default=300)
    ap.add_argument("--batch-size", type=count_arg(1))
    ap.add_argument("--n", type=count_arg(1), default=2000, help="test images in the validation loss")
    ap.add_argument("--device")
    args = ap.parse_args()
    device = parse_device(args.device)
    test = load_dataset(get_preset(args.preset).train.dataset, "test")
    losses, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            config = get_preset(args.preset)
            config.train.precision = precision
            config.train.max_steps = args.steps
            config.train.sample_every = config.train.checkpoint_every = args.steps
            if args.batch_size:
                config.train.batch_size = args.batch_size
            start = time.perf_counter()
            train(config, f"{tmp}/{precision}", device=device, progress=False, final_samples=False)
            seconds[precision] = time.perf_counter() - start
            saved_config, weights, _ = load_weights(f"{tmp}/{precision}", use_ema=False)
            losses[precision] = validation_loss(saved_config, weights, test, args.n, device)
            print(f"{precision}: validation loss {losses[precision]:.5f} after {args.steps} steps ({seconds[precision]:.0f} s)", flush=True)
    print(json.dumps({
        "preset": args.preset, "steps": args.steps, "device": str(device), "n": args.n,
        "fp32_val_loss": losses["fp32"], "bf16_val_loss": losses["bf16"],
        "relative_difference": losses["bf16"] / losses["fp32"] - 1, "fp32_seconds": seconds["fp32"], "bf16_seconds": seconds["bf16"],
    }))  # fmt: skip


if __name__ == "__main__":
    run_script(main)
