"""Device and numeric-precision choices shared by training, sampling and benchmarks."""

from __future__ import annotations

import contextlib
import functools

import torch

from .errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def parse_device(device: str | torch.device | None) -> torch.device:
    """The requested device, or CUDA when there is one; a bad name is a one-line error."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available")
    return device


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16).

    Elsewhere PyTorch emulates bf16 matmuls and they run tens of times slower than fp32
    (BENCHMARKS.md), so ``auto`` must not pick it there.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def has_fused_adamw(device: torch.device) -> bool:
    """Whether AdamW's fused kernel (one pass over all parameters) exists for this device."""
    return device.type in ("cpu", "cuda")


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the forward pass; fp32 runs untouched."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
