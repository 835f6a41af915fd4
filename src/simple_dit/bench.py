"""Throughput of one preset: warm training steps and denoiser evaluations, median of several.

    simple-dit bench --preset dit-mini --what all

prints a table and, as its last line, one JSON object (see ``run_bench``).
"""

from __future__ import annotations

import platform
import resource
import statistics
import time

import torch

from .config import get_preset
from .diffusion import make_process
from .errors import UserError
from .models import build_model, count_parameters, forward_gflops
from .models.unet import UNetCond, book_time_encoding
from .runtime import autocast, has_fused_adamw, parse_device, resolve_precision, synchronize


def _median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def article_time_encoding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The article's time encoding: the same formula, computed one sample at a time in Python."""
    return torch.stack([book_time_encoding(t[i : i + 1], dim)[0] for i in range(t.shape[0])])


def reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """The article's implementation of the same architecture, for ``--reference`` timings: for the
    UNet, its per-sample time encoding and the default (channels-first) memory layout."""
    if isinstance(model, UNetCond):
        model.time_encoding = article_time_encoding
        model.memory_format = torch.contiguous_format
        model.to(memory_format=torch.contiguous_format)
    return model


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
) -> dict:
    """Training images/s (forward + backward + AdamW step) and sampling images/s (denoiser
    evaluations x batch per second, no guidance); ``reference`` forces the plain fp32 eager path."""
    if what not in ("train", "sample", "all"):
        raise UserError("--what must be train, sample or all")
    config = get_preset(preset)
    dev = parse_device(device)
    precision = "fp32" if reference else resolve_precision(precision, dev)
    batch_size = config.train.batch_size if batch_size is None else batch_size
    if batch_size <= 0:
        raise UserError("--batch-size must be positive")
    torch.manual_seed(0)
    model = build_model(config.model).to(dev)
    if reference:
        model = reference_model(model)
    diffusion = make_process(config.diffusion)
    c, s = config.model.in_channels, config.model.input_size
    x = torch.randn(batch_size, c, s, s, device=dev)
    y = torch.randint(0, config.model.num_classes, (batch_size,), device=dev)
    gflops = forward_gflops(model, s)
    result = {
        "preset": preset, "batch_size": batch_size, "precision": precision, "reference": reference,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "params_m": count_parameters(model) / 1e6, "gflops_per_image": gflops,
        "train_images_per_s": None, "sample_images_per_s": None,
    }  # fmt: skip
    if what in ("train", "all"):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not reference and has_fused_adamw(dev))
        model.train()

        def train_step():
            with autocast(dev, precision):
                loss = diffusion.training_loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = _median_seconds(train_step, dev, warmup, repeats)
        result["train_images_per_s"] = batch_size / seconds
        result["train_gflop_per_s"] = 3 * gflops * batch_size / seconds  # backward ~ 2x forward
    if what in ("sample", "all"):
        model.eval()
        t = torch.full((batch_size,), 500, device=dev, dtype=torch.long)

        @torch.no_grad()
        def denoise():
            with autocast(dev, precision):
                model(x, t, y)

        seconds = _median_seconds(denoise, dev, warmup, repeats)
        result["sample_images_per_s"] = batch_size / seconds
    result["peak_rss_mb"] = peak_memory_mb(torch.device("cpu"))
    if dev.type == "cuda":
        result["peak_gpu_mb"] = peak_memory_mb(dev)
    return result
