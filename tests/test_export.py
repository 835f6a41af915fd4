"""simple-dit export (the EMA weights alone, in the Hugging Face layout), loading exports back, and
the default model shipped in the package."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from conftest import assert_user_error, run_cli, snapshot, tiny_config

from simple_dit.checkpoint import CHECKPOINT_NAME
from simple_dit.cli import main
from simple_dit.export import MODEL_NAME, default_model_path, export, load_export
from simple_dit.sample import Pipeline
from simple_dit.train import train

LABELS = torch.arange(10).repeat(2)


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_dir):
    """dit-tiny after 30 steps: enough for its EMA to differ from the raw weights."""
    run = tmp_path_factory.mktemp("export") / "run"
    train(tiny_config(max_steps=30), run, progress=False, device="cpu", final_samples=False)
    return run


def draw(pipe: Pipeline) -> torch.Tensor:
    return pipe(LABELS, steps=4, seed=0)


@pytest.fixture
def cli(capsys):
    """``simple-dit ARGS`` in this process (no interpreter start-up), as a CompletedProcess."""

    def run(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out, err)

    return run


def test_layout_and_fp32_round_trip_gives_identical_images(run, tmp_path):
    from safetensors import safe_open

    out = export(run, tmp_path / "exported")
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.json", MODEL_NAME]
    assert json.loads((out.parent / "config.json").read_text()) == json.loads((run / "config.json").read_text())
    with safe_open(str(out), framework="pt") as f:  # the model's own parameter names, nothing else
        keys, dtypes, meta = set(f.keys()), {f.get_tensor(k).dtype for k in f.keys()}, f.metadata()
    reference = Pipeline.from_pretrained(run, device="cpu")  # every draw on the CPU: the images are compared bit for bit
    assert keys == set(reference.model.state_dict()) and dtypes == {torch.float32}
    assert meta["dtype"] == "fp32" and meta["weights"] == "ema" and json.loads(meta["train_state"])["step"] == 30
    loaded = Pipeline.from_pretrained(out.parent, device="cpu")
    for name, value in reference.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert torch.equal(draw(loaded), draw(reference))
    assert torch.equal(draw(Pipeline.from_pretrained(out, device="cpu")), draw(reference))  # the weights file alone carries its config
    renamed = shutil.copyfile(run / "checkpoint.safetensors", tmp_path / "renamed.safetensors")  # a checkpoint by any name
    assert torch.equal(draw(Pipeline.from_pretrained(renamed, device="cpu")), draw(reference))
    assert not torch.equal(draw(Pipeline.from_pretrained(run, use_ema=False, device="cpu")), draw(reference))  # it is the EMA


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_exports_are_half_the_size_and_load_as_fp32_with_close_images(run, tmp_path, dtype):
    full, half = export(run, tmp_path / "fp32"), export(run, tmp_path / dtype, dtype=dtype)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    config, weights, meta = load_export(half.parent)
    assert meta["dtype"] == dtype and {v.dtype for v in weights.values()} == {torch.float32}
    a, b = draw(Pipeline.from_pretrained(full.parent, device="cpu")).float(), draw(Pipeline.from_pretrained(half.parent, device="cpu")).float()
    assert (a - b).abs().mean() < 2.0  # of 255


def test_cli_export_then_sample_and_eval_load_it(run, tmp_path, cli):
    out = tmp_path / "exported"
    result = run_cli("export", run, "--out", out, "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"exported: {out / MODEL_NAME}"
    sampled = cli("sample", out, "--out", tmp_path / "grid", "--per-class", 1, "--steps", 2, "--no-gif", "--device", "cpu")
    assert sampled.returncode == 0, sampled.stderr
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "grid.npz").is_file()
    # eval goes through the same loader (scoring takes a while, so only the loading is checked here).
    assert_user_error(cli("eval", out, "--no-ema"), str(out), "only the EMA weights")


def test_export_copies_the_guidance_picked_for_the_run(run, tmp_path):
    source = shutil.copytree(run, tmp_path / "run")
    (source / "guidance.json").write_text(json.dumps({"guidance": 1.5}))
    export(source, tmp_path / "exported")
    assert Pipeline.from_pretrained(tmp_path / "exported").guidance == 1.5


def test_an_export_replaces_an_earlier_export_and_nothing_else(run, tmp_path):
    from simple_dit.errors import UserError

    picked = shutil.copytree(run, tmp_path / "picked")
    (picked / "guidance.json").write_text(json.dumps({"guidance": 1.5}))
    out = tmp_path / "exported"
    export(picked, out)
    export(run, out)  # a run without a pick: the export samples at the default, not at the replaced one's pick
    assert Pipeline.from_pretrained(out).guidance == Pipeline.from_pretrained(run).guidance
    (out / "README.md").write_text("a model card")  # e.g. a Hugging Face clone: other files stay
    for killed in (".model.safetensors.a1b2c3d4.tmp", ".tmpAbC123"):  # what an export killed mid-write leaves (ours, safetensors')
        (out / killed).write_bytes(b"half a file")
    export(run, out)
    assert (out / "README.md").read_text() == "a model card"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    (out / "config.json").unlink()
    (out / "config.json").mkdir()
    before = (out / MODEL_NAME).read_bytes()
    with pytest.raises(UserError, match="config.json is a directory where the export writes a file"):
        export(picked, out)
    assert (out / MODEL_NAME).read_bytes() == before and not (out / "guidance.json").exists()
    (out / "config.json").rmdir()
    own = tmp_path / "own"
    own.mkdir()
    (own / "config.json").write_text("{}")
    for metadata, where in ((None, own), ({"a": 1}, tmp_path / "m1"), ({"format": "x"}, tmp_path / "m2")):
        with pytest.raises(UserError):
            export(run, where, metadata=metadata)
    assert (own / "config.json").read_text() == "{}" and not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()
    for source in (5, "", ["a"]):
        with pytest.raises(UserError, match="a model source is"):
            Pipeline.from_pretrained(source)


def test_a_second_export_into_a_directory_being_written_is_refused(run, tmp_path):
    """Without a lock file (a Hub clone would push it): the directory itself is locked."""
    import fcntl
    import os

    from simple_dit.errors import UserError

    out = tmp_path / "exported"
    export(run, out)
    before = snapshot(out)
    fd = os.open(out, os.O_RDONLY)  # as an export in flight holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another export is writing into"):
            export(run, out)
    finally:
        os.close(fd)
    assert snapshot(out) == before
    export(run, out)  # free again
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_an_export_is_readable_as_every_file_the_package_writes(run, tmp_path):
    """safetensors creates its file 0600: an export, the file meant to be shared, was its owner's alone."""
    import stat

    from simple_dit.io import _UMASK  # the process's umask, as every file the package writes takes it

    export(run, tmp_path / "exported")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "exported").iterdir()}
    assert modes == {"config.json": 0o666 & ~_UMASK, "model.safetensors": 0o666 & ~_UMASK}


