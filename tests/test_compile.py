"""``--compile``: a compiled run trains the steps an eager run trains, resumes exactly, logs its
compile time apart from its training time, and falls back to eager when the compiler fails."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import RECORDS_SPREAD, devices, largest_weight_difference, repeatable, resume_tolerance

from simple_dit.checkpoint import load_weights
from simple_dit.config import get_preset, validate_config
from simple_dit.errors import UserError
from simple_dit.io import read_jsonl
from simple_dit.train import train


def _config(preset: str, precision: str, steps: int, compile: bool):
    c = get_preset(preset)
    c.train.max_steps, c.train.sample_every, c.train.checkpoint_every, c.train.log_every = steps, 0, 0, 1
    c.train.precision, c.train.batch_size, c.train.compile = precision, 16, compile
    return c


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


# Each family and each precision once, on every device: a cold compile costs ~40 s of a 2-core
# CPU per (family, precision), so the four-cell product would add minutes to the suite.
@pytest.mark.skipif(torch.__version__ < "2.4", reason="PyTorch 2.2's inductor fails on the bf16 DiT (the run then trains "
                    "eager, as the next test checks) and its compiled UNet does not resume bit for bit")
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("preset, precision", [("dit-tiny", "bf16"), ("unet-tiny", "fp32")])
def test_compiled_run_trains_the_eager_steps_and_resumes_exactly(preset, precision, device, tmp_path, mnist_dir, monkeypatch):
    run = dict(progress=False, device=device, final_samples=False)
    eager, straight, resumed = tmp_path / "eager", tmp_path / "straight", tmp_path / "resumed"
    train(_config(preset, precision, 4, False), eager, **run)
    threads = torch.get_num_threads()
    if device == "cpu":
        # Two threads, as a user's run has (the suite's processes have one), and a fresh kernel
        # cache, whose C++ is read below: inductor lowered the label embedding's backward to a
        # parallel loop of atomic float additions, so that on two threads two compiled runs of one
        # command (straight and resumed) differed by rounding.
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
        torch.set_num_threads(2)
    try:
        train(_config(preset, precision, 4, True), straight, **run)
        train(_config(preset, precision, 2, True), resumed, **run)
        train(_config(preset, precision, 4, True), resumed, resume=True, **run)
    finally:
        torch.set_num_threads(threads)
    if device == "cpu":
        kernels = list((tmp_path / "inductor").rglob("*.cpp"))
        assert kernels, "inductor wrote no C++ kernels"
        assert not [k.name for k in kernels if "atomic_add" in k.read_text()]

    # Same batches, same noise, same class dropout: the compiled losses are the eager ones up to
    # the fused kernels' rounding (bf16 autocast rounds more; see conftest.repeatable for CUDA).
    tolerance = 3e-2 if precision == "bf16" else 1e-4 if repeatable(device, preset, precision) else 1e-3
    assert _losses(straight) == pytest.approx(_losses(eager), rel=tolerance)
    straight_losses = _losses(straight)  # bit for bit on the CPU; on CUDA see conftest.RESUME_TOLERANCE
    assert _losses(resumed) == (straight_losses if device == "cpu" else pytest.approx(straight_losses, rel=RECORDS_SPREAD))
    for use_ema in (False, True):
        worst = largest_weight_difference(straight, resumed, use_ema=use_ema)
        assert worst <= resume_tolerance(device, preset, precision), f"compiled {preset} {precision} on {device}: resumed weights differ by up to {worst}"

    compiles = [r for r in read_jsonl(straight / "metrics.jsonl") if "compile_seconds" in r]
    assert len(compiles) == 1 and compiles[0]["step"] == 0 and compiles[0]["compile_seconds"] > 0
    assert load_weights(straight)[2]["compiled"] and not load_weights(eager)[2]["compiled"]  # as compare records
    # The compilation is not training time: 4 steps of a tiny model take far less than compiling it.
    last = [r for r in read_jsonl(straight / "metrics.jsonl") if "train_seconds" in r][-1]
    assert last["train_seconds"] < compiles[0]["compile_seconds"]


def test_a_failing_compiler_leaves_an_eager_run(tmp_path, mnist_dir, monkeypatch, capsys):
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr("simple_dit.train.compile_model", lambda model, device, **options: Broken())
    run = dict(progress=False, device="cpu", final_samples=False)
    train(_config("dit-tiny", "fp32", 3, False), tmp_path / "eager", **run)
    train(_config("dit-tiny", "fp32", 3, True), tmp_path / "fallback", **run)

    assert "torch.compile failed (RuntimeError: no C++ compiler); training eager" in capsys.readouterr().err
    assert not any("compile_seconds" in r for r in read_jsonl(tmp_path / "fallback" / "metrics.jsonl"))
    _, a, _ = load_weights(tmp_path / "eager")
    _, b, state = load_weights(tmp_path / "fallback")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert state["compiled"] is False  # what compare records for the run: it trained eager


def test_a_compiler_failure_names_what_the_backend_raised(tmp_path, mnist_dir, monkeypatch, capsys):
    # How PyTorch 2.2's inductor failed on the bf16 DiT: a header line, then the error, then advice.
    message = "backend='inductor' raised:\nAssertionError: \n\nSet TORCH_LOGS=\"+dynamo\" and TORCHDYNAMO_VERBOSE=1 for more information"

    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError(message)

    monkeypatch.setattr("simple_dit.train.compile_model", lambda model, device, **options: Broken())
    train(_config("dit-tiny", "fp32", 1, True), tmp_path / "run", progress=True, device="cpu", final_samples=False)
    err = capsys.readouterr().err
    # On a line of its own: the progress bar is drawn after the compilation, not glued before it.
    assert "\nsimple-dit: torch.compile failed (RuntimeError: backend='inductor' raised: AssertionError:); training eager\n" in "\n" + err
    assert "TORCH_LOGS" not in err


def test_compile_must_be_a_boolean():
    config = get_preset("dit-tiny")
    config.train = dataclasses.replace(config.train, compile="yes")
    with pytest.raises(UserError, match="compile must be true or false"):
        validate_config(config)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("preset, precision", [("dit-tiny", "fp32"), ("unet-tiny", "bf16")])
def test_compiled_sampling_draws_the_eager_images(preset, precision, device):
    """Pipeline(compile=True) draws what the eager pipeline draws, with a sampler that keeps an
    earlier network output (Heun, unguided: the CUDA-graph case that needs the output copied), and
    sees new weights of the model it holds (the EMA while training)."""
    from simple_dit.models import build_model
    from simple_dit.sample import Pipeline

    config = get_preset(preset)
    config.diffusion.objective = "flow"
    torch.manual_seed(0)
    model = build_model(config.model)
    for p in model.parameters():  # adaLN-Zero starts as the zero function: make the samples depend on the weights
        torch.nn.init.normal_(p, std=0.05)
    eager = Pipeline(config, model, device=device, precision=precision)
    compiled = Pipeline(config, model, device=device, precision=precision, compile=True)
    labels = torch.arange(10)
    for _ in range(2):
        a = eager(labels, sampler="heun", steps=2, guidance=1.0, seed=1).int()
        b = compiled(labels, sampler="heun", steps=2, guidance=1.0, seed=1).int()
        assert (a - b).abs().max() <= 1
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.0)


def test_graphs_compiled_without_cuda_graphs_are_reported_in_one_line(monkeypatch, capsys):
    """Inductor leaves a graph without CUDA graphs quietly; the user (and scripts/gpu-check.sh,
    which fails a compiled step on this line) must hear of it. Only skips since the given count
    and only on a GPU are reported."""
    from torch._dynamo.utils import counters

    from simple_dit.runtime import cudagraph_skips, warn_cudagraphs_skipped

    before = cudagraph_skips()
    assert not warn_cudagraphs_skipped(torch.device("cuda"), before) and capsys.readouterr().err == ""
    monkeypatch.setitem(counters["inductor"], "cudagraph_skips", before + 1)
    assert not warn_cudagraphs_skipped(torch.device("cpu"), before)
    assert warn_cudagraphs_skipped(torch.device("cuda"), before)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("simple-dit: torch.compile ran without CUDA graphs")


def _step_pair(preset: str, device: str):
    """Two copies of one preset's model with their optimisers, and a diffusion process."""
    from simple_dit.diffusion import make_process
    from simple_dit.models import build_model
    from simple_dit.train import make_optimizer

    config = get_preset(preset)
    torch.manual_seed(0)
    models = [build_model(config.model).to(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        model.train()
    optimizers = [make_optimizer(model, config, torch.device(device)) for model in models]
    return config, models, optimizers, make_process(config.diffusion).ready_for(torch.device(device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the step is captured as a CUDA graph")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preset", ["dit-tiny", "unet-tiny"])
def test_a_captured_step_trains_the_uncaptured_steps(preset, precision):
    """The CUDA graph replays the eager step: the same noise and dropped labels (drawn at the same
    generator offsets), the learning rate set outside it, BatchNorm statistics kept, and new
    batches copied in; the capture itself trains nothing and leaves the generator as it was."""
    from simple_dit.train import CapturedStep, lr_at, make_step, train_step

    config, (eager, graphed), (eager_opt, graphed_opt), diffusion = _step_pair(preset, "cuda")
    batches = [(torch.randn(8, 1, 28, 28, device="cuda"), torch.randint(0, 10, (8,), device="cuda")) for _ in range(4)]
    clip = 0.5
    torch.manual_seed(1)
    rng = torch.cuda.get_rng_state()
    step, seconds = make_step(graphed, graphed, diffusion, graphed_opt, *batches[0], precision=precision, grad_clip=clip, capture=True)
    assert isinstance(step, CapturedStep) and seconds > 0
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    for a, b in zip(eager.state_dict().values(), graphed.state_dict().values()):
        assert torch.equal(a, b)  # nothing trained, no statistic moved by the warm-up
    for i, (x0, y) in enumerate(batches):
        for optimizer in (eager_opt, graphed_opt):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(i, 1e-2, 3)
        torch.manual_seed(10 + i)
        want_loss, want_norm = train_step(eager, diffusion, eager_opt, x0, y, precision=precision, grad_clip=clip)
        torch.manual_seed(10 + i)
        loss, norm = step(x0, y)
        # Tight: other noise would move an 8-image loss by ~2%, but the kernels are the same ones
        # (only atomics' summation order may differ, which moved an fp32 UNet's by 3e-4 to 1.3e-3
        # on an H200 after a few steps at this learning rate).
        loss_spread, norm_spread = (1e-4, 1e-3) if repeatable("cuda", preset, precision) else (5e-3, RECORDS_SPREAD)
        assert loss.item() == pytest.approx(want_loss.item(), rel=loss_spread) and norm.item() == pytest.approx(want_norm.item(), rel=norm_spread)
    # Four Adam steps of up to 1e-2 each: where runs do not repeat, rounding can move a weight by as much.
    weights_spread = 1e-4 if repeatable("cuda", preset, precision) else 4e-2
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert (a.float() - b.float()).abs().max() <= weights_spread, name


def test_a_failing_capture_leaves_the_uncaptured_step(monkeypatch, capsys):
    """Where the capture fails, one line says why and the step is ``train_step`` itself."""
    import simple_dit.train as train_module

    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(train_module, "CapturedStep", broken)
    config, (a, b), (opt_a, opt_b), diffusion = _step_pair("dit-tiny", "cpu")
    x0, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    step, seconds = train_module.make_step(b, b, diffusion, opt_b, x0, y, precision="fp32", grad_clip=1.0, capture=True)
    assert seconds is None
    assert capsys.readouterr().err == ("simple-dit: CUDA graph capture failed (RuntimeError: operation not permitted when stream is "
                                       "capturing); training without it\n")  # fmt: skip
    # With the compiler asked for too, the step falls back to the network compiled with its own
    # CUDA graphs (inductor's "reduce-overhead"), what --compile did before the capture existed.
    asked = []

    def compile_model(model, device, **options):
        asked.append(options)
        return torch.compile(model, backend="aot_eager")

    monkeypatch.setattr(train_module, "compile_model", compile_model)
    _, seconds = train_module.make_step(b, b, diffusion, opt_b, x0, y, precision="fp32", grad_clip=1.0, compile=True, capture=True)
    assert asked == [{"cudagraphs": False}, {"cudagraphs": True}] and seconds > 0
    assert "CUDA graph capture failed" in capsys.readouterr().err
    for _ in range(2):
        torch.manual_seed(3)
        want = train_module.train_step(a, diffusion, opt_a, x0, y, precision="fp32", grad_clip=1.0)
        torch.manual_seed(3)
        got = step(x0, y)
        assert all(torch.equal(u, v) for u, v in zip(want, got))
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_failing_capture_names_the_operation_that_broke_it(monkeypatch, capsys):
    """Ending a capture that failed inside raises its own error; the one that broke the capture is
    only that error's context, and the line says both."""
    import simple_dit.train as train_module

    def chained(*args, **kwargs):
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:
            raise ValueError("operation failed due to a previous error during capture")  # noqa: B904 - as torch.cuda.graph's exit raises

    def hidden(*args, **kwargs):
        try:
            raise KeyError("internal")
        except KeyError:
            raise ValueError("operation failed") from None

    monkeypatch.setattr(train_module, "CapturedStep", hidden)
    config, (a, b), (opt_a, opt_b), diffusion = _step_pair("dit-tiny", "cpu")
    x0, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    train_module.make_step(b, b, diffusion, opt_b, x0, y, precision="fp32", grad_clip=1.0, capture=True)
    assert "(ValueError: operation failed); training without it" in capsys.readouterr().err  # a suppressed context is no cause
    monkeypatch.setattr(train_module, "CapturedStep", chained)
    train_module.make_step(b, b, diffusion, opt_b, x0, y, precision="fp32", grad_clip=1.0, capture=True)
    assert capsys.readouterr().err == ("simple-dit: CUDA graph capture failed (ValueError: operation failed due to a previous error during "
                                       "capture; first RuntimeError: operation not permitted when stream is capturing); training without it\n")  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a real capture fails")
def test_a_capture_that_fails_inside_leaves_the_generator_and_stream_usable(monkeypatch, capsys):
    """A host sync inside the captured step breaks the capture: the step then trains uncaptured,
    drawing its noise from the generator the capture had marked, on the stream it found."""
    import simple_dit.train as train_module

    config, (a, b), (opt_a, opt_b), diffusion = _step_pair("dit-tiny", "cuda")
    x0, y = torch.randn(8, 1, 28, 28, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    loss = diffusion.training_loss

    def syncing_loss(model, x, labels):
        out = loss(model, x, labels)
        if torch.cuda.is_current_stream_capturing():
            out.item()  # not permitted while capturing
        return out

    monkeypatch.setattr(diffusion, "training_loss", syncing_loss)
    stream = torch.cuda.current_stream()
    step, _ = train_module.make_step(b, b, diffusion, opt_b, x0, y, precision="fp32", grad_clip=1.0, capture=True)
    assert "CUDA graph capture failed" in capsys.readouterr().err and not isinstance(step, train_module.CapturedStep)
    assert torch.cuda.current_stream() == stream
    torch.randint(0, 10, (4,), device="cuda")  # the generator draws again
    for _ in range(2):
        torch.manual_seed(3)
        want = train_module.train_step(a, diffusion, opt_a, x0, y, precision="fp32", grad_clip=1.0)
        torch.manual_seed(3)
        got = step(x0, y)
        assert got[0].item() == pytest.approx(want[0].item(), rel=1e-4)  # the same noise (only atomics may differ)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the bench's compiled step is captured there")
def test_the_compiled_bench_times_the_captured_step():
    from simple_dit.bench import run_bench

    result = run_bench("dit-tiny", batch_size=8, what="train", compile=True, device="cuda", repeats=1)
    assert result["train_cuda_graph"] is True and result["train_compile_s"] > 0 and result["train_images_per_s"] > 0
