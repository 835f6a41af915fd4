"""Throughput of one preset: warm training steps and denoiser evaluations, median of several.

    simple-dit bench --preset dit-mini --what all

prints a table and, as its last line, one JSON object (see ``run_bench``).
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ModelConfig, UNetConfig, get_preset
from .diffusion import make_process
from .errors import UserError
from .models import build_model, count_parameters, parameters_and_gflops
from .models.dit import Attention, PatchEmbed
from .models.unet import UNetCond, book_time_encoding
from .runtime import (
    autocast, check_fits_in_memory, check_positive_int, compile_model, cudagraph_skips, deterministic_compiled_kernels, device_name, parse_device,
    synchronize, warn_cudagraphs_skipped,
)  # fmt: skip
from .sample import sampling_network
from .train import CapturedStep, make_optimizer, make_step, training_precision


# On a GPU the host queues a step's kernels while the previous step's kernels run, and training never
# waits for a step to finish (issue 8: no per-step host syncs). A step timed alone, between two
# syncs, also counts the GPU idling while the host launches it (tens of microseconds, a few percent
# of a 1-3 ms captured step), so throughput is timed over this many steps back to back.
GPU_CALLS_PER_TIMING = 10


def run_script(main) -> None:
    """Run a script of bench/: bad input (an unknown preset, a device not present) ends in one
    line and exit status 2, as the command's does, rather than in a traceback."""
    try:
        main()
    except UserError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)


def calls_per_timing(device: torch.device) -> int:
    return GPU_CALLS_PER_TIMING if device.type == "cuda" else 1


def interleaved_median_seconds(fns: dict, device: torch.device, warmup: int, repeats: int, calls: int = 1) -> dict:
    """``median_seconds`` of several functions timed in interleaved rounds (one timing of each per
    round), so that a machine whose speed drifts treats them alike; returns {name: seconds}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_seconds(fn, device: torch.device, warmup: int, repeats: int, calls: int = 1) -> float:
    """Median wall time of one call of ``fn()`` over ``repeats`` timings after ``warmup`` untimed
    calls; each timing runs ``calls`` calls back to back, with the device's queued work waited for
    around them (``calls_per_timing``: one on a CPU, several on a GPU)."""
    return interleaved_median_seconds({"fn": fn}, device, warmup, repeats, calls)["fn"]


def article_time_encoding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The article's time encoding: the same formula, computed one sample at a time in Python."""
    return torch.stack([book_time_encoding(t[i : i + 1], dim)[0] for i in range(t.shape[0])])


class ArticleUNetCond(UNetCond):
    """The article's implementation of the same UNet, for ``--reference`` timings: the time
    encoding computed one sample at a time in Python, PyTorch's default channels-first layout and
    its bilinear kernel on every device. Same parameters, same initialisation, same outputs as
    ``UNetCond`` (to rounding, on a GPU)."""

    memory_format = torch.contiguous_format

    def encode_time(self, t: torch.Tensor) -> torch.Tensor:
        return article_time_encoding(t + 1, self.time_embed_dim)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear")


