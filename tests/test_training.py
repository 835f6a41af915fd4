"""Training: overfitting one batch, checkpoints, exact resume, the sampling Pipeline."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import devices, tiny_config
from simple_dit.checkpoint import (
    CHECKPOINT_NAME, CONFIG_NAME, load_config, load_training_state, load_weights, save_checkpoint,
)  # fmt: skip
from simple_dit.config import RunConfig, get_preset
from simple_dit.diffusion import GaussianDiffusion
from simple_dit.errors import UserError
from simple_dit.io import is_temporary
from simple_dit.models import build_model
from simple_dit.runtime import has_fused_adamw
from simple_dit.sample import Pipeline
from simple_dit.train import ema_decay_at, epoch_permutation, lr_at, train, update_ema


def read_checkpoint(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# ---- learning ----------------------------------------------------------------------------------


def test_tiny_dit_overfits_one_batch(mnist_train):
    """At fixed (t, noise) the loss on 16 images must fall far below where it starts."""
    x0, y = mnist_train.batch(torch.arange(16))
    torch.manual_seed(0)
    model = build_model(get_preset("dit-tiny").model).train()
    diffusion = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, diffusion.num_timesteps, (16,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = diffusion.q_sample(x0, t, noise)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = F.mse_loss(model(xt, t, y), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)  # zero-init model predicts 0
    final = sum(losses[-10:]) / 10
    assert math.isfinite(final)
    assert final < 0.3 * losses[0], f"loss only went from {losses[0]:.3f} to {final:.3f}"


def test_training_loss_is_eps_mse_at_random_timesteps():
    """training_loss draws t and noise from the global RNG and scores the model's eps prediction."""
    d = GaussianDiffusion()
    x0 = torch.rand(6, 1, 28, 28) * 2 - 1
    y = torch.arange(6)
    calls = []

    def model(x, t, y_):
        calls.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    torch.manual_seed(7)
    loss = d.training_loss(model, x0, y)
    torch.manual_seed(7)
    t = torch.randint(0, 1000, (6,))
    noise = torch.randn_like(x0)
    assert torch.equal(calls[0][1], t)
    torch.testing.assert_close(calls[0][0], d.q_sample(x0, t, noise))
    torch.testing.assert_close(loss, noise.pow(2).mean())


def test_schedules_helpers():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10**6, 0.999) == 0.999
    assert all(ema_decay_at(s, 0.9999) <= ema_decay_at(s + 1, 0.9999) for s in range(0, 2000, 37))
    assert lr_at(0, 1e-3, 0) == 1e-3
    assert lr_at(0, 1e-3, 100) == pytest.approx(1e-5)
    assert lr_at(99, 1e-3, 100) == pytest.approx(1e-3) and lr_at(500, 1e-3, 100) == pytest.approx(1e-3)
    a, b = epoch_permutation(100, 0, 3), epoch_permutation(100, 0, 3)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, epoch_permutation(100, 0, 4)) and not torch.equal(a, epoch_permutation(100, 1, 3))


def test_update_ema_is_a_lerp():
    torch.manual_seed(0)
    model = build_model(get_preset("unet-tiny").model)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(2.0)
    before = [p.clone() for p in ema.parameters()]
    update_ema(ema, model, 0.75)
    for p_ema, p0, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(p_ema, 0.75 * p0 + 0.25 * p)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        assert torch.equal(b_ema, b)  # BatchNorm statistics are copied, not averaged


# ---- checkpoints -------------------------------------------------------------------------------


