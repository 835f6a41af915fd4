"""Training throughput of dit-seed: ours (auto precision), the plain fp32 eager reference, and
diffusers' DiTTransformer2DModel of the same size, timed in one process, rounds interleaved.

    pip install -e .[bench]          # diffusers, bench-only
    .venv/bin/python bench/diffusers_compare.py [--preset dit-seed] [--batch-size 128] [--repeats 3]

Each timed step is forward + epsilon-MSE backward + AdamW on random data (ours: the fused AdamW that
training uses; the other two: PyTorch's default AdamW). Prints one line per path
and, last, one JSON object with the images/s and the ratios ours/reference and ours/diffusers.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from simple_dit import build_model, get_preset
from simple_dit.diffusion import make_process
from simple_dit.runtime import autocast, has_fused_adamw, parse_device, resolve_precision, synchronize


def diffusers_dit(model_config):
    from diffusers import DiTTransformer2DModel

    head_dim = model_config.hidden_size // model_config.num_heads
    return DiTTransformer2DModel(
        num_attention_heads=model_config.num_heads, attention_head_dim=head_dim, in_channels=model_config.in_channels,
        num_layers=model_config.depth, sample_size=model_config.input_size, patch_size=model_config.patch_size,
        num_embeds_ada_norm=model_config.num_classes,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dit-seed")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device")
    args = ap.parse_args()
    config = get_preset(args.preset)
    if config.model.arch != "dit":
        raise SystemExit("bench/diffusers_compare.py: error: --preset must be a DiT preset")
    dev = parse_device(args.device)
    diffusion = make_process(config.diffusion)
    b, c, s = args.batch_size, config.model.in_channels, config.model.input_size
    torch.manual_seed(0)
    x0 = torch.randn(b, c, s, s, device=dev)
    y = torch.randint(0, config.model.num_classes, (b,), device=dev)
    t = torch.randint(0, diffusion.num_timesteps, (b,), device=dev)
    noise = torch.randn_like(x0)

    def step_fn(model, precision, call, fused=False):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

        def step():
            with autocast(dev, precision):
                loss = F.mse_loss(call(model).float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    ours = build_model(config.model).to(dev)
    reference = build_model(config.model).to(dev)
    theirs = diffusers_dit(config.model).to(dev)
    ours_call = lambda m: m(x0, t, y)  # noqa: E731
    theirs_call = lambda m: m(x0, timestep=t, class_labels=y).sample  # noqa: E731
    paths = {
        "ours": step_fn(ours, resolve_precision("auto", dev), ours_call, fused=has_fused_adamw(dev)),
        "reference (fp32 eager)": step_fn(reference, "fp32", ours_call),
        "diffusers DiTTransformer2DModel": step_fn(theirs, "fp32", theirs_call),
    }
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in zip(paths, (ours, reference, theirs))}
    times = {name: [] for name in paths}
    for step in paths.values():
        step()  # warm-up
    for _ in range(args.repeats):
        for name, step in paths.items():
            synchronize(dev)
            start = time.perf_counter()
            step()
            synchronize(dev)
            times[name].append(time.perf_counter() - start)
    rate = {name: b / statistics.median(ts) for name, ts in times.items()}
    for name in paths:
        print(f"{name:>32}: {rate[name]:7.2f} images/s  ({params[name] / 1e6:.2f}M parameters)")
    ours_rate, ref_rate, diff_rate = rate.values()
    print(json.dumps({
        "preset": args.preset, "batch_size": b, "device": str(dev), "threads": torch.get_num_threads(),
        "precision": resolve_precision("auto", dev), "ours_images_per_s": ours_rate, "reference_images_per_s": ref_rate,
        "diffusers_images_per_s": diff_rate, "ours_over_reference": ours_rate / ref_rate,
        "ours_over_diffusers": ours_rate / diff_rate,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
