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


def workers_said(result: subprocess.CompletedProcess) -> str:
    """What torchrun's processes printed last on stderr before its own report of a failure (the
    report's 2,000 characters would push a worker's last words out of an assertion's message)."""
    report = result.stderr.find("torch/distributed/elastic/multiprocessing/api.py")
    return result.stderr[: report if report >= 0 else None][-2000:]


def test_two_gloo_processes_train_and_resume_with_one(tmp_path, mnist_dir):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    first = subprocess.run([*torchrun, "-m", "simple_dit.cli", "train", "--preset", "dit-tiny", "--out", str(out),
                            "--max-steps", "6", "--no-progress", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert first.returncode == 0, workers_said(first)
    config, _, state = load_weights(out)
    assert state["step"] == 6 and state["images_seen"] == 6 * config.train.batch_size  # the batch is global
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 6], workers_said(first)  # rank 0 alone logs
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
    assert third.returncode == 0, workers_said(third)
    state = load_weights(out)[2]
    assert state["step"] > 10 and state["train_seconds"] >= spent["train_seconds"] + 3, (state, workers_said(third))


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
        assert result.returncode == 0, workers_said(result)
    _, straight, _ = load_weights(tmp_path / "straight", use_ema=False)
    _, resumed, _ = load_weights(tmp_path / "resumed", use_ema=False)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    resumed = records_without_clock(tmp_path / "resumed")
    assert 4 not in [r["step"] for r in resumed]  # the window the first call stopped in is completed, not cut in two
    assert resumed == records_without_clock(tmp_path / "straight")


def _rank_pids(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes."""
    pids = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in pids:
        try:
            environ = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
        except OSError:
            continue
        if "RANK" in environ:
            ranks[int(environ["RANK"])] = int(pid)
    return ranks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the workers' ranks")
def test_a_stop_signal_to_one_process_stops_all_after_the_same_step(tmp_path, mnist_dir):
    """torchrun hands a signal to each worker at its own moment (here: to rank 1 alone): the
    processes agree on it after each step, so rank 0 checkpoints the step they all stopped at,
    and says so in one line (rank 1 used to stop a step early, its peer dying in gloo)."""
    import signal
    import time

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "simple_dit.cli",
                             "train", "--preset", "dit-tiny", "--out", str(out), "--max-steps", "100000", "--sample-every", "0",
                             "--checkpoint-every", "0", "--no-progress", "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() or len(ranks := _rank_pids(proc.pid)) < 2:  # training has started
            assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        os.kill(ranks[1], signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [line for line in stderr.splitlines() if line.startswith("simple-dit:")]
    assert len(lines) == 1 and "stopped by SIGTERM at step" in lines[0], stderr[-3000:]
    assert "Connection closed" not in stderr and "diverged" not in stderr, stderr[-3000:]
    assert load_weights(out)[2]["step"] == int(lines[0].split("at step ")[1].split(";")[0])


def test_a_divergence_found_at_a_checkpoint_step_stops_every_process_with_one_line(tmp_path, mnist_dir):
    """Rank 0 checks the loss before each checkpoint it writes; the others now check at the same
    steps (they used to go on into a collective whose peer had left)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "simple_dit.cli",
                             "train", "--preset", "dit-tiny", "--out", str(tmp_path / "ddp"), "--lr", "1e30", "--checkpoint-every", "2",
                             "--max-steps", "60", "--sample-every", "0", "--no-progress", "--device", "cpu"],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.startswith("simple-dit:")]
    assert result.returncode != 0 and len(lines) == 1 and "training diverged" in lines[0], result.stderr[-3000:]
    assert "Connection closed" not in result.stderr, result.stderr[-3000:]


def test_main_called_in_process_leaves_a_process_group_of_the_callers_alone(tmp_path):
    """Only the program's entry points end a torchrun worker after its command (see
    cli.end_if_distributed); a caller's own group, and the caller, go on after main returns."""
    script = (
        "import torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "from simple_dit.cli import main\n"
        "status = main(['--list-presets'])\n"
        "print('returned', status, dist.is_initialized())\n"
        "dist.destroy_process_group()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "returned 0 True", done.stdout[-500:] + done.stderr[-2000:]