@pytest.fixture
def saved_state(tmp_path):
    """A dit-tiny trained 3 steps (so weights, EMA and Adam moments are all non-trivial), saved."""
    config = tiny_config("dit-tiny")
    torch.manual_seed(0)
    model = build_model(config.model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    x, t, y = torch.randn(4, 1, 28, 28), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    for _ in range(3):
        loss = (model(x, t, y) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(ema, model, 0.9)
    state = {"step": 3, "train_seconds": 1.5, "images_seen": 12}
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    path = save_checkpoint(tmp_path, config=config, model=model, ema=ema, optimizer=opt, train_state=state)
    return dict(dir=tmp_path, path=path, config=config, model=model, ema=ema, opt=opt, state=state, rng=rng, batch=(x, t, y))


def test_checkpoint_file_holds_weights_ema_optimizer_and_rng(saved_state):
    s = saved_state
    assert s["path"] == s["dir"] / CHECKPOINT_NAME and s["path"].is_file()
    assert not [p for p in s["dir"].iterdir() if is_temporary(p.name)]  # no temporary left behind
    tensors, meta = read_checkpoint(s["path"])
    assert meta["format"] == "simple-dit/1"
    for k, v in s["model"].state_dict().items():
        assert torch.equal(tensors["model." + k], v), k
    for k, v in s["ema"].state_dict().items():
        assert torch.equal(tensors["ema." + k], v), k
    opt_state = s["opt"].state_dict()["state"]
    for idx, per_param in opt_state.items():
        for key, value in per_param.items():
            assert torch.equal(tensors[f"optim.{idx}.{key}"], value), (idx, key)
    assert torch.equal(tensors["rng.cpu"], s["rng"])
    assert json.loads(meta["train_state"]) == s["state"]


def test_checkpoint_weights_and_config_load_back(saved_state):
    s = saved_state
    loaded_config, weights, train_state = load_weights(s["dir"], use_ema=True)
    assert loaded_config.to_dict() == s["config"].to_dict() and train_state == s["state"]
    assert weights.keys() == s["ema"].state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in s["ema"].state_dict().items())
    _, raw, _ = load_weights(s["path"], use_ema=False)
    assert all(torch.equal(raw[k], v) for k, v in s["model"].state_dict().items())
    assert not torch.equal(raw["final_layer.linear.weight"], weights["final_layer.linear.weight"])
    assert load_config(s["dir"]).to_dict() == s["config"].to_dict()


def test_load_training_state_restores_everything(saved_state):
    s = saved_state
    model, opt, x, t, y = s["model"], s["opt"], *s["batch"]
    torch.manual_seed(99)
    model2 = build_model(s["config"].model)
    ema2 = copy.deepcopy(model2).requires_grad_(False)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0)
    assert not torch.equal(next(model2.parameters()), next(model.parameters()))
    assert load_training_state(s["dir"], model2, ema2, opt2) == s["state"]
    assert torch.equal(torch.get_rng_state(), s["rng"])
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(s["ema"].state_dict().items(), ema2.state_dict().items()):
        assert torch.equal(a, b), k
    assert opt2.param_groups[0]["lr"] == 1e-3 and opt2.param_groups[0]["weight_decay"] == 0.01
    # The restored optimiser continues exactly like the original one (same RNG for label dropout).
    for m, o in ((model, opt), (model2, opt2)):
        torch.manual_seed(5)
        loss = (m(x, t, y) - x).pow(2).mean()
        o.zero_grad()
        loss.backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_config_round_trips_through_json():
    for name in ("dit-tiny", "unet-tiny"):
        config = get_preset(name)
        again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config
    with pytest.raises(UserError, match="invalid run configuration"):
        RunConfig.from_dict({"model": {"arch": "dit", "depth": 2, "wings": 3}, "diffusion": {}, "train": {}})


def test_get_preset_returns_independent_copies():
    a = get_preset("dit-tiny")
    a.train.max_steps = 123
    a.model.depth = 99
    b = get_preset("dit-tiny")
    assert b.train.max_steps == 0 and b.model.depth == 2
    with pytest.raises(UserError, match="unknown preset"):
        get_preset("dit-xl-2")


# ---- the training loop: exact resume -----------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, mnist_dir):
    """dit-tiny trained for 40 steps on MNIST through the public train() entry point."""
    run = tmp_path_factory.mktemp("runs") / "straight"
    train(tiny_config(max_steps=40), run, progress=False, device="cpu")
    return run


def test_train_writes_a_complete_run(straight_run):
    run = straight_run
    for name in (CHECKPOINT_NAME, CONFIG_NAME, "metrics.jsonl", "samples.png"):
        assert (run / name).is_file(), name
    assert (run / "samples" / "step_0000040.png").is_file()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000040.png"]  # no mid-run grids
    assert json.loads((run / CONFIG_NAME).read_text())["preset"] == "dit-tiny"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    _, meta = read_checkpoint(run / CHECKPOINT_NAME)
    state = json.loads(meta["train_state"])
    assert state["step"] == 40 and state["images_seen"] == 40 * 32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preset", ["dit-tiny", "unet-tiny"])
