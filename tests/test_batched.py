"""Runs trained together as one batched network (batched.train_together, compare --runs-together):
each run trains as it would alone, resumes exactly, diverges alone, and bad groups are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import devices, largest_weight_difference, records_without_clock, resume_tolerance

from simple_dit.batched import train_together
from simple_dit.checkpoint import load_weights
from simple_dit.config import get_preset
from simple_dit.errors import UserError
from simple_dit.train import train


def _config(preset: str, *, lr: float, seed: int, steps: int, precision: str = "fp32", compile: bool = False):
    c = get_preset(preset)
    c.train.lr, c.train.seed, c.train.max_steps, c.train.precision, c.train.compile = lr, seed, steps, precision, compile
    c.train.batch_size, c.train.sample_every, c.train.checkpoint_every, c.train.log_every = 16, 0, 0, 2
    return c


def _records(run_dir) -> list[dict]:
    """Every line of the run's metrics.jsonl, each of which must be JSON."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in _records(run_dir) if "loss" in r]


RECIPES = [(1e-3, 0), (3e-4, 1)]  # two learning rates, two seeds


def _group(preset: str, root, name: str, *, steps: int, resume: bool = False, **config) -> list:
    """The (config, out_dir, resume) of one run per recipe, in root/name0, root/name1."""
    return [(_config(preset, lr=lr, seed=seed, steps=steps, **config), root / f"{name}{k}", resume) for k, (lr, seed) in enumerate(RECIPES)]


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("preset,precision", [("dit-tiny", "fp32"), ("unet-tiny", "bf16")])
def test_runs_trained_together_train_as_they_would_alone(preset, precision, device, tmp_path, mnist_dir):
    """Same data, draws and updates as training each run alone: losses agree to the rounding of
    the batched kernels, and each run logs that it shared the device."""
    configs = [_config(preset, lr=lr, seed=seed, steps=6, precision=precision) for lr, seed in RECIPES]
    alone = [tmp_path / f"alone{k}" for k in range(2)]
    together = [tmp_path / f"together{k}" for k in range(2)]
    for config, run_dir in zip(configs, alone):
        train(config, run_dir, progress=False, device=device, final_samples=False)
    assert train_together([(c, d, False) for c, d in zip(configs, together)], device=device) == {}
    # On a GPU, TF32 and bf16 kernels of the batched shapes round differently from the single ones.
    rtol = 2e-2 if device != "cpu" else 1e-5 if precision == "fp32" else 2e-3
    for a, b in zip(alone, together):
        assert _losses(b) == pytest.approx(_losses(a), rel=rtol)
        assert all(r["trained_together"] == 2 for r in _records(b) if "loss" in r)
        assert load_weights(b)[2]["step"] == 6
    if preset.startswith("unet"):  # BatchNorm's running statistics reach each run's own model
        a, b = load_weights(alone[0], use_ema=False)[1], load_weights(together[0], use_ema=False)[1]
        stats = [k for k in a if "running_" in k or "num_batches_tracked" in k]
        assert stats and all(int(a[k]) == int(b[k]) == 6 for k in stats if "num_batches_tracked" in k)
        for k in (k for k in stats if "running_" in k):
            initial = 0.0 if "running_mean" in k else 1.0
            # bf16 weights drift apart a little
            assert (b[k] - initial).abs().max() > 1e-3 and torch.allclose(b[k], a[k], rtol=5e-2, atol=3e-2), k
    if precision == "fp32" and preset.startswith("dit") and device == "cpu":  # the same arithmetic, batched
        assert largest_weight_difference(alone[0], together[0]) < 1e-5
    # Different seeds and learning rates give different runs: nothing leaked between them.
    assert _losses(together[0]) != _losses(together[1])


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("preset,precision", [("dit-tiny", "bf16"), ("unet-tiny", "fp32")])
def test_runs_trained_together_resume_exactly(preset, precision, device, tmp_path, mnist_dir):
    def group(name: str, steps: int, resume: bool = False) -> list:
        runs = _group(preset, tmp_path, name, steps=steps, precision=precision, resume=resume)
        for config, _, _ in runs:
            config.train.log_every = 3  # the first call stops inside the second window
        return runs

    train_together(group("straight", 8), device=device)
    train_together(group("resumed", 4), device=device)
    train_together(group("resumed", 8, resume=True), device=device)
    for k in range(2):
        for use_ema in (False, True):
            worst = largest_weight_difference(tmp_path / f"straight{k}", tmp_path / f"resumed{k}", use_ema=use_ema)
            assert worst <= resume_tolerance(device, preset, precision), f"{preset} {precision} on {device}, run {k}: resumed weights differ by up to {worst}"
        # The window the first call stopped in is completed, not logged in two halves.
        straight, resumed = records_without_clock(tmp_path / f"straight{k}"), records_without_clock(tmp_path / f"resumed{k}")
        assert [r["step"] for r in resumed] == [r["step"] for r in straight]
        if device == "cpu":
            assert resumed == straight


