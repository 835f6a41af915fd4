"""Where one training step's time goes, for the step training takes (``make_step``: with
``--compile``, the compiled network and, on a GPU, the forward and backward passes replayed as one
CUDA graph, the optimiser eager after it). Issue 8's GPU targets were missed by 1-16% with that
step; this says which part to work on before trying a lever.

    .venv/bin/python bench/step_parts.py --preset dit-mini [--batch-size 32] [--compile] [--device cuda]
        [--inductor combo_kernels=True ...]

Times, medians of ``--repeats`` timings after warm-up (on a GPU each of 10 calls back to back, as
``simple-dit bench`` times them): the whole step; its forward and backward (the graph's replay, or
the eager passes); the optimiser step alone. Then one profiled step: how many
kernels it launches on the GPU (on a CPU, operators) and their summed time by kind (matrix
products, attention, inductor's fused kernels, convolutions, the optimiser, copies, the rest) and
the kernels that took longest, by name, and the longest of every kind. On a CPU the profile
counts every operator, nested ones too, and the profiler's own cost inflates their times: read it
for proportions. The last line is one JSON object.

``--inductor NAME=VALUE`` sets one of ``torch._inductor.config``'s settings before compiling, to
try a compiler lever without a code change (e.g. ``combo_kernels=True``, which launches
independent small kernels as one: dit-mini's step was 426 launches of ~2.5 us each on an H200).
"""

import argparse
import ast
import json
import time
from collections import Counter

import torch

from simple_dit.bench import calls_per_timing, median_seconds, run_script
from simple_dit.config import get_preset
from simple_dit.diffusion import make_process
from simple_dit.models import build_model
from simple_dit.runtime import autocast, count_arg, device_name, keep_freed_memory, parse_device
from simple_dit.train import CapturedStep, make_optimizer, make_step, training_precision

