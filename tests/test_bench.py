"""`simple-dit bench`: the article's reference path and the JSON it prints."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simple_dit.bench import ArticleUNetCond, article_time_encoding, reference_model, run_bench
from simple_dit.cli import main
from simple_dit.config import get_preset
from simple_dit.models import build_model
from simple_dit.models.unet import UNetCond, book_time_encoding
from simple_dit.sample import sampling_network


def test_the_article_time_encoding_is_the_same_function_one_sample_at_a_time():
    t = torch.tensor([1, 7, 500, 1000])
    assert torch.allclose(article_time_encoding(t, 100), book_time_encoding(t, 100), atol=1e-6)


def test_the_reference_unet_computes_the_same_outputs():
    config = get_preset("unet-tiny").model
    torch.manual_seed(0)
    model = build_model(config).eval()
    torch.manual_seed(0)
    reference = reference_model(config).eval()
    assert type(model) is UNetCond and type(reference) is ArticleUNetCond
    weight, reference_weight = model.down2.convs[0].weight, reference.down2.convs[0].weight  # (16, 8, 3, 3)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert reference_weight.is_contiguous() and not reference_weight.is_contiguous(memory_format=torch.channels_last)
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 10, 999]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = reference(x, t, y)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_the_unet_upsampling_by_sums_computes_the_articles_outputs_and_gradients(monkeypatch):
    """The UNet's upsampling on a GPU (sums of shifted copies), run here on the CPU: the outputs and
    gradients of the article's UNet (PyTorch's bilinear kernel), in bf16 to its rounding, and
    through runs trained together (vmap)."""
    from simple_dit.bench import step_together
    from simple_dit.diffusion import make_process

    monkeypatch.setattr(UNetCond, "upsample_by_sums_on", ("cpu",))
    config = get_preset("unet-tiny")
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    reference = reference_model(config.model).eval()
    reference.load_state_dict(model.state_dict())
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 10, 999]), torch.tensor([1, 2, 3])
    ours, theirs = model(x, t, y), reference(x, t, y)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(ours.shape)
    ours_grads = torch.autograd.grad(ours, list(model.parameters()), upstream)
    theirs_grads = torch.autograd.grad(theirs, list(reference.parameters()), upstream)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(x, t, y).float(), reference(x, t, y).float(), rtol=0.05, atol=0.05)

    diffusion = make_process(config.diffusion).ready_for(torch.device("cpu"))
    step = step_together(model.train(), config, diffusion, torch.randn(4, 1, 28, 28), torch.arange(4), 2, precision="fp32", compile=False)
    before = model.up1.convs[0].weight.detach().clone()  # a layer after both upsamplings
    step()
    after = model.up1.convs[0].weight.detach()
    assert torch.isfinite(after).all() and not torch.equal(after, before)


def test_the_model_itself_has_no_benchmark_hooks():
    assert not hasattr(UNetCond, "time_encoding")
    assert UNetCond.memory_format is torch.channels_last


def test_the_reference_dit_is_the_dit():
    config = get_preset("dit-tiny").model
    assert type(reference_model(config)) is type(build_model(config))


def test_bench_prints_one_json_object_last(capsys):
    assert main(["bench", "--preset", "unet-tiny", "--batch-size", "4", "--repeats", "1", "--reference", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["preset"] == "unet-tiny" and result["batch_size"] == 4 and result["reference"] is True
    assert result["precision"] == "fp32" and result["torch"] == torch.__version__
    for key in ("train_images_per_s", "sample_images_per_s", "peak_rss_mb"):
        assert result[key] > 0


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_bench_times_the_network_the_sampler_runs(precision, monkeypatch):
    """Sampling images/s are those of the network a Pipeline samples with: in bf16 its bf16 copy of
    the weights, not autocast over the fp32 ones (1.07-1.17x slower on a CPU, BENCHMARKS.md)."""
    import simple_dit.bench
    import simple_dit.sample
    from simple_dit.sample import Pipeline

    networks = {"bench": [], "pipeline": []}

    def spying(who):
        def network(model, precision):
            made = sampling_network(model, precision)
            networks[who].append((type(made).__name__, {p.dtype for p in made.parameters()}))
            return made

        return network

    monkeypatch.setattr(simple_dit.bench, "sampling_network", spying("bench"))
    monkeypatch.setattr(simple_dit.sample, "sampling_network", spying("pipeline"))
    run_bench("dit-tiny", batch_size=2, what="sample", precision=precision, device="cpu", warmup=0, repeats=1)
    config = get_preset("dit-tiny")
    Pipeline(config, build_model(config.model), device="cpu", precision=precision)(labels=[0, 1], steps=1, progress=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert networks["bench"] == networks["pipeline"] == [("DiT", {dtype})]


def test_the_sampling_network_is_a_copy_in_the_precision_asked():
    model = build_model(get_preset("dit-tiny").model)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        network = sampling_network(model, precision)
        assert network is not model and {p.dtype for p in network.parameters()} == {dtype}
        for mine, theirs in zip(network.parameters(), model.parameters()):
            assert mine.data_ptr() != theirs.data_ptr() and torch.equal(mine, theirs.to(dtype))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_bench_rejects_a_bad_batch_size(capsys):
    assert main(["bench", "--preset", "dit-tiny", "--batch-size", "0"]) != 0
    assert capsys.readouterr().err.strip().startswith("simple-dit: error: argument --batch-size: must be positive, got 0")


def test_bench_refuses_more_runs_together_than_memory_holds(capsys):
    assert main(["bench", "--preset", "dit-tiny", "--runs-together", "2147483647", "--what", "train", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simple-dit: error: --runs-together 2147483647: the models'") and "GiB" in err[0], err


def test_interleaved_timing_calls_each_function_warmup_plus_repeats_times():
    from simple_dit.bench import interleaved_median_seconds

    calls = {"a": 0, "b": 0}

    def counter(name):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    seconds = interleaved_median_seconds({name: counter(name) for name in calls}, torch.device("cpu"), warmup=2, repeats=3)
    assert calls == {"a": 5, "b": 5} and set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())


def test_a_timing_of_several_calls_back_to_back_reports_one_calls_seconds():
    from simple_dit.bench import calls_per_timing, median_seconds

    calls = []

    def sleep_5ms():
        calls.append(1)
        time.sleep(0.005)

    seconds = median_seconds(sleep_5ms, torch.device("cpu"), warmup=1, repeats=3, calls=8)
    assert len(calls) == 1 + 3 * 8 and 0.005 <= seconds < 0.02  # the 8 calls' total would be 40 ms
    # Training queues its steps on a GPU without waiting for each; on a CPU a step is its own timing.
    assert calls_per_timing(torch.device("cpu")) == 1 and calls_per_timing(torch.device("cuda")) == 10


def test_the_reference_counts_the_flops_of_the_same_architecture():
    """The reference DiT attends with PyTorch's fused CPU kernel, whose FLOPs the counter does not
    see: its GFLOP/s came out 6% low for dit-mini."""
    from simple_dit.models import parameters_and_gflops

    ours = run_bench("dit-tiny", batch_size=2, what="train", device="cpu", warmup=0, repeats=1)
    reference = run_bench("dit-tiny", batch_size=2, what="train", reference=True, device="cpu", warmup=0, repeats=1)
    assert ours["gflops_per_image"] == reference["gflops_per_image"] == parameters_and_gflops(get_preset("dit-tiny").model)[1]


def test_runs_trained_together_are_timed_compiled_as_training_compiles_them(monkeypatch):
    """Training compiles the batched step in PyTorch's deterministic mode, which changes the
    kernels inductor writes; the bench compiled it without."""
    import contextlib

    import simple_dit.bench as bench
    from simple_dit.diffusion import make_process

    entered = []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        yield

    monkeypatch.setattr(bench, "compile_model", lambda fn, device: fn)  # the mode, not the compiler, is under test
    monkeypatch.setattr(bench, "deterministic_compiled_kernels", recording)
    config = get_preset("dit-tiny")
    diffusion = make_process(config.diffusion)
    step = bench.step_together(build_model(config.model).train(), config, diffusion, torch.randn(2, 1, 28, 28), torch.arange(2), 2,
                               precision="fp32", compile=True)  # fmt: skip
    step()
    assert entered == [torch.device("cpu")]


BENCH_SCRIPTS = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script, argv, fragment", [
    ("together.py", ["--repeats", "0"], "argument --repeats: must be positive, got 0"),
    ("compile_speedup.py", ["--batch-size", "0"], "argument --batch-size: must be positive, got 0"),
    ("fp32_levers.py", ["--preset", "no-such"], "unknown preset 'no-such'"),
    ("presets.py", ["--presets", "dit-tiny,no-such"], "unknown preset 'no-such'"),  # before the first is timed
    ("sampling.py", ["no-run", "--configs", "euler:5,ddim:x"], "--configs: 'ddim:x' is not sampler:steps"),  # before the model is loaded
    ("checkpoint_cost.py", ["--dir", "/nonexistent"], "--dir /nonexistent is not a directory"),
])  # fmt: skip
def test_a_bench_script_refuses_bad_input_in_one_line(script, argv, fragment):
    """The scripts are run by hand and by gpu-check.sh: a typo ends in one line, not a traceback
    (``--repeats 0`` was a StatisticsError after the warm-up, an unknown preset a UserError's)."""
    done = subprocess.run([sys.executable, str(BENCH_SCRIPTS / script), *argv], capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines and lines[-1].startswith(f"{script}: error:") and fragment in lines[-1], done.stderr
    assert "Traceback" not in done.stderr and not done.stdout