def test_a_diverging_run_stops_alone(tmp_path, mnist_dir):
    """A learning rate that blows up stops its own run, with nothing written from the diverged
    model; the run beside it trains to the end."""
    wild = _config("dit-tiny", lr=1e6, seed=0, steps=30)
    calm = _config("dit-tiny", lr=1e-3, seed=1, steps=30)
    diverged = train_together([(wild, tmp_path / "wild", False), (calm, tmp_path / "calm", False)], device="cpu")
    assert list(diverged) == [tmp_path / "wild"]
    assert "diverged" in str(diverged[tmp_path / "wild"])
    assert not (tmp_path / "wild" / "checkpoint.safetensors").exists()
    assert load_weights(tmp_path / "calm")[2]["step"] == 30


def test_groups_that_cannot_train_together_are_refused(tmp_path):
    dit, unet = _config("dit-tiny", lr=1e-3, seed=0, steps=2), _config("unet-tiny", lr=1e-3, seed=0, steps=2)
    with pytest.raises(UserError, match="share their model"):
        train_together([(dit, tmp_path / "a", False), (unet, tmp_path / "b", False)])
    other_batch = _config("dit-tiny", lr=1e-3, seed=1, steps=2)
    other_batch.train.batch_size = 8
    with pytest.raises(UserError, match="batch_size"):
        train_together([(dit, tmp_path / "a", False), (other_batch, tmp_path / "b", False)])
    timed = _config("dit-tiny", lr=1e-3, seed=1, steps=0)
    timed.train.minutes = 1.0
    with pytest.raises(UserError, match="--minutes"):
        train_together([(dit, tmp_path / "a", False), (timed, tmp_path / "b", False)])
    with pytest.raises(UserError, match="one directory each"):
        train_together([(dit, tmp_path / "a", False), (dit, tmp_path / "a", False)])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_compare_runs_together_refuses_a_time_budget(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "simple_dit.cli", "compare", "--presets", "dit-tiny", "--budget", "30s", "--runs-together", "3", "--out", str(tmp_path / "c")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--runs-together needs a budget of images or FLOPs" in result.stderr
    assert not (tmp_path / "c").exists()


def test_a_stop_signal_checkpoints_every_run_and_resume_is_exact(tmp_path, mnist_dir, monkeypatch):
    """SIGTERM in the middle of training together: every run checkpoints the step it finished,
    Interrupted is raised, and resuming gives the weights of an uninterrupted run."""
    import os
    import signal

    import simple_dit.batched as batched
    from simple_dit.errors import Interrupted

    train_together(_group("unet-tiny", tmp_path, "straight", steps=6), device="cpu")  # bit-exact resume holds on the CPU only
    calls, update_ema = [], batched.update_ema

    def signalling_update_ema(*args):
        update_ema(*args)
        calls.append(1)
        if len(calls) == 5:  # the first run's update of step 3
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(batched, "update_ema", signalling_update_ema)
    with pytest.raises(Interrupted) as stopped:
        train_together(_group("unet-tiny", tmp_path, "stopped", steps=6), device="cpu")
    assert stopped.value.signum == signal.SIGTERM
    assert [load_weights(tmp_path / f"stopped{k}")[2]["step"] for k in range(2)] == [3, 3]
    monkeypatch.setattr(batched, "update_ema", update_ema)
    train_together(_group("unet-tiny", tmp_path, "stopped", steps=6, resume=True), device="cpu")
    for k in range(2):
        assert largest_weight_difference(tmp_path / f"straight{k}", tmp_path / f"stopped{k}") == 0.0


@pytest.mark.parametrize("preset", ["dit-tiny", "unet-tiny"])
def test_a_stop_signal_checkpoints_a_run_that_finished_before_it_too(preset, tmp_path, mnist_dir, monkeypatch):
    """A run that reached its stop earlier than its company had no checkpoint yet (the loop's end
    writes it) and was left without one by a signal: its steps were lost."""
    import os
    import signal

    import simple_dit.batched as batched
    from simple_dit.errors import Interrupted

    def group(name, resume=False):
        return [(_config(preset, lr=1e-3, seed=0, steps=3), tmp_path / f"{name}0", resume),
                (_config(preset, lr=3e-3, seed=1, steps=6), tmp_path / f"{name}1", resume)]  # fmt: skip

    train_together(group("straight"), device="cpu")
    calls, update_ema = [], batched.update_ema

    def signalling_update_ema(*args):
        update_ema(*args)
        calls.append(1)
        if len(calls) == 8:  # the second run's update of step 5: the first stopped at 3
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(batched, "update_ema", signalling_update_ema)
    with pytest.raises(Interrupted):
        train_together(group("stopped"), device="cpu")
    assert [load_weights(tmp_path / f"stopped{k}")[2]["step"] for k in range(2)] == [3, 5]
    assert records_without_clock(tmp_path / "stopped0") == records_without_clock(tmp_path / "straight0")  # closed as if never stopped
    monkeypatch.setattr(batched, "update_ema", update_ema)
    train_together([group("stopped", resume=True)[1]], device="cpu")  # as compare resumes: the unfinished run alone
    for k in range(2):
        assert largest_weight_difference(tmp_path / f"straight{k}", tmp_path / f"stopped{k}") == 0.0
        assert records_without_clock(tmp_path / f"stopped{k}") == records_without_clock(tmp_path / f"straight{k}")


def test_a_resume_together_under_another_recipe_or_past_its_stop_is_refused(tmp_path, mnist_dir):
    """As train() refuses them: train_together resumed a checkpoint under any recipe it was given."""
    train_together(_group("dit-tiny", tmp_path, "run", steps=4), device="cpu")
    before = [load_weights(tmp_path / f"run{k}")[2]["step"] for k in range(2)]
    other_lr = [(_config("dit-tiny", lr=5e-2, seed=0, steps=6), tmp_path / "run0", True)]
    with pytest.raises(UserError, match="lr"):
        train_together(other_lr, device="cpu")
    with pytest.raises(UserError, match="past the requested stop"):
        train_together(_group("dit-tiny", tmp_path, "run", steps=2, resume=True), device="cpu")
    assert [load_weights(tmp_path / f"run{k}")[2]["step"] for k in range(2)] == before


def test_a_group_stopped_while_its_checkpoints_are_written_resumes_together_and_exactly(tmp_path, mnist_dir, monkeypatch):
    """A kill between two runs' checkpoint writes used to leave the first at its new step: the
    resumed comparison trained the second alone, where a UNet's batched bf16 kernels round
    otherwise than in a group of two. The group's checkpoints now move into place together."""
    import simple_dit.batched as batched

    for name in ("straight", "stopped"):  # as compare trains: a segment per evaluation point
        train_together(_group("unet-tiny", tmp_path, name, steps=3, precision="bf16"), device="cpu")
    train_together(_group("unet-tiny", tmp_path, "straight", steps=6, precision="bf16", resume=True), device="cpu")
    write_file, writes = batched.write_checkpoint_file, []

    def killed_in_the_second_write(path, **parts):
        writes.append(path)
        if len(writes) == 2:
            raise KeyboardInterrupt  # as a kill would leave it: the first run's file written, the second's not
        return write_file(path, **parts)

    monkeypatch.setattr(batched, "write_checkpoint_file", killed_in_the_second_write)
    with pytest.raises(KeyboardInterrupt):
        train_together(_group("unet-tiny", tmp_path, "stopped", steps=6, precision="bf16", resume=True), device="cpu")
    assert [load_weights(tmp_path / f"stopped{k}")[2]["step"] for k in range(2)] == [3, 3]
    assert not [p for k in range(2) for p in (tmp_path / f"stopped{k}").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(batched, "write_checkpoint_file", write_file)
    train_together(_group("unet-tiny", tmp_path, "stopped", steps=6, precision="bf16", resume=True), device="cpu")
    for k in range(2):
        assert largest_weight_difference(tmp_path / f"straight{k}", tmp_path / f"stopped{k}") == 0.0


def test_runs_trained_together_compiled_train_the_eager_steps(tmp_path, mnist_dir, monkeypatch, capsys):
    """With --compile the batched step is warmed up and used, not quietly replaced by the eager one,
    and trains what the eager one trains. The aot_eager backend stands in for inductor: the same
    tracing, functionalisation of BatchNorm's updates and warm-up, in seconds rather than a minute."""
    import simple_dit.batched as batched

    monkeypatch.setattr(batched, "compile_model", lambda fn, device: torch.compile(fn, backend="aot_eager"))

    train_together(_group("unet-tiny", tmp_path, "eager", steps=4), device="cpu")
    # As compare trains: a segment per evaluation point.
    train_together(_group("unet-tiny", tmp_path, "compiled", steps=2, compile=True), device="cpu")
    train_together(_group("unet-tiny", tmp_path, "compiled", steps=4, compile=True, resume=True), device="cpu")
    assert "torch.compile failed" not in capsys.readouterr().err
    for k in range(2):
        assert any(r.get("compile_seconds", 0) > 0 for r in _records(tmp_path / f"compiled{k}"))
        # Losses, not weights: the conv biases before BatchNorm get gradients of pure rounding,
        # which Adam's normalised steps turn into differences of about lr.
        assert _losses(tmp_path / f"compiled{k}") == pytest.approx(_losses(tmp_path / f"eager{k}"), rel=1e-5)


def test_a_failing_compiler_leaves_runs_trained_together_eager(tmp_path, mnist_dir, monkeypatch, capsys):
    """One failed compilation, said once, then eager steps (not a fresh attempt at every step)."""
    import simple_dit.batched as batched

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(batched, "compile_model", lambda fn, device: broken)
    assert train_together(_group("dit-tiny", tmp_path, "run", steps=4, compile=True), device="cpu") == {}
    assert capsys.readouterr().err.count("torch.compile failed (RuntimeError: no C++ compiler); training eager") == 1
    assert all(load_weights(tmp_path / f"run{k}")[2]["step"] == 4 for k in range(2))


@pytest.mark.parametrize("preset", ["dit-tiny", "unet-tiny"])
def test_the_batched_step_uses_no_kernel_that_vmap_cannot_batch_on_cuda(preset):
    """On an H200 (PyTorch 2.11), vmap failed in BatchNorm, whose backend choice asks for the
    input's memory format ("NYI: querying is_contiguous inside of vmap"), and in the backward of
    the memory-efficient attention ("LSE is not correctly aligned"). The batched network computes
    both from plain ops, on every device, so this CPU test sees the ops CUDA would run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from simple_dit.bench import step_together
    from simple_dit.diffusion import make_process
    from simple_dit.models import build_model

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    config = get_preset(preset)
    diffusion = make_process(config.diffusion).ready_for(torch.device("cpu"))
    step = step_together(build_model(config.model).train(), config, diffusion, torch.randn(4, 1, 28, 28), torch.arange(4), 2,
                         precision="fp32", compile=False)  # fmt: skip
    with Ops() as ops:
        step()
    assert ops.names & {"mm", "addmm", "bmm", "baddbmm", "convolution"}  # the mode saw the step (PyTorch 2.11 batches linear layers as bmm)
    unbatchable = {name for name in ops.names if "batch_norm" in name or "attention" in name}
    assert not unbatchable, unbatchable


def test_a_stop_on_a_checkpoint_step_writes_that_checkpoint_once(tmp_path, mnist_dir, monkeypatch):
    """The end of a run checkpoints only what the last periodic checkpoint did not: it used to
    write a stop on a checkpoint step twice (dit-seed's is 0.5 GB), and a kill in the second write
    left its temporary file beside a finished run."""
    import simple_dit.batched as batched
    import simple_dit.train as training

    written = []

    def counting(save):
        def save_checkpoint(out_dir, **parts):
            written.append((out_dir.name, parts["train_state"]["step"]))
            return save(out_dir, **parts)

        return save_checkpoint

    monkeypatch.setattr(training, "save_checkpoint", counting(training.save_checkpoint))
    write_file = batched.write_checkpoint_file

    def counting_file(path, **parts):  # runs trained together write into a temporary beside the checkpoint
        written.append((Path(path).parent.name, parts["train_state"]["step"]))
        return write_file(path, **parts)

    monkeypatch.setattr(batched, "write_checkpoint_file", counting_file)
    config = _config("dit-tiny", lr=1e-3, seed=0, steps=4)
    config.train.checkpoint_every = 2
    train(config, tmp_path / "alone", progress=False, device="cpu", final_samples=False)
    assert written == [("alone", 2), ("alone", 4)]
    written.clear()
    group = _group("dit-tiny", tmp_path, "together", steps=4)
    for run_config, _, _ in group:
        run_config.train.checkpoint_every = 2
    assert train_together(group, device="cpu") == {}
    assert sorted(written) == [("together0", 2), ("together0", 4), ("together1", 2), ("together1", 4)]
    # A stop between checkpoint steps still ends with its own checkpoint.
    written.clear()
    config.train.max_steps = 5
    train(config, tmp_path / "alone", resume=True, progress=False, device="cpu", final_samples=False)
    assert written == [("alone", 5)]
