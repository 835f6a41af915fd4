"""Every present device (the CPU always, CUDA where there is one): training, checkpoints that move
between devices, resuming on another device, FLOP counting and `simple-dit bench`."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch

from conftest import devices, tiny_config
from simple_dit.batched import BatchedLoss, train_step_together
from simple_dit.bench import run_bench
from simple_dit.checkpoint import load_weights
from simple_dit.config import get_preset
from simple_dit.data import ImageDataset
from simple_dit.diffusion import make_process
from simple_dit.models import build_model, forward_gflops
from simple_dit.runtime import cpu_bf16_unit, resolve_precision
from simple_dit.sample import Pipeline
from simple_dit.train import EpochOrder, make_optimizer, train, train_step, update_ema

PRESETS = ("dit-tiny", "unet-tiny")
STEPS = 4


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mnist_dir):
    """``trained_run(preset, device)``: a run of STEPS steps trained on ``device``, trained once per module."""
    runs = {}

    def get(preset: str, device: str):
        if (preset, device) not in runs:
            out = tmp_path_factory.mktemp(f"{preset}-{device}") / "run"
            config = tiny_config(preset, max_steps=STEPS)
            config.train.batch_size = 8
            train(config, out, device=device, progress=False)
            runs[preset, device] = out
        return runs[preset, device]

    return get


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("preset", PRESETS)
def test_a_tiny_preset_trains_on_the_device(trained_run, preset, device):
    run = trained_run(preset, device)
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert (run / "samples.png").is_file()
    _, weights, state = load_weights(run)
    assert state["step"] == STEPS
    assert all(w.device.type == "cpu" and torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("target", devices)
@pytest.mark.parametrize("source", devices)
@pytest.mark.parametrize("preset", PRESETS)
def test_a_checkpoint_loads_and_samples_on_every_device(trained_run, preset, source, target):
    run = trained_run(preset, source)
    on_cpu = Pipeline.from_pretrained(run, device="cpu", precision="fp32")
    pipe = Pipeline.from_pretrained(run, device=target, precision="fp32")
    assert {p.device.type for p in pipe.model.parameters()} == {torch.device(target).type}
    images = pipe(labels=[0, 1, 2, 3], steps=3, seed=0)
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.uint8 and images.device.type == "cpu"
    # The same weights compute the same function on either device (TF32 on CUDA: loose tolerance).
    torch.manual_seed(0)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        expected = on_cpu.model(x, t, y)
        got = pipe.model(x.to(target), t.to(target), y.to(target)).cpu()
    assert torch.allclose(got, expected, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("target", devices)
@pytest.mark.parametrize("source", devices)
def test_a_run_resumes_on_every_device(trained_run, tmp_path, source, target):
    run = tmp_path / "run"
    shutil.copytree(trained_run("dit-tiny", source), run)
    config = tiny_config("dit-tiny", max_steps=STEPS + 2)
    config.train.batch_size = 8
    train(config, run, resume=True, device=target, progress=False, final_samples=False)
    _, weights, state = load_weights(run)
    assert state["step"] == STEPS + 2
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("preset", PRESETS)
def test_flops_are_counted_where_the_model_is(preset, device):
    model = build_model(get_preset(preset).model)
    on_cpu = forward_gflops(model)
    assert forward_gflops(model.to(device)) == pytest.approx(on_cpu) and on_cpu > 0


@pytest.mark.parametrize("preset", PRESETS)
def test_flops_are_counted_on_a_device_that_is_not_the_cpu(preset):
    """The meta device stands in for a GPU on machines without one: inputs built on the CPU for a
    model elsewhere fail there the same way."""
    model = build_model(get_preset(preset).model)
    on_cpu = forward_gflops(model)
    assert forward_gflops(model.to("meta")) == pytest.approx(on_cpu, rel=0.1)  # meta counts attention a bit differently


@pytest.mark.parametrize("objective", ["eps", "flow"])
@pytest.mark.parametrize("preset", PRESETS)
def test_training_and_sampling_steps_stay_on_a_device_that_is_not_the_cpu(preset, objective):
    """The steps that run on a GPU, on the meta device: a tensor that one of them makes on the CPU
    (the bug that first crashed `bench` on a GPU) fails here on every machine, not only on one
    with CUDA. Meta tensors hold no values, so this checks placement, not arithmetic."""
    meta = torch.device("meta")
    config = tiny_config(preset)
    config.diffusion.objective = objective
    model = build_model(config.model).to(meta)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = make_process(config.diffusion).ready_for(meta)
    optimizer = make_optimizer(model, config, meta)
    x0, y = ImageDataset("mnist", "train", torch.zeros(8, 1, 28, 28, dtype=torch.uint8), torch.zeros(8, dtype=torch.long),
                         tuple("0123456789")).to(meta).batch(EpochOrder(8, 0, 4, meta).indices(0))  # fmt: skip
    loss, grad_norm = train_step(model, diffusion, optimizer, x0, y, precision="fp32", grad_clip=1.0)
    update_ema(ema, model, 0.5)
    assert {loss.device, grad_norm.device} == {meta}
    assert {p.device for p in [*model.parameters(), *ema.parameters(), *model.buffers()]} == {meta}

    models = [model, build_model(config.model).to(meta)]
    optimizers = [optimizer, make_optimizer(models[1], config, meta)]
    t, noise = (torch.stack(column) for column in zip(*(diffusion.training_draws(x0) for _ in models)))
    losses, grad_norms = train_step_together(BatchedLoss(model, diffusion), models, optimizers, x0.expand(2, *x0.shape),
                                             y.expand(2, *y.shape), t, noise, lrs=[1e-3, 3e-4], precision="fp32", grad_clips=[1.0, 0.0])  # fmt: skip
    assert losses.device == meta and {g.device for g in grad_norms} == {meta}

    ema.eval()
    for sampler in diffusion.samplers:
        images = diffusion.sample(ema, y, sampler=sampler, steps=3, guidance=2.0, null_class=config.model.num_classes)
        assert images.shape == x0.shape and images.device == meta


@pytest.mark.parametrize("precision, reference", [("fp32", False), ("bf16", False), ("fp32", True)], ids=["fp32", "bf16", "reference"])
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("preset", PRESETS)
def test_bench_runs_on_the_device(preset, device, precision, reference):
    result = run_bench(preset, batch_size=4, precision=precision, reference=reference, device=device, warmup=1, repeats=1)
    assert result["precision"] == precision and result["reference"] is reference
    assert result["train_images_per_s"] > 0 and result["sample_images_per_s"] > 0 and result["gflops_per_image"] > 0
    assert ("peak_gpu_mb" in result) == (torch.device(device).type == "cuda")


@pytest.mark.parametrize(
    "flags, unit",
    [
        ("fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "AMX-BF16"),  # Sapphire Rapids Xeon
        ("fpu sse avx2 avx512f avx512_bf16 avx512_vnni", "AVX512-BF16"),  # AMD Zen 4 EPYC
        ("fpu sse avx2 fma", None),  # AVX2 only: bf16 emulated, ~40x slower than fp32
    ],
)
def test_the_cpu_bf16_unit_is_read_from_the_flags(tmp_path, flags, unit):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_bf16_unit(str(cpuinfo)) == unit
    assert cpu_bf16_unit(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("capability, precision", [((7, 5), "fp32"), ((7, 0), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_a_gpu_wants_tensor_core_bf16(monkeypatch, capability, precision):
    # A T4 (7.5) or V100 (7.0) only emulates bf16, though torch.cuda.is_bf16_supported() says yes.
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert resolve_precision("auto", torch.device("cuda", 1)) == precision
    assert asked == [torch.device("cuda", 1)]  # the run's GPU, not the current one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the index is checked against the GPUs present")
def test_a_gpu_the_machine_lacks_is_one_line():
    """On the H200 check, `--device cuda:3` ended in "AssertionError: Invalid device id"."""
    from simple_dit.errors import UserError
    from simple_dit.runtime import parse_device

    assert parse_device(f"cuda:{torch.cuda.device_count() - 1}").index == torch.cuda.device_count() - 1
    with pytest.raises(UserError, match=f"this machine has {torch.cuda.device_count()} GPU"):
        parse_device(f"cuda:{torch.cuda.device_count()}")