class FusedAttention(Attention):
    """Attention as the reference DiT code writes it: PyTorch's fused kernel on every device."""

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class ConvPatchEmbed(PatchEmbed):
    """The patch embedding as the reference DiT code computes it: a stride-p convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias).flatten(2).transpose(1, 2)  # (N, T, D)


def reference_model(config: ModelConfig) -> torch.nn.Module:
    """The plain implementation of ``config``'s architecture that ``--reference`` times: the
    article's UNet, or the DiT with the reference code's fused attention everywhere and its
    convolution for the patch embedding."""
    if isinstance(config, UNetConfig):
        return ArticleUNetCond.from_config(config)
    model = build_model(config)
    model.x_embedder.__class__ = ConvPatchEmbed
    for block in model.blocks:
        block.attn.__class__ = FusedAttention  # same parameters; only how attention is computed differs
    return model


def step_together(model, config, diffusion, x: torch.Tensor, y: torch.Tensor, together: int, *, precision: str, compile: bool):
    """A function taking one step of ``together`` models as training them together takes it
    (``model`` and copies initialised from the global RNG's next draws), its draws included."""
    from .batched import BatchedLoss, train_step_together

    models = [model] + [build_model(config.model).to(x.device).train() for _ in range(together - 1)]
    optimizers = [make_optimizer(m, config, x.device) for m in models]
    batched_loss = BatchedLoss(model, diffusion)
    batched_loss = compile_model(batched_loss, x.device) if compile else batched_loss
    xs, ys = x.expand(together, *x.shape), y.expand(together, *y.shape)

    def step():
        t, noise = (torch.stack(column) for column in zip(*(diffusion.training_draws(x) for _ in models)))
        # Compiled, in the deterministic mode training compiles and runs it in (batched.train_together).
        with deterministic_compiled_kernels(x.device) if compile else contextlib.nullcontext():
            train_step_together(batched_loss, models, optimizers, xs, ys, t, noise, lrs=[config.train.lr] * together,
                                precision=precision, grad_clips=[config.train.grad_clip] * together)  # fmt: skip

    return step


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_bench(
    preset: str,
    *,
    batch_size: int | None = None,
    what: str = "all",
    reference: bool = False,
    precision: str = "auto",
    device: str | None = None,
    warmup: int = 2,
    repeats: int = 5,
    compile: bool = False,
    together: int = 1,
) -> dict:
    """Training images/s (forward + backward + AdamW step) and sampling images/s (denoiser
    evaluations x batch per second, no guidance, of the network a sampler runs: in bf16 with bf16
    weights, ``sample.sampling_network``); ``reference`` forces the plain fp32 eager path.
    ``compile`` times the ``torch.compile``'d model and reports the seconds of its first calls
    (the compilation) as ``train_compile_s`` and ``sample_compile_s``. ``together`` > 1 times
    that many models training as one batched network (``compare --runs-together``): the training
    images/s are then those of all of them."""
    if what not in ("train", "sample", "all"):
        raise UserError("--what must be train, sample or all")
    if compile and reference:
        raise UserError("--compile times our path; --reference is the plain eager one: give one of them")
    if reference and precision == "bf16":
        raise UserError("--reference times the plain fp32 path; --precision bf16 is ours: give one of them")
    repeats = check_positive_int(repeats, "--repeats")
    together = check_positive_int(together, "--runs-together")
    if together > 1 and what == "sample":
        raise UserError("--runs-together times training steps; --what sample times one model's forward: drop one of them")
    if together > 1 and reference:
        raise UserError("--runs-together times our batched path; --reference is the plain one: give one of them")
    config = get_preset(preset)
    dev = parse_device(device)
    # Ours as training runs it (TF32 for fp32 matmuls on a GPU); the reference with PyTorch's defaults.
    precision = "fp32" if reference else training_precision(precision, dev)
    batch_size = config.train.batch_size if batch_size is None else check_positive_int(batch_size, "--batch-size")
    torch.manual_seed(0)
    model = (reference_model if reference else build_model)(config.model).to(dev)
    diffusion = make_process(config.diffusion).ready_for(dev)
    c, s = config.model.in_channels, config.model.input_size
    x = torch.randn(batch_size, c, s, s, device=dev)
    y = torch.randint(0, config.model.num_classes, (batch_size,), device=dev)
    # The architecture's FLOPs, the same for ours and the reference: PyTorch's counter does not see
    # inside the CPU's fused attention kernel that the reference runs (6% of dit-mini's FLOPs).
    gflops = parameters_and_gflops(config.model)[1]
    # Weights, gradients and two AdamW moments in fp32 per model, before their activations.
    check_fits_in_memory(together * count_parameters(model) * 16, f"--runs-together {together}: the models' weights, gradients and AdamW moments")
    skips = cudagraph_skips()
    result = {
        "preset": preset, "batch_size": batch_size, "precision": precision, "reference": reference,
        "device": device_name(dev), "torch": torch.__version__,  # a number means little without both
        "threads": torch.get_num_threads(), "params_m": count_parameters(model) / 1e6, "gflops_per_image": gflops,
        "compiled": compile, "runs_together": together, "calls_per_timing": calls_per_timing(dev),
        "train_images_per_s": None, "sample_images_per_s": None,
    }  # fmt: skip
    if what in ("train", "all"):
        # The step that training runs; the reference steps PyTorch's default (not fused) AdamW
        # without gradient clipping, as the article did.
        if reference:
            optimizer, grad_clip = torch.optim.AdamW(model.parameters(), lr=config.train.lr), 0.0
        else:
            optimizer, grad_clip = make_optimizer(model, config, dev), config.train.grad_clip
        model.train()
        if together > 1:
            step = step_together(model, config, diffusion, x, y, together, precision=precision, compile=compile)
            if compile:
                result["train_compile_s"] = median_seconds(step, dev, warmup=0, repeats=1)  # the first call compiles
        else:
            # As training makes it: with --compile on a GPU, the step replays as one CUDA graph.
            capture = compile and dev.type == "cuda"
            run_step, compile_s = make_step(model, model, diffusion, optimizer, x, y, precision=precision, grad_clip=grad_clip,
                                            compile=compile, capture=capture)  # fmt: skip
            if compile:
                result["train_compile_s"] = compile_s
            if capture:
                result["train_cuda_graph"] = isinstance(run_step, CapturedStep)

            def step():
                run_step(x, y)

        seconds = median_seconds(step, dev, warmup, repeats, calls_per_timing(dev))
        result["train_images_per_s"] = together * batch_size / seconds
        result["train_gflop_per_s"] = 3 * gflops * together * batch_size / seconds  # backward ~ 2x forward
    if what in ("sample", "all"):
        network = sampling_network(model.eval(), precision)
        t = torch.full((batch_size,), 500, device=dev, dtype=torch.long)
        forward_model = compile_model(network, dev) if compile else network

        @torch.no_grad()
        def denoise():
            with autocast(dev, precision):
                forward_model(x, t, y)

        if compile:
            result["sample_compile_s"] = median_seconds(denoise, dev, warmup=0, repeats=1)
        seconds = median_seconds(denoise, dev, warmup, repeats, calls_per_timing(dev))
        result["sample_images_per_s"] = batch_size / seconds
    if compile and dev.type == "cuda":  # a compiled number without CUDA graphs is not the one asked for
        result["cudagraphs_skipped"] = warn_cudagraphs_skipped(dev, skips)
    result["peak_rss_mb"] = peak_memory_mb(torch.device("cpu"))
    if dev.type == "cuda":
        result["peak_gpu_mb"] = peak_memory_mb(dev)
    return result
