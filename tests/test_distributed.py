"""DistributedDataParallel on CPU: two gloo processes train, and the checkpoint resumes with one
(on the CPU even where a GPU is present: the test is of gloo, and two processes on a one-GPU
machine would need a second GPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import records_without_clock

from simple_dit.checkpoint import load_weights


def test_two_gloo_processes_train_and_resume_with_one(tmp_path, mnist_dir):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    first = subprocess.run([*torchrun, "-m", "simple_dit.cli", "train", "--preset", "dit-tiny", "--out", str(out),
                            "--max-steps", "6", "--no-progress", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    config, _, state = load_weights(out)
    assert state["step"] == 6 and state["images_seen"] == 6 * config.train.batch_size  # the batch is global
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 6], first.stderr[-2000:]  # rank 0 alone logs
    assert first.stdout.count("checkpoint: ") == 1, first.stdout[-2000:]  # and says where it wrote

    second = subprocess.run([sys.executable, "-m", "simple_dit.cli", "train", "--out", str(out), "--resume",
                             "--max-steps", "10", "--no-progress", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert second.returncode == 0, second.stderr[-2000:]
    spent = load_weights(out)[2]
    assert spent["step"] == 10

    # A time budget: rank 0's clock decides, broadcast every step, so both ranks stop together. The
    # budget counts the run's whole training time, so it is set 3 s past what the ten steps took
    # (under a loaded test run they can take more than a fixed budget would allow).
    minutes = f"{(spent['train_seconds'] + 3) / 60:.6f}"
    third = subprocess.run([*torchrun, "-m", "simple_dit.cli", "train", "--out", str(out), "--resume", "--minutes", minutes,
                            "--no-progress", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert third.returncode == 0, third.stderr[-2000:]
    state = load_weights(out)[2]
    assert state["step"] > 10 and state["train_seconds"] >= spent["train_seconds"] + 3, (state, third.stderr[-2000:])


@pytest.mark.parametrize("preset, precision", [("dit-tiny", "fp32"), ("unet-tiny", "bf16")])
def test_two_processes_stopped_and_resumed_train_what_an_unbroken_run_does(tmp_path, mnist_dir, preset, precision):
    """Rank 1's noise comes from a seed of its rank and step, so a resumed run draws the noise an
    unbroken one did (it used to be seeded once per start: the resumed steps drew other noise)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "simple_dit.cli", "train",
                "--preset", preset, "--no-progress", "--device", "cpu", "--precision", precision, "--sample-every", "0"]  # fmt: skip
    for out, *stop in ((tmp_path / "straight", "--max-steps", "8"), (tmp_path / "resumed", "--max-steps", "4"),
                       (tmp_path / "resumed", "--resume", "--max-steps", "8")):  # fmt: skip
        result = subprocess.run([*torchrun, "--out", str(out), *stop], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    _, straight, _ = load_weights(tmp_path / "straight", use_ema=False)
    _, resumed, _ = load_weights(tmp_path / "resumed", use_ema=False)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    resumed = records_without_clock(tmp_path / "resumed")
    assert 4 not in [r["step"] for r in resumed]  # the window the first call stopped in is completed, not cut in two
    assert resumed == records_without_clock(tmp_path / "straight")