def test_watching_a_run_does_not_change_what_it_trains(preset, precision, tmp_path, mnist_dir):
    """Evaluations and grids mid-run (how a run is watched, which --resume may change) leave the
    training noise alone: the weights equal those of the same run unwatched."""
    runs = {}
    for name, (eval_every, sample_every) in {"plain": (0, 10**9), "watched": (5, 6)}.items():
        config = tiny_config(preset, max_steps=12)
        config.train.precision, config.train.eval_every, config.train.eval_n, config.train.sample_every = precision, eval_every, 6, sample_every
        train(config, tmp_path / name, progress=False, device="cpu", data_dir=str(mnist_dir), final_samples=False)
        runs[name], _ = read_checkpoint(tmp_path / name / CHECKPOINT_NAME)
    assert [json.loads(line)["step"] for line in (tmp_path / "watched" / "metrics.jsonl").read_text().splitlines() if "eval_fid" in line] == [5, 10]
    for key in runs["plain"]:
        assert torch.equal(runs["watched"][key], runs["plain"][key]), f"{key} differs in the watched run"


def test_resume_is_bitwise_identical_to_a_straight_run(straight_run, tmp_path):
    resumed_dir = tmp_path / "resumed"
    train(tiny_config(max_steps=20), resumed_dir, progress=False, device="cpu")
    after_20, _ = read_checkpoint(resumed_dir / CHECKPOINT_NAME)
    train(tiny_config(max_steps=40), resumed_dir, resume=True, progress=False, device="cpu")

    resumed, resumed_meta = read_checkpoint(resumed_dir / CHECKPOINT_NAME)
    straight, straight_meta = read_checkpoint(straight_run / CHECKPOINT_NAME)
    assert resumed.keys() == straight.keys()
    for prefix in ("model.", "ema.", "optim."):
        assert any(k.startswith(prefix) for k in straight), prefix
    assert "rng.cpu" in straight
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), f"{key} differs after resume"
    resumed_state, straight_state = json.loads(resumed_meta["train_state"]), json.loads(straight_meta["train_state"])
    assert resumed_state["step"] == straight_state["step"] == 40
    assert resumed_state["images_seen"] == straight_state["images_seen"]
    # Training really happened between step 20 and step 40.
    assert not torch.equal(after_20["model.final_layer.linear.weight"], straight["model.final_layer.linear.weight"])
    # metrics.jsonl was appended to, not rewritten.
    steps = [json.loads(line)["step"] for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 41, 5))


def test_a_run_resumes_where_the_fused_adamw_is_missing(tmp_path, monkeypatch):
    # Trained with the fused CPU AdamW (PyTorch >= 2.4), continued on a PyTorch without it, whose
    # AdamW would fail at its first step if the checkpoint's fused=True were kept.
    run = tmp_path / "run"
    train(tiny_config(max_steps=5), run, progress=False, device="cpu")
    fused = json.loads(read_checkpoint(run / CHECKPOINT_NAME)[1]["optimizer"])["param_groups"][0]["fused"]
    assert fused is (torch.__version__ >= "2.4")
    monkeypatch.setattr("simple_dit.train.has_fused_adamw", lambda device: False)
    train(tiny_config(max_steps=10), run, resume=True, progress=False, device="cpu")
    _, meta = read_checkpoint(run / CHECKPOINT_NAME)
    assert [g["fused"] for g in json.loads(meta["optimizer"])["param_groups"]] == [False]
    assert json.loads(meta["train_state"])["step"] == 10


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("preset, precision", [("dit-tiny", "bf16"), ("unet-tiny", "fp32")])
def test_a_run_trained_without_the_fused_adamw_resumes_with_it(tmp_path, monkeypatch, device, preset, precision):
    # The other way round (a CPU run of PyTorch < 2.4, resumed where the fused kernel exists): the
    # step counters must be loaded as the fused kernel wants them, on the parameters' GPU, not on
    # the CPU where the unfused AdamW keeps them (CUDA's fused kernel refused those).
    def config(steps: int):
        c = tiny_config(preset, max_steps=steps)
        c.train.precision = precision
        return c

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr("simple_dit.train.has_fused_adamw", lambda device: False)
        train(config(5), run, progress=False, device="cpu")
    train(config(10), run, resume=True, progress=False, device=device)
    _, meta = read_checkpoint(run / CHECKPOINT_NAME)
    expected = has_fused_adamw(torch.device(device))
    assert [g["fused"] for g in json.loads(meta["optimizer"])["param_groups"]] == [expected]
    assert json.loads(meta["train_state"])["step"] == 10


