"""Device, numeric-precision and seed choices shared by training, sampling and benchmarks."""

from __future__ import annotations

import argparse
import contextlib
import functools
import numbers
import os
import sys

import numpy as np
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
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {str(device)!r}; use cpu, cuda or cuda:N")
    if device.type == "cpu" and device.index not in (None, 0):  # PyTorch has one CPU device; cpu:5 would run on it unsaid
        raise UserError(f"unknown device {str(device)!r}: there is one CPU device, cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {device} requested but this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


# Seeds are offset and scaled (per epoch, per process, per confirmation) before they seed a
# generator, which takes 64 bits: 32 leave room for that.
SEED_LIMIT = 2**32
# The largest count (of images, steps, samples) a command takes: far beyond any real one, and
# within what tensor sizes and indices take without overflowing.
MAX_COUNT = 2**31 - 1


def is_integer(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor among ``tensors`` holds only finite values."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def check_positive_int(value, name: str) -> int:
    if not is_integer(value) or not 0 < value <= MAX_COUNT:
        raise UserError(f"{name} must be a positive integer (at most {MAX_COUNT:,}), got {value!r}")
    return int(value)


def count_arg(minimum: int, maximum: int = MAX_COUNT):
    """An argparse type for a whole number from ``minimum`` to ``maximum``, so that a bad count
    fails before a model is loaded; the Python API checks the same values again for its own callers."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {'positive' if minimum == 1 else f'at least {minimum}'}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:,}, got {value}")
        return value

    return parse


def check_fits_in_memory(nbytes: int, what: str) -> None:
    """A UserError where ``what`` needs more than this machine's memory: Linux would rather end the
    process without a word (its OOM killer) than fail the allocation."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # a system that does not say
        return
    if nbytes > memory:
        raise UserError(f"{what} take {nbytes / 2**30:,.1f} GiB, more than this machine's {memory / 2**30:,.1f} GiB of memory; ask for fewer")


def check_seed(seed, name: str = "--seed") -> int:
    if not is_integer(seed) or not 0 <= seed < SEED_LIMIT:
        raise UserError(f"{name} must be an integer from 0 to {SEED_LIMIT - 1}, got {seed!r}")
    return int(seed)


def _cpuinfo_field(name: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first processor's ``name`` line of /proc/cpuinfo ("flags", "model name"); "" where there is none."""
    try:
        with open(cpuinfo) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(name) and ":" in line), "")
    except OSError:
        return ""


@functools.lru_cache(maxsize=None)
def cpu_bf16_unit(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """Which unit multiplies bf16 matrices in hardware on this CPU: "AMX-BF16", "AVX512-BF16" or None.

    Without either PyTorch emulates bf16 matmuls and they run tens of times slower than fp32
    (BENCHMARKS.md), so ``auto`` must not pick bf16 there. AMX is ~10x fp32, AVX512-BF16 (e.g. AMD
    Zen 4) ~2x: both are worth it, but the same run sees very different speeds on the two.
    """
    flags = _cpuinfo_field("flags", cpuinfo).split()
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


def cpu_has_fast_bf16() -> bool:
    return cpu_bf16_unit() is not None


def device_name(device: torch.device) -> str:
    """What to name beside a measurement: the GPU's name, or the CPU's model with its bf16 unit
    (the difference between a 10x, a 2x and a 40x-slower bf16)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{_cpuinfo_field('model name') or platform.machine()} ({cpu_bf16_unit() or 'no hardware bf16'})"


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        # Tensor-core bf16 (Ampere, compute capability 8.0, and later). is_bf16_supported() alone
        # also says yes where bf16 is only emulated (a T4, a V100), and asks the current GPU, not
        # ``device``.
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rng_state(device: torch.device) -> tuple:
    """The global random generators' state: the CPU's, and ``device``'s where it is a GPU."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple, device: torch.device) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@functools.lru_cache(maxsize=None)
def has_fused_adamw(device: torch.device) -> bool:
    """Whether this PyTorch has AdamW's fused kernel (one pass over all parameters) for this
    device: CUDA's since PyTorch 2.0, the CPU's since 2.4. Asked of the optimiser itself, which
    refuses ``fused=True`` where it has none."""
    if device.type not in ("cpu", "cuda"):
        return False
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except RuntimeError:
        return False
    return True


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together, as ``clip_grad_norm_`` measures it, on their device."""
    if hasattr(torch.nn.utils, "get_total_norm"):  # PyTorch >= 2.6
        return torch.nn.utils.get_total_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the forward pass; fp32 runs untouched."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    By default, glibc hands a freed block of more than a few MB straight back to the kernel, and
    the next step's tensor of the same size is faulted in again page by page: on a CPU, a sampling
    or training step of a small model then spends a large share of its time in the kernel
    (BENCHMARKS.md). Raising the mmap and trim thresholds keeps those blocks in the heap. A no-op
    (False) where the C library is not glibc. The CLI calls it once; the Python API leaves the
    process's allocator to its owner.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest allowed value on 64-bit systems
    ok &= mallopt(m_trim_threshold, 2**30)
    ok &= mallopt(m_top_pad, 256 * 2**20)
    return bool(ok)


def compile_model(model: torch.nn.Module, device: torch.device, *, cudagraphs: bool = True) -> torch.nn.Module:
    """``torch.compile`` of ``model`` for steps of one fixed batch shape.

    On a GPU the mode is "reduce-overhead": each call replays as a CUDA graph, which removes the
    Python dispatch that bounds a small model's step (issue 8: a batch-128 dit-seed step took ~32 ms
    where its arithmetic needs ~4 ms); ``cudagraphs=False`` leaves the graphs to a caller that
    captures more than the model (``train.CapturedStep``). On a CPU, inductor's fused C++ kernels. Random draws inside
    the graph come from PyTorch's own generator (``fallback_random``), so a compiled run is
    reproducible and resumes exactly. Inductor caches the compiled kernels (``TORCHINDUCTOR_CACHE_DIR``,
    by default under the temporary directory): compiling a model cold takes ~40 s on a 2-core CPU
    even for the tiny presets, the same model in the next process a few seconds.
    """
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" and cudagraphs else "default", dynamic=False)


@contextlib.contextmanager
def deterministic_compiled_kernels(device: torch.device):
    """Around every pass of a network ``compile_model`` compiled for training on a CPU: PyTorch's
    deterministic mode, which inductor reads when it lowers a graph (and guards on, so the flag
    must be the same at every call). Without it the label embedding's backward is a parallel loop
    of atomic float additions, whose order, and so whose rounding, changes from run to run on
    more than one thread; with it, that one op runs PyTorch's own kernel and a compiled run repeats
    and resumes bit for bit. Uninitialised memory is left as it is (the mode would fill it, at a
    cost, to expose reads of it). On a GPU, where many kernels add in a varying order anyway,
    nothing changes."""
    if device.type != "cpu":
        yield
        return
    import torch.utils.deterministic

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    filled = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = filled


def cudagraph_skips() -> int:
    """How many compiled graphs inductor has left without CUDA graphs in this process. It does so
    quietly (the reason goes to ``TORCH_LOGS=perf_hints``), and such a step keeps the Python
    dispatch cost that "reduce-overhead" is there to remove."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def warn_cudagraphs_skipped(device: torch.device, skips_before: int) -> bool:
    """Say on stderr, in one line, when graphs compiled since ``skips_before`` went without CUDA graphs."""
    skipped = device.type == "cuda" and cudagraph_skips() > skips_before
    if skipped:
        print("simple-dit: torch.compile ran without CUDA graphs (TORCH_LOGS=perf_hints says why); steps keep their Python dispatch cost",
              file=sys.stderr, flush=True)  # fmt: skip
    return skipped