def test_bad_input_is_one_line(run, tmp_path, cli):
    assert_user_error(cli("export", tmp_path / "missing", "--out", tmp_path / "x"), "no checkpoint", str(tmp_path / "missing"))
    assert_user_error(cli("export", run, "--out", tmp_path / "x", "--dtype", "int8"), "--dtype 'int8'", "fp32, fp16, bf16")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory\n")
    assert_user_error(cli("export", run, "--out", blocker / "sub"), str(blocker / "sub"))
    assert_user_error(cli("export", run, "--out", run), "run directory itself")
    assert not (tmp_path / "x").exists() and not (run / MODEL_NAME).exists()
    before = snapshot(run)
    for inside in (run / "samples", run / "tb", run / "new" / "deeper"):
        assert_user_error(cli("export", run, "--out", inside), "is inside the training run", str(run.resolve()))
    assert snapshot(run) == before and not (run / "new").exists()
    # A damaged export.
    out = export(run, tmp_path / "damaged")
    out.write_bytes(out.read_bytes()[:-100])
    assert_user_error(cli("sample", out.parent, "--out", tmp_path / "s", "--no-gif"), str(out), "corrupt or truncated")
    (out.parent / MODEL_NAME).write_bytes(b"not a safetensors file")
    assert_user_error(cli("sample", out.parent, "--out", tmp_path / "s", "--no-gif"), "corrupt or truncated")
    (out.parent / MODEL_NAME).unlink()
    assert_user_error(cli("sample", out.parent, "--out", tmp_path / "s", "--no-gif"), "neither an export's model.safetensors nor a run's")
    assert not list(tmp_path.glob("s.*"))