def test_pipeline_from_pretrained_loads_and_samples(straight_run):
    pipe = Pipeline.from_pretrained(straight_run, device="cpu")
    ckpt, _ = read_checkpoint(straight_run / CHECKPOINT_NAME)
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(v, ckpt["ema." + k]), k
    assert not pipe.model.training
    assert pipe.config.preset == "dit-tiny" and pipe.num_classes == 10
    images = pipe(labels=[0, 1, 7], steps=5, guidance=2.0, seed=0)
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 28, 28)
    assert images.float().std() > 0
    raw = Pipeline.from_pretrained(straight_run, use_ema=False, device="cpu")
    for k, v in raw.model.state_dict().items():
        assert torch.equal(v, ckpt["model." + k]), k


def test_pipeline_is_deterministic_per_seed(straight_run):
    pipe = Pipeline.from_pretrained(straight_run, device="cpu")
    labels = [0, 1, 2, 3, 4, 5]
    for sampler, steps in (("ddim", 5), ("ddpm", 5)):
        a = pipe(labels, sampler=sampler, steps=steps, seed=0)
        b = pipe(labels, sampler=sampler, steps=steps, seed=0)
        c = pipe(labels, sampler=sampler, steps=steps, seed=1)
        assert a.dtype == torch.uint8 and a.shape == (6, 1, 28, 28)
        assert torch.equal(a, b), sampler
        assert not torch.equal(a, c), sampler
    trajectory = []
    d = pipe(labels, steps=5, seed=0, trajectory=trajectory)
    assert torch.equal(d, pipe(labels, steps=5, seed=0))
    assert len(trajectory) == 5 and torch.equal(trajectory[-1], d)


@pytest.mark.parametrize("device", devices)
def test_an_image_does_not_depend_on_the_batch_it_is_drawn_in(straight_run, device):
    """batch_size is a memory setting: each image draws its noise, DDPM's at every step too, from
    its own generator (one generator for all used to give DDPM's images other noise at another
    batch size, and every sampler's on a GPU, whose streams do not split across calls)."""
    pipe = Pipeline.from_pretrained(straight_run, device=device, precision="fp32")
    labels = [0, 1, 2, 3, 4, 5, 6]
    for sampler in pipe.diffusion.samplers:
        whole = pipe(labels, sampler=sampler, steps=5, seed=3)
        for batch_size in (1, 3):
            again = pipe(labels, sampler=sampler, steps=5, seed=3, batch_size=batch_size)
            assert (whole.int() - again.int()).abs().max() <= 2, (sampler, batch_size)  # rounding of other GEMM shapes, at most
        alone = pipe(labels[:1], sampler=sampler, steps=5, seed=3)
        assert (whole[:1].int() - alone.int()).abs().max() <= 2, sampler
        if device != "cpu":  # the noise is drawn on the CPU: a seed's images are the same on every device, up to rounding
            on_cpu = Pipeline.from_pretrained(straight_run, device="cpu", precision="fp32")(labels, sampler=sampler, steps=5, seed=3)
            assert (whole.float() - on_cpu.float()).abs().mean() < 1.0, sampler  # other noise: tens of grey levels


