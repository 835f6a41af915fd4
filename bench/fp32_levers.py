"""Two fp32 levers on one DiT training step, all four combinations timed in one process with
interleaved rounds: attention through scaled_dot_product_attention or explicit batched matmuls,
and PyTorch's default (foreach) AdamW or the fused one.

    .venv/bin/python bench/fp32_levers.py [--preset dit-mini] [--batch-size 32] [--repeats 7]
"""

import argparse
import statistics
import time

import torch

import simple_dit.models.dit as dit
from simple_dit import build_model, get_preset
from simple_dit.diffusion import make_process

sdpa_attention = dit.Attention.forward


def explicit_attention(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
    return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dit-mini")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    config = get_preset(args.preset)
    process = make_process(config.diffusion)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, config.model.in_channels, config.model.input_size, config.model.input_size)
    y = torch.randint(0, config.model.num_classes, (args.batch_size,))

    def variant(attention, fused):
        torch.manual_seed(0)
        model = build_model(config.model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

        def step():
            dit.Attention.forward = attention
            loss = process.training_loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    steps = {
        f"{a_name} attention, {'fused' if fused else 'foreach'} AdamW": variant(attention, fused)
        for a_name, attention in (("SDPA", sdpa_attention), ("explicit", explicit_attention))
        for fused in (False, True)
    }
    times = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(2):  # warm-up
            step()
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    dit.Attention.forward = sdpa_attention
    for name, ts in times.items():
        print(f"{args.preset} batch {args.batch_size}, {name:>32}: {args.batch_size / statistics.median(ts):7.1f} training images/s")


if __name__ == "__main__":
    main()
