"""DistributedDataParallel on CPU: two gloo processes train, and the checkpoint resumes with one
(on the CPU even where a GPU is present: the test is of gloo, and two processes on a one-GPU
machine would need a second GPU)."""

import json
import os
import subprocess
import sys

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
    assert [r["step"] for r in records] == [5, 6]  # rank 0 alone logs
    assert first.stdout.count("checkpoint: ") == 1  # and says where it wrote

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
    assert state["step"] > 10 and state["train_seconds"] >= spent["train_seconds"] + 3