def test_pipeline_rejects_bad_labels(straight_run):
    pipe = Pipeline.from_pretrained(straight_run, device="cpu")
    with pytest.raises(UserError, match="label 12 is out of range"):
        pipe([3, 12], steps=2)
    with pytest.raises(UserError, match="out of range"):
        pipe([-1], steps=2)
    with pytest.raises(UserError, match="no labels"):
        pipe([], steps=2)
    for labels in ([1.5], [[1], [2]], ["3"], [float("nan")], [2**70], torch.tensor([True])):
        with pytest.raises(UserError, match="labels must be"):
            pipe(labels, steps=2)
    with pytest.raises(UserError, match="label 18446744073709551615 is out of range"):  # not wrapped to -1
        pipe(np.array([2**64 - 1], dtype=np.uint64), steps=2)
    for bad, fragment in (({"steps": 0}, "steps must be"), ({"steps": 2.0}, "steps must be"), ({"batch_size": 0}, "batch_size must be"),
                          ({"batch_size": True}, "batch_size must be"), ({"seed": -1}, "seed must be"), ({"guidance": float("inf")}, "guidance must be"),
                          ({"trajectory": "abc"}, "trajectory must be"), ({"guidance_interval": {0: 1, 1: 2}}, "guidance interval must be"),
                          ({"guidance_interval": (True, 1)}, "guidance interval must be"), ({"guidance": 10**400}, "guidance must be"),
                          ({"batch_size": 2**70}, "batch_size must be")):  # fmt: skip
        with pytest.raises(UserError, match=fragment):
            pipe([1], **({"steps": 2} | bad))
    with pytest.raises(UserError, match="one label per image"):
        pipe.grid(pipe([1, 2, 3], steps=2), [1, 2])
    with pytest.raises(UserError, match="images with values, got 1 channels of 0 x 0"):
        pipe.grid(torch.zeros(3, 1, 0, 0, dtype=torch.uint8), [1, 2, 3])  # an empty grid, silently, before
    images = pipe([1, 2], steps=2, batch_size=np.int64(1))  # NumPy's ints are ints here too
    for bad in (-1, 0, "3"):
        with pytest.raises(UserError, match="max_per_row must be"):
            pipe.grid(images, [1, 2], max_per_row=bad)
    for bad in (None, 5, "grid.jpg"):
        with pytest.raises(UserError, match="saved as a PNG file"):
            pipe.save_grid(images, [1, 2], bad)
    with pytest.raises(UserError, match="use_ema must be True or False"):
        Pipeline.from_pretrained(straight_run, use_ema="no")
    for args, kwargs, fragment in (((None, pipe.model), {}, "a Pipeline takes a RunConfig and a torch module"),
                                   ((pipe.config, None), {}, "a Pipeline takes a RunConfig and a torch module"),
                                   ((pipe.config, pipe.model), {"guidance": "x"}, "guidance must be"),
                                   ((pipe.config, pipe.model), {"class_names": ["a"]}, "class_names must name the model's 10 classes"),
                                   ((pipe.config, build_model(get_preset("unet-tiny").model)), {}, r"not the network config.model describes \(a UNetCond for a DiT\)"),
                                   ((pipe.config, build_model(get_preset("dit-mini").model)), {}, "x_embedder.weight is"),
                                   ((pipe.config, pipe.model), {"compile": "no"}, "compile must be True or False"),
                                   ((pipe.config, pipe.model), {"class_names": list(range(10))}, "class_names must be strings"),
                                   ((pipe.config, copy.deepcopy(pipe.model).half()), {}, "samples from fp32 weights")):  # fmt: skip
        with pytest.raises(UserError, match=fragment):
            Pipeline(*args, **kwargs)
    for n in (-1, 2**70, "3"):
        with pytest.raises(UserError, match="the number of images must be"):
            pipe.cycled_labels(n)
    # NumPy's numbers are numbers: the same images as Python's.
    expected = pipe([3, 7], steps=2, guidance=2.0, seed=3)
    assert torch.equal(pipe(np.array([3, 7]), steps=np.int64(2), guidance=np.float32(2.0), seed=np.int64(3)), expected)


def test_a_refused_pipeline_leaves_the_model_where_and_as_it_was():
    """A Pipeline moves the model it is given to its device and into eval mode; one that is refused
    must not (on a GPU machine the caller's model used to end up on CUDA)."""
    config = get_preset("dit-tiny")
    model = build_model(config.model).train()
    for kwargs in ({"class_names": ["a"]}, {"class_names": list(range(10))}, {"compile": "no"}, {"guidance": "x"}):
        with pytest.raises(UserError):
            Pipeline(config, model, **kwargs)
        assert model.training and all(p.device.type == "cpu" for p in model.parameters())


def test_train_refuses_to_overwrite_and_to_resume_nothing(straight_run, tmp_path):
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_config(max_steps=1), straight_run, progress=False, device="cpu")
    with pytest.raises(UserError, match="no checkpoint"):
        train(tiny_config(max_steps=1), tmp_path / "empty", resume=True, progress=False, device="cpu")


