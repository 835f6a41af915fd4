"""Shared setup for the simple-dit test suite.

* Torch runs single-threaded (in this process and in every CLI subprocess, through
  OMP_NUM_THREADS): on a small, busy CPU, oversubscribed threads make tiny models several times
  slower, and one thread also keeps every run bitwise reproducible. SIMPLE_DIT_TEST_THREADS
  overrides it.
* MNIST is read from $SIMPLE_DIT_DATA (CI: ``../shared/data/mnist`` relative to the repository
  root), else from ``<repo_root>/../shared/data/mnist``. The path is made absolute and exported, so
  that subprocesses started in other directories find the same files.
* The user cache directory is redirected to a temporary one, so that no test reads or writes the
  real ``~/.cache/simple-dit``.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

THREADS = int(os.environ.get("SIMPLE_DIT_TEST_THREADS", "1"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
os.environ["MKL_NUM_THREADS"] = str(THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402
from simple_dit.checkpoint import largest_weight_difference  # noqa: E402, F401 (the tests take it from here)

torch.set_num_threads(THREADS)

# The devices that device-sensitive tests run on: the CPU always, CUDA where there is one.
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# How far a resumed run's weights may be from the straight run's. Bit for bit on the CPU. On CUDA
# some backward kernels (bilinear upsampling, attention) add with atomics in a varying order, so
# two identical runs already differ by rounding, which Adam's normalised steps can carry to about
# a step's size (lr 1e-3) in a few weights; a lost RNG state or data order moves many weights by
# several steps.
RESUME_TOLERANCE = {"cpu": 0.0, "cuda": 2e-3}


def repeatable(device: str, preset: str, precision: str) -> bool:
    """Whether two identical runs train the same weights (up to RESUME_TOLERANCE). Not a UNet on
    CUDA: on an H200 (2026-12-04) two identical 12-step unet-tiny runs in fp32 differed by up to
    0.011 in a weight with TF32 (0.004 without it, as much with cudnn.deterministic) and by 3e-4 in
    a loss; in bf16 they mostly repeat bit for bit, but one run in two of the resume test (later the
    same day) drifted by 0.0033, the same number each time: atomics' order rarely flips one bf16
    rounding, and the runs then part. The DiT repeated bit for bit in both precisions; a resumed
    UNet run was no further from the straight one (0.008) than the repeat was. With the UNet's
    upsampling on CUDA free of atomics, the next H200 (the same evening) still saw fp32 runs part;
    bf16 ones repeated, once."""
    return not (device == "cuda" and preset.startswith("unet"))


def resume_tolerance(device: str, preset: str, precision: str) -> float:
    """RESUME_TOLERANCE, or the repeat's own spread where runs do not repeat: the weights cannot
    then tell a lost state from rounding, and the records (held to 1e-2, RECORDS_SPREAD) must: a
    lost RNG state draws other noise, which moves a 16-image loss by about 2%."""
    return RESUME_TOLERANCE[device] if repeatable(device, preset, precision) else 3e-2


RECORDS_SPREAD = 1e-2  # how far the losses and norms of runs that do not repeat may be apart

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _resolve_data_dir() -> Path:
    value = os.environ.get("SIMPLE_DIT_DATA")
    if not value:
        return (REPO_ROOT.parent / "shared" / "data" / "mnist").resolve()
    path = Path(value)
    if not path.is_absolute():
        # CI gives the path relative to the repository root; fall back to the working directory.
        path = REPO_ROOT / path if (REPO_ROOT / path).exists() else Path.cwd() / path
    return path.resolve()


MNIST_DIR = _resolve_data_dir()
os.environ["SIMPLE_DIT_DATA"] = str(MNIST_DIR)
_CACHE = tempfile.mkdtemp(prefix="simple-dit-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    missing = [f for f in MNIST_FILES if not (MNIST_DIR / f).is_file()]
    if missing:
        pytest.fail(f"MNIST files {missing} not found in {MNIST_DIR}; set SIMPLE_DIT_DATA to the directory holding them")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist_train(mnist_dir):
    from simple_dit.data import load_dataset

    return load_dataset("mnist", "train", data_dir=mnist_dir, download=False)


def perturb_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter a random nudge, so a fresh DiT (whose output is exactly zero) computes
    something that depends on x, t and y."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_config(preset: str = "dit-tiny", max_steps: int = 20):
    """A tiny recipe that trains for ``max_steps`` with no mid-run samples or checkpoints."""
    from simple_dit.config import get_preset

    config = get_preset(preset)
    config.train.max_steps = max_steps
    config.train.sample_every = 10**9
    config.train.checkpoint_every = 10**9
    config.train.precision = "fp32"
    return config


def strict_json_lines(path: Path) -> list[dict]:
    """The JSON lines of ``path``; a bare NaN or Infinity (not JSON) fails."""

    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def records_without_clock(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl without the fields that time the run (images_per_s,
    train_seconds), which differ between two runs of the same steps."""
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "train_seconds")} for r in strict_json_lines(Path(run_dir) / "metrics.jsonl")]


def run_cli(*args, program: list[str] | None = None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m simple_dit.cli ARGS`` (or ``program ARGS``) in a subprocess, with the test environment."""
    return subprocess.run(
        [*(program or [sys.executable, "-m", "simple_dit.cli"]), *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=os.environ.copy(),
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """A clean CLI failure: non-zero exit, no traceback, and exactly one error line on stderr,
    its last line, starting with the prefix and containing every fragment. (Other lines, such as a
    library's warning, are tolerated.) Returns the error line."""
    assert result.returncode != 0, f"expected failure, got rc 0\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("simple-dit: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line at the end of stderr, got:\n{result.stderr}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def snapshot(directory: Path) -> dict[str, str]:
    """Relative path -> md5 of every file under ``directory`` (to prove nothing was touched)."""
    directory = Path(directory)
    return {
        str(p.relative_to(directory)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
