"""Two fp32 levers on one DiT training step, all four combinations timed in one process with
interleaved rounds: attention through scaled_dot_product_attention or explicit batched matmuls,
and PyTorch's default (foreach) AdamW or the fused one.

    .venv/bin/python bench/fp32_levers.py [--preset dit-mini] [--batch-size 32] [--repeats 7] [--device cpu]

Each variant times ``simple_dit.train.train_step`` in fp32 (the step training runs).
"""

import argparse

import torch
import torch.nn.functional as F

import simple_dit.models.dit as dit
from simple_dit import build_model, get_preset
from simple_dit.bench import interleaved_median_seconds, run_script
from simple_dit.config import DiTConfig
from simple_dit.diffusion import make_process
from simple_dit.runtime import count_arg, parse_device
from simple_dit.train import train_step

ours = dit.Attention.attend  # on a GPU the fused kernel, on a CPU the explicit ops
sdpa_attention = staticmethod(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
explicit_attention = staticmethod(dit.plain_attention)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dit-mini")
    ap.add_argument("--batch-size", type=count_arg(1), default=32)
    ap.add_argument("--repeats", type=count_arg(1), default=7)
    ap.add_argument("--device")
    args = ap.parse_args()
    config = get_preset(args.preset)
    if not isinstance(config.model, DiTConfig):
        ap.error(f"--preset {args.preset}: the attention levers are a DiT's; choose a DiT preset")
    dev = parse_device(args.device)
    process = make_process(config.diffusion)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, config.model.in_channels, config.model.input_size, config.model.input_size, device=dev)
    y = torch.randint(0, config.model.num_classes, (args.batch_size,), device=dev)

    def variant(attention, fused):
        torch.manual_seed(0)
        model = build_model(config.model).to(dev)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay, fused=fused)

        def step():
            dit.Attention.attend = attention
            train_step(model, process, optimizer, x, y, precision="fp32", grad_clip=config.train.grad_clip)

        return step

    steps = {
        f"{a_name} attention, {'fused' if fused else 'foreach'} AdamW": variant(attention, fused)
        for a_name, attention in (("SDPA", sdpa_attention), ("explicit", explicit_attention))
        for fused in (False, True)
    }
    seconds = interleaved_median_seconds(steps, dev, warmup=2, repeats=args.repeats)
    dit.Attention.attend = ours
    for name, s in seconds.items():
        print(f"{args.preset} batch {args.batch_size}, {name:>32}: {args.batch_size / s:7.1f} training images/s")


if __name__ == "__main__":
    run_script(main)