def _digests(directory) -> dict:
    import hashlib

    return {p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_new_run_starts_over_only_an_attempt_that_never_checkpointed(straight_run, tmp_path):
    """A directory that is not a killed early attempt (a run whose checkpoint was deleted, an
    export, someone's own files) is refused and left as it was; an early attempt is started over."""
    no_checkpoint = tmp_path / "no-checkpoint"
    shutil.copytree(straight_run, no_checkpoint, ignore=shutil.ignore_patterns(CHECKPOINT_NAME))
    own_files = tmp_path / "own"
    own_files.mkdir()
    (own_files / CONFIG_NAME).write_text('{"learning_rate": 0.1}')
    (own_files / "metrics.jsonl").write_text("mine\n")
    for directory in (no_checkpoint, own_files):
        before = _digests(directory)
        with pytest.raises(UserError, match="not empty and holds no checkpoint"):
            train(tiny_config(max_steps=1), directory, progress=False, device="cpu")
        assert _digests(directory) == before

    early = tmp_path / "early"
    early.mkdir()
    shutil.copyfile(straight_run / CONFIG_NAME, early / CONFIG_NAME)
    (early / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (early / ".checkpoint.safetensors.abc.tmp").write_bytes(b"half")
    (early / ".tmpRYi5pD").write_bytes(b"half")  # safetensors' own temporary, left by a kill in the middle of a checkpoint
    train(tiny_config(max_steps=2), early, progress=False, device="cpu", final_samples=False)
    assert load_weights(early)[2]["step"] == 2
    assert not [p.name for p in early.iterdir() if is_temporary(p.name)]


def test_a_time_budget_with_the_progress_bar_ends_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    """A step that ends well past the budget (routine for the seed presets on a CPU) used to crash
    the progress bar (tqdm drops a total that the count has run past) before the final
    checkpoint; so did resuming a run whose clock is already past a smaller budget."""
    import time

    import simple_dit.train

    def slow_step(*args, **kwargs):
        time.sleep(1.0)
        return real_step(*args, **kwargs)

    real_step = simple_dit.train.train_step
    monkeypatch.setattr(simple_dit.train, "train_step", slow_step)
    config = tiny_config(max_steps=0)
    config.train.minutes = 0.005  # 0.3 s: the first step ends 0.7 s past it
    run = tmp_path / "run"
    train(config, run, progress=True, device="cpu", final_samples=False)
    _, _, state = load_weights(run)
    assert state["step"] == 1 and state["train_seconds"] >= 1.0
    config.train.minutes = 0.002
    train(config, run, resume=True, progress=True, device="cpu", final_samples=False)
    assert load_weights(run)[2]["step"] == 1
    assert "s of training" in capsys.readouterr().err


@pytest.mark.parametrize(
    "preset,change,fragment",
    [
        ("dit-tiny", {"model.arch": "foo"}, "model.arch 'foo' does not match"),
        ("unet-tiny", {"model.arch": "dit"}, "model.arch 'dit' does not match"),
        ("dit-tiny", {"model.patch_size": 0}, "model.patch_size must be a positive integer"),
        ("dit-tiny", {"model.depth": 2.5}, "model.depth must be a positive integer"),
        ("dit-tiny", {"model.class_dropout_prob": 1.5}, "class_dropout_prob must be in [0, 1)"),
        ("dit-tiny", {"model.mlp_ratio": -1}, "model.mlp_ratio must be a positive number"),
        ("dit-tiny", {"model.mlp_ratio": 0.01}, "giving the MLP from 1 to"),  # 0.32 of a unit: an MLP of none
        ("dit-tiny", {"train.dataset": ["mnist"]}, "unknown dataset ['mnist']"),
        ("dit-tiny", {"train.precision": {}}, "unknown precision {}"),
        ("unet-tiny", {"model.channels": (8, 16)}, "model.channels must be three positive integers"),
        ("unet-tiny", {"model.in_channels": 3}, "has images of shape (1, 28, 28) but the model expects (3, 28, 28)"),
        ("unet-tiny", {"model.input_size": 32}, "but the model expects (1, 32, 32)"),
        ("dit-tiny", {"diffusion.beta_end": 2.0}, "0 < beta_start <= beta_end < 1"),
        ("dit-tiny", {"diffusion.num_timesteps": 0}, "num_timesteps must be an integer from 2 to 100,000"),
        ("dit-tiny", {"model.num_classes": 5}, "mnist has 10 classes but the model expects 5"),
    ],
)
def test_a_recipe_that_cannot_train_is_refused_before_the_run_directory_exists(tmp_path, preset, change, fragment):
    config = tiny_config(preset, max_steps=1)
    for path, value in change.items():
        part, name = path.split(".")
        setattr(getattr(config, part), name, value)
    with pytest.raises(UserError) as error:
        train(config, tmp_path / "run", progress=False, device="cpu")
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_the_python_api_resumes_only_the_recipe_it_saved(straight_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    before = _digests(run)
    for part, name, value in (("diffusion", "objective", "flow"), ("train", "lr", 0.5), ("train", "seed", 7), ("model", "depth", 3)):
        config = load_config(run)
        config.train.max_steps = 100
        setattr(getattr(config, part), name, value)
        with pytest.raises(UserError, match=f"different recipe \\({part}"):
            train(config, run, resume=True, progress=False, device="cpu")
    assert {k: v for k, v in _digests(run).items() if k.name != ".lock"} == {k: v for k, v in before.items() if k.name != ".lock"}

