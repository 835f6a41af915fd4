"""Training throughput of dit-seed: ours (auto precision), the plain fp32 eager reference, and
diffusers' DiTTransformer2DModel of the same size, timed in one process, rounds interleaved.

    pip install -e .[bench]          # diffusers, bench-only
    .venv/bin/python bench/diffusers_compare.py [--preset dit-seed] [--batch-size 128] [--repeats 3] [--device cuda]

Each timed step is ``simple_dit.train.train_step`` (the step training runs: the preset's objective,
forward, backward, gradient norm, AdamW) on random data; ours steps the fused AdamW that training
uses, the other two PyTorch's default AdamW, in fp32. Prints one line per path and, last, one JSON
object with the images/s and the ratios ours/reference and ours/diffusers.
"""

import argparse
import json

import torch

from simple_dit import build_model, get_preset
from simple_dit.bench import interleaved_median_seconds, run_script
from simple_dit.diffusion import make_process
from simple_dit.models import count_parameters
from simple_dit.runtime import count_arg, parse_device, resolve_precision
from simple_dit.train import make_optimizer, train_step


class DiffusersDiT(torch.nn.Module):
    """diffusers' DiTTransformer2DModel of a DiT preset's size, called as ``model(x_t, t, y)``."""

    def __init__(self, model_config):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.inner = DiTTransformer2DModel(
            num_attention_heads=model_config.num_heads, attention_head_dim=model_config.hidden_size // model_config.num_heads,
            in_channels=model_config.in_channels, num_layers=model_config.depth, sample_size=model_config.input_size,
            patch_size=model_config.patch_size, num_embeds_ada_norm=model_config.num_classes,
        )  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.inner(x, timestep=t, class_labels=y).sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dit-seed")
    ap.add_argument("--batch-size", type=count_arg(1), default=128)
    ap.add_argument("--repeats", type=count_arg(1), default=3)
    ap.add_argument("--device")
    args = ap.parse_args()
    config = get_preset(args.preset)
    if config.model.arch != "dit":
        raise SystemExit("bench/diffusers_compare.py: error: --preset must be a DiT preset")
    dev = parse_device(args.device)
    diffusion = make_process(config.diffusion)
    precision = resolve_precision("auto", dev)
    b, c, s = args.batch_size, config.model.in_channels, config.model.input_size
    torch.manual_seed(0)
    x0 = torch.randn(b, c, s, s, device=dev)
    y = torch.randint(0, config.model.num_classes, (b,), device=dev)

    def step_fn(model, precision, plain_adamw=True):
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr) if plain_adamw else make_optimizer(model, config, dev)
        return lambda: train_step(model, diffusion, optimizer, x0, y, precision=precision)

    ours, reference, theirs = build_model(config.model).to(dev), build_model(config.model).to(dev), DiffusersDiT(config.model).to(dev)
    paths = {
        "ours": step_fn(ours, precision, plain_adamw=False),
        "reference (fp32 eager)": step_fn(reference, "fp32"),
        "diffusers DiTTransformer2DModel": step_fn(theirs, "fp32"),
    }
    params = {name: count_parameters(m) for name, m in zip(paths, (ours, reference, theirs))}
    rate = {name: b / seconds for name, seconds in interleaved_median_seconds(paths, dev, warmup=1, repeats=args.repeats).items()}
    for name in paths:
        print(f"{name:>32}: {rate[name]:7.2f} images/s  ({params[name] / 1e6:.2f}M parameters)")
    ours_rate, ref_rate, diff_rate = rate.values()
    print(json.dumps({
        "preset": args.preset, "batch_size": b, "device": str(dev), "threads": torch.get_num_threads(),
        "precision": precision, "ours_images_per_s": ours_rate, "reference_images_per_s": ref_rate,
        "diffusers_images_per_s": diff_rate, "ours_over_reference": ours_rate / ref_rate,
        "ours_over_diffusers": ours_rate / diff_rate,
    }))  # fmt: skip


if __name__ == "__main__":
    run_script(main)
