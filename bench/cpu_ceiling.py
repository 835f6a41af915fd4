"""How far a CPU's matrix unit lets dit-seed's bf16 training step go (issue 8, point 4: 5x the
plain fp32 step at batch 128).

    .venv/bin/python bench/cpu_ceiling.py [--batch-size 128] [--repeats 10] [--compile]

Times, on this CPU, the matrix products one training step is made of (forward, gradient of the
input, gradient of the weight, for each of a block's linear layers; fp32 and bf16), and from them
the least time the step's matrix products can take in bf16, against the step time the 5x target
asks for (measured here: the reference step's). Then ours (autocast, as training runs) against a
probe that is not a training mode: the model's weights themselves in bf16, no autocast, so no
casts and a bf16 residual stream (what the casts cost). ``--compile`` adds ours through
torch.compile (compiled in untimed warm-up steps) and splits a profiled compiled step into its
matrix products, inductor's fused kernels (everything else of forward and backward) and the rest
(optimiser, casts of the weights). The last line is one JSON object.
"""

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from simple_dit.bench import interleaved_median_seconds, median_seconds, reference_model, run_script
from simple_dit.config import get_preset
from simple_dit.diffusion import make_process
from simple_dit.models import build_model
from simple_dit.runtime import compile_model, count_arg, device_name, keep_freed_memory
from simple_dit.train import make_optimizer, train_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=count_arg(1), default=128)
    ap.add_argument("--repeats", type=count_arg(1), default=10)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    keep_freed_memory()
    config = get_preset("dit-seed")
    m = config.model
    tokens = args.batch_size * (m.input_size // m.patch_size) ** 2
    d, hidden = m.hidden_size, int(m.hidden_size * m.mlp_ratio)
    layers = {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, hidden), "fc2": (hidden, d)}

    products, bf16_ms = {}, 0.0
    for name, (n_in, n_out) in layers.items():
        for dtype in (torch.float32, torch.bfloat16):
            x, w, g = torch.randn(tokens, n_in, dtype=dtype), torch.randn(n_out, n_in, dtype=dtype), torch.randn(tokens, n_out, dtype=dtype)
            flops = 2 * tokens * n_in * n_out
            for kind, fn in (("forward", lambda: x @ w.t()), ("grad_input", lambda: g @ w), ("grad_weight", lambda: g.t() @ x)):
                ms = 1e3 * median_seconds(fn, torch.device("cpu"), warmup=3, repeats=args.repeats)
                products[f"{name} {kind} {str(dtype)[6:]}"] = {"ms": ms, "tflop_per_s": flops / ms / 1e9}
                if dtype == torch.bfloat16:
                    bf16_ms += ms * m.depth
    for key, row in products.items():
        print(f"{key:>28}: {row['ms']:6.2f} ms  {row['tflop_per_s']:5.2f} TFLOP/s")

    diffusion = make_process(config.diffusion)
    torch.manual_seed(0)
    x0, y = torch.randn(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))
    reference = reference_model(m)
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=config.train.lr)
    ours = build_model(m)
    ours_opt = make_optimizer(ours, config, torch.device("cpu"))
    probe = build_model(m).to(torch.bfloat16)
    probe_opt = torch.optim.AdamW(probe.parameters(), lr=config.train.lr, fused=True)

    def probe_step():
        loss = diffusion.training_loss(lambda x, t, y: probe(x.bfloat16(), t, y), x0, y)
        probe_opt.zero_grad(set_to_none=True)
        loss.backward()
        probe_opt.step()

    step_fns = {
        "reference (fp32)": lambda: train_step(reference, diffusion, reference_opt, x0, y, precision="fp32"),
        "ours (bf16 autocast)": lambda: train_step(ours, diffusion, ours_opt, x0, y, precision="bf16"),
        "probe: bf16 weights, no autocast": probe_step,
    }
    if args.compile:
        compiled = build_model(m)
        compiled_opt = make_optimizer(compiled, config, torch.device("cpu"))
        network = compile_model(compiled, torch.device("cpu"))
        step_fns["ours (bf16 autocast), compiled"] = lambda: train_step(network, diffusion, compiled_opt, x0, y, precision="bf16")
    seconds = interleaved_median_seconds(step_fns, torch.device("cpu"), warmup=2, repeats=max(3, args.repeats // 2))
    target_ms = 1e3 * seconds["reference (fp32)"] / 5
    # Attention's two batched products are left out: under 2% of the step's arithmetic.
    print(f"the step's linear layers in bf16 at the rates above: {bf16_ms:.0f} ms; 5x the reference is a {target_ms:.0f} ms step")
    steps = {name: {"ms": 1e3 * s, "images_per_s": args.batch_size / s, "x_reference": seconds["reference (fp32)"] / s} for name, s in seconds.items()}
    for name, row in steps.items():
        print(f"{name:>34}: {row['ms']:6.0f} ms  {row['images_per_s']:6.1f} images/s  {row['x_reference']:.2f}x reference")
    split = compiled_step_split(step_fns["ours (bf16 autocast), compiled"]) if args.compile else None
    if split:
        print("a profiled compiled step, ms: " + ", ".join(f"{k} {v:.0f}" for k, v in split.items()))
    print(json.dumps({"cpu": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                      "products": products, "linear_bf16_ms": bf16_ms, "target_step_ms": target_ms, "steps": steps,
                      "compiled_step_ms": split}))  # fmt: skip


def compiled_step_split(step) -> dict:
    """One step's CPU time (the mean of two profiled steps, in ms) split into matrix products,
    inductor's generated kernels and the rest."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        step()
    split = {"matrix products": 0.0, "fused kernels": 0.0, "rest": 0.0}
    for event in prof.key_averages():
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            kind = "matrix products"
        elif "CompiledFxGraph" in event.key:
            kind = "fused kernels"
        else:
            kind = "rest"
        split[kind] += event.self_cpu_time_total / 2e3
    return split | {"total": sum(split.values())}


if __name__ == "__main__":
    run_script(main)