# Substrings of kernel (or operator) names; the first kind that matches wins. Attention comes first:
# the flash and memory-efficient kernels carry CUTLASS's name, cuDNN's fused attention "fprop".
# Inductor names its fused kernels after the ops they fuse ("triton_poi_fused_convolution_silu"):
# they are their own kind, before the products' and convolutions' names can match them.
KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "scaled_dot_product")),
    ("fused", ("triton_", "cpp_fused")),
    ("convolution", ("conv", "cudnn", "fprop", "dgrad", "wgrad", "winograd")),
    ("matmul", ("gemm", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy", ("memcpy", "memset", "aten::copy_")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lowered for k in keys)), "other")


def profile_step(run_step, x, y, device: torch.device, steps: int = 3, top: int = 15) -> dict:
    """A step's GPU kernels (on a CPU, its operators) counted, and their own time (not their
    children's) summed by kind, in milliseconds; means over ``steps`` profiled steps, after one
    step that warms the profiler up. Also the ``top`` kernels by time, by name: a kind's total
    does not say which fused kernel to shrink (inductor names each after the ops it fuses)."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    for profiled in (1, steps):  # the first profile only warms the profiler up
        with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
            for _ in range(profiled):
                run_step(x, y)
            if gpu:
                torch.cuda.synchronize(device)
    counts, ms, name_counts, name_ms = Counter(), Counter(), Counter(), Counter()
    for event in prof.events():
        if (event.device_type == torch.autograd.DeviceType.CUDA) != gpu:
            continue
        kind = kind_of(event.name)
        event_ms = (getattr(event, "device_time", None) or event.cuda_time if gpu else event.self_cpu_time_total) / 1e3
        counts[kind] += 1
        ms[kind] += event_ms
        name_counts[event.name] += 1
        name_ms[event.name] += event_ms
    # The longest kernels, then the longest of each kind not among them: on an H200 a "convolution"
    # total turned up in a DiT step that has no convolution, and no name said which kernels it was.
    names = [name for name, _ in name_ms.most_common(top)]
    named_kinds = {kind_of(name) for name in names}
    for name, _ in name_ms.most_common():
        if kind_of(name) not in named_kinds:
            names.append(name)
            named_kinds.add(kind_of(name))
    return {
        "launches": round(sum(counts.values()) / steps), "count_by_kind": {k: round(v / steps) for k, v in counts.items()},
        "ms_by_kind": {k: round(v / steps, 3) for k, v in ms.items()},
        "top_kernels": [{"name": name[:160], "kind": kind_of(name), "launches": round(name_counts[name] / steps), "ms": round(name_ms[name] / steps, 3)}
                        for name in names],
    }  # fmt: skip


def inductor_settings(ap: argparse.ArgumentParser, pairs: list[str]) -> dict:
    """Each ``NAME=VALUE`` set on ``torch._inductor.config`` (VALUE a Python literal, else a string)."""
    import torch._inductor.config as inductor_config

    settings = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not hasattr(inductor_config, name):
            ap.error(f"--inductor {pair!r}: expected NAME=VALUE with NAME one of torch._inductor.config's settings")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        setattr(inductor_config, name, value)
        settings[name] = value
    return settings


def step_arguments(repeats: int) -> argparse.ArgumentParser:
    """The options of the benches of one training step (this one, step_levers.py): which step
    (preset, batch), where, compiled or not, how many timings."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dit-mini")
    ap.add_argument("--batch-size", type=count_arg(1))
    ap.add_argument("--repeats", type=count_arg(1), default=repeats)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device")
    return ap


def main() -> None:
    ap = step_arguments(repeats=20)
    ap.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE", help="set torch._inductor.config.NAME (repeatable)")
    args = ap.parse_args()
    inductor = inductor_settings(ap, args.inductor)
    keep_freed_memory()  # as the command line does: large CPU buffers are reused, not given back each step
    config = get_preset(args.preset)
    dev = parse_device(args.device)
    precision = training_precision(config.train.precision, dev)
    batch = args.batch_size or config.train.batch_size
    torch.manual_seed(0)
    model = build_model(config.model).to(dev).train()
    diffusion = make_process(config.diffusion).ready_for(dev)
    optimizer = make_optimizer(model, config, dev)
    x = torch.randn(batch, config.model.in_channels, config.model.input_size, config.model.input_size, device=dev)
    y = torch.randint(0, config.model.num_classes, (batch,), device=dev)
    start = time.perf_counter()
    run_step, _ = make_step(model, model, diffusion, optimizer, x, y, precision=precision, grad_clip=config.train.grad_clip,
                            compile=args.compile, capture=args.compile and dev.type == "cuda")  # fmt: skip
    set_up_s = time.perf_counter() - start
    captured = isinstance(run_step, CapturedStep)

    def forward_backward() -> None:
        if captured:
            run_step.graph.replay()
            return
        with autocast(dev, precision):
            loss = diffusion.training_loss(model, x, y)
        loss.backward()

    # A compiled step that is not one CUDA graph (a CPU; a failed capture) has its passes inside
    # the compiled network, which make_step keeps to itself: they are not timed apart.
    time_passes = captured or not args.compile

    # Measured in that order: the optimiser's step needs the gradients a forward and backward left.
    calls = calls_per_timing(dev)  # as `simple-dit bench` times them: back to back on a GPU
    step_s = median_seconds(lambda: run_step(x, y), dev, warmup=3, repeats=args.repeats, calls=calls)
    passes_s = median_seconds(forward_backward, dev, warmup=2, repeats=args.repeats, calls=calls) if time_passes else None
    optimizer_s = median_seconds(optimizer.step, dev, warmup=2, repeats=args.repeats, calls=calls)
    result = {
        "preset": args.preset, "batch_size": batch, "precision": precision, "device": device_name(dev), "torch": torch.__version__,
        "compiled": args.compile, "inductor": inductor, "cuda_graph": captured, "set_up_s": round(set_up_s, 2),
        "step_ms": round(step_s * 1e3, 3), "forward_backward_ms": None if passes_s is None else round(passes_s * 1e3, 3), "optimizer_ms": round(optimizer_s * 1e3, 3),
        "images_per_s": round(batch / step_s, 1),
    }  # fmt: skip
    result["profile"] = profile_step(run_step, x, y, dev)
    print(f"{args.preset} batch {batch} ({precision}, {'compiled' if args.compile else 'eager'}{', one CUDA graph' if captured else ''}"
          f"{''.join(f', {k}={v!r}' for k, v in inductor.items())}) "
          f"on {result['device']}: step {result['step_ms']} ms = {result['images_per_s']:,.0f} images/s; forward+backward "
          f"{'not timed apart' if passes_s is None else str(result['forward_backward_ms']) + ' ms'}, optimiser {result['optimizer_ms']} ms")  # fmt: skip
    for kind, ms in sorted(result["profile"]["ms_by_kind"].items(), key=lambda kv: -kv[1]):
        print(f"  {kind:12s} {result['profile']['count_by_kind'][kind]:5d} launches  {ms:9.3f} ms")
    print("the kernels that took longest:")
    for kernel in result["profile"]["top_kernels"]:
        print(f"  {kernel['ms']:9.3f} ms  {kernel['launches']:4d}x  {kernel['kind']:11s} {kernel['name'][:110]}")
    print(json.dumps(result))


if __name__ == "__main__":
    run_script(main)