def test_an_export_that_could_not_sample_is_refused(run, tmp_path, cli):
    from safetensors.torch import load_file, save_file

    damaged = Path(shutil.copytree(run, tmp_path / "nan-run"))
    (damaged / "guidance.json").write_text("{not json")
    assert_user_error(cli("export", damaged, "--out", tmp_path / "x"), "guidance.json is damaged")
    (damaged / "guidance.json").unlink()
    path = damaged / CHECKPOINT_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors["ema.final_layer.linear.weight"][0, 0] = float("nan")  # as a diverged run would leave it
    save_file(tensors, str(path), metadata=metadata)
    assert_user_error(cli("export", damaged, "--out", tmp_path / "x"), "not all finite")
    tensors["ema.final_layer.linear.weight"][0, 0] = 1e6  # finite, but past fp16's 65504
    save_file(tensors, str(path), metadata=metadata)
    assert_user_error(cli("export", damaged, "--out", tmp_path / "x", "--dtype", "fp16"), "do not fit in fp16")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("edit", [
    lambda c: c["model"].update(hidden_size="32"), lambda c: c["model"].update(mlp_ratio=float("nan")),
    lambda c: c["model"].update(num_classes=2**70), lambda c: c["diffusion"].update(num_timesteps=float("inf")),
    lambda c: c.update(model="abc"), lambda c: c["diffusion"].update(objective="flow"), lambda c: c["diffusion"].update(num_timesteps=10),
])  # fmt: skip
def test_a_hand_edited_export_config_is_one_line(run, tmp_path, cli, edit):
    """config.json is checked as a run's recipe is, and against the config the weights were
    exported with (a valid but different one drew noise before)."""
    out = export(run, tmp_path / "edited").parent
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    assert_user_error(cli("sample", out, "--out", tmp_path / "s", "--no-gif"), str(out / "config.json"), "export it again")
    assert not list(tmp_path.glob("s.*"))


def test_push_to_hub_without_huggingface_hub_is_one_line_before_writing(run, tmp_path, monkeypatch, cli):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` now raises ImportError
    out = tmp_path / "exported"
    line = assert_user_error(cli("export", run, "--out", out, "--push-to-hub", "someone/simple-dit-mnist"))
    assert line == "simple-dit: error: --push-to-hub needs huggingface_hub, which is not installed: pip install 'simple-dit[hub]'"
    assert not out.exists()


# ---- the default model --------------------------------------------------------------------------


def test_default_model_draws_the_digits_asked_for(mnist_dir):
    from simple_dit.evaluate import classify, load_evaluator

    pipe = Pipeline.from_pretrained(device="cpu")  # both pipelines on the CPU: their images are compared bit for bit
    assert pipe.config.preset == "dit-mini"
    labels = torch.arange(100) % 10
    images = pipe(labels, steps=5, seed=0)  # 5 Euler steps score like 20 on dit-mini (BENCHMARKS.md)
    evaluator, _ = load_evaluator("mnist", progress=False)
    accuracy = (classify(evaluator, images) == labels).float().mean().item()
    assert accuracy >= 0.9, accuracy  # 1.0 when it was shipped (fp32 and bf16 sampling)
    assert torch.equal(Pipeline.from_pretrained("default", device="cpu")(labels[:4], steps=2), pipe(labels[:4], steps=2))


def test_default_model_says_how_it_was_trained():
    _, weights, meta = load_export(default_model_path())
    assert meta["dtype"] in ("fp16", "bf16") and default_model_path().stat().st_size < 8 * 2**20
    train_state = json.loads(meta["train_state"])
    assert train_state["step"] > 1000 and json.loads(meta["config"])["preset"] == "dit-mini"
    for key in ("trained_with", "machine", "trained_on", "scores"):
        assert meta[key], key


def test_sample_without_a_run_uses_the_default_model(tmp_path, cli):
    assert cli("sample", "--out", tmp_path / "grid", "--per-class", 1, "--steps", 2, "--no-gif", "--device", "cpu").returncode == 0
    assert (tmp_path / "grid.png").is_file()
    with np.load(tmp_path / "grid.npz") as f:
        assert f["arr_0"].shape == (10, 28, 28, 1)
