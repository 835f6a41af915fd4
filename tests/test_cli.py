"""The ``simple-dit`` command end to end on real MNIST, and its handling of bad input.

Every failure must be one line on stderr starting with "simple-dit: error:", a non-zero exit
status, no traceback, and no change to anything on disk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MNIST_FILES, assert_user_error, run_cli, snapshot
from simple_dit.checkpoint import load_weights
from simple_dit.cli import main
from simple_dit.config import PRESETS
from simple_dit.errors import UserError

MAX_STEPS = 30


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, mnist_dir):
    """`simple-dit train` for 30 steps of dit-tiny, then `simple-dit sample` from it, on the CPU even
    where a GPU is present: these tests are of the command, and one redraws its images bit for bit."""
    root = tmp_path_factory.mktemp("cli")
    run = root / "run"
    trained = run_cli("train", "--preset", "dit-tiny", "--out", run, "--max-steps", MAX_STEPS, "--no-progress", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    # The sample step goes through the installed console script where there is one.
    script = Path(sys.executable).parent / "simple-dit"
    program = [str(script)] if script.exists() else None
    sampled = run_cli("sample", run, "--out", run / "s", "--per-class", 2, "--steps", 5, "--device", "cpu", program=program)
    assert sampled.returncode == 0, sampled.stderr
    return {"run": run, "train": trained, "sample": sampled}


@pytest.fixture
def run_copy(cli_run, tmp_path):
    """A private copy of the CLI run, free to be damaged."""
    return Path(shutil.copytree(cli_run["run"], tmp_path / "run"))


# ---- the happy path ----------------------------------------------------------------------------


def test_train_writes_a_run(cli_run):
    run, result = cli_run["run"], cli_run["train"]
    assert "Traceback" not in result.stderr
    assert str(run / "checkpoint.safetensors") in result.stdout
    for name in ("checkpoint.safetensors", "config.json", "metrics.jsonl", "samples.png"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "dit-tiny" and config["train"]["max_steps"] == MAX_STEPS
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records, "metrics.jsonl is empty"
    for record in records:
        assert isinstance(record["step"], int) and isinstance(record["loss"], float)
        assert math.isfinite(record["loss"]) and 0 < record["loss"] < 10
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and steps[-1] == MAX_STEPS


def test_sample_writes_png_npz_and_gif(cli_run):
    from PIL import Image

    run, result = cli_run["run"], cli_run["sample"]
    assert "Traceback" not in result.stderr
    for ext in ("png", "npz", "gif"):
        assert str(run / f"s.{ext}") in result.stdout

    with Image.open(run / "s.png") as png:
        png.load()
        width, height = png.size
        assert png.format == "PNG"
    # Ten labelled rows of two 28x28 digits (drawn at least at natural size).
    assert height >= 10 * 28 and width >= 2 * 28
    assert width < 2000 and height < 2000

    with np.load(run / "s.npz") as npz:
        arr, labels = npz["arr_0"], npz["labels"]
    assert arr.dtype == np.uint8 and arr.shape == (20, 28, 28, 1)
    assert labels.dtype == np.int64 and labels.tolist() == [k for k in range(10) for _ in range(2)]
    assert arr.std() > 0 and len(np.unique(arr.reshape(20, -1), axis=0)) == 20  # twenty different images

    with Image.open(run / "s.gif") as gif:
        assert gif.format == "GIF"
        assert gif.n_frames >= 3


def test_sample_replaces_its_files_as_one_set(run_copy):
    """A second `sample` to the same --out replaces the grid and the arrays, and removes the
    animation of the first where it makes none: no gif of other images is left beside them."""
    out = run_copy / "s"
    before = {ext: (run_copy / f"s.{ext}").read_bytes() for ext in ("png", "npz")}
    again = run_cli("sample", run_copy, "--out", out, "--per-class", 2, "--steps", 5, "--seed", 7, "--no-gif", "--device", "cpu")
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == [str(run_copy / "s.png"), str(run_copy / "s.npz")]
    assert all((run_copy / f"s.{ext}").read_bytes() != old for ext, old in before.items())
    assert not (run_copy / "s.gif").exists()
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no staging left


def test_sample_files_match_the_python_api(cli_run):
    """The CLI's npz holds exactly the images Pipeline produces for the same arguments."""
    from simple_dit.sample import Pipeline

    pipe = Pipeline.from_pretrained(cli_run["run"], device="cpu")  # where the CLI sampled
    labels = torch.arange(10).repeat_interleave(2)
    images = pipe(labels, steps=5, seed=0)  # the CLI's default guidance is the API's
    with np.load(cli_run["run"] / "s.npz") as npz:
        assert np.array_equal(npz["arr_0"], images.permute(0, 2, 3, 1).numpy())


def test_list_presets_names_every_preset(capsys):
    """Every preset gets a row with its shape, parameter count, GFLOPs, lr, batch and description."""
    from simple_dit.models import parameters_and_gflops

    assert main(["--list-presets"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| preset")]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == list(PRESETS)
    for row, config in zip(rows, PRESETS.values()):
        cells = [c.strip() for c in row.split("|")[1:-1]]
        n_params, gflops = parameters_and_gflops(config.model)
        assert cells[1].startswith("DiT" if config.model.arch == "dit" else "UNet")
        assert cells[2] == f"{n_params / 1e6:.2f}" and n_params > 0
        assert cells[3] == f"{gflops:.3f}" and gflops > 0
        assert cells[4:] == [f"{config.train.lr:g}", str(config.train.batch_size), config.description]


@pytest.mark.parametrize("preset", ["dit-tiny", "unet-tiny"])
def test_sizes_counted_on_the_meta_device_are_those_of_the_real_network(preset):
    from simple_dit.config import get_preset
    from simple_dit.models import build_model, count_parameters, forward_gflops, parameters_and_gflops

    config = get_preset(preset).model
    model = build_model(config)
    assert parameters_and_gflops(config) == (count_parameters(model), forward_gflops(model, config.input_size))


def test_forward_gflops_of_a_tiny_model():
    from simple_dit.config import get_preset
    from simple_dit.models import build_model, forward_gflops

    model = build_model(get_preset("dit-tiny").model).train()
    flops = forward_gflops(model)
    assert model.training  # mode restored
    # Two FLOPs per weight of every per-token linear map (patch embedding, attention, MLP, output)
    # for each of the 16 tokens, plus a little for attention scores and the conditioning path.
    per_token = sum(
        p.numel() for name, p in model.named_parameters()
        if name.endswith("weight") and any(k in name for k in ("x_embedder", "attn.", "mlp.fc", "final_layer.linear"))
    )  # fmt: skip
    assert per_token > 20_000
    assert 2 * 16 * per_token / 1e9 <= flops <= 1.5 * 2 * 16 * per_token / 1e9


# ---- bad input, through the real command -------------------------------------------------------


def test_corrupt_data_file_is_named_with_its_expected_md5(mnist_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in MNIST_FILES:
        shutil.copy(mnist_dir / name, data / name)
    bad = data / "train-images-idx3-ubyte.gz"
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    before = snapshot(data)
    out = tmp_path / "run"
    result = run_cli("train", "--preset", "dit-tiny", "--out", out, "--max-steps", 5, "--data-dir", data, "--no-progress")
    assert_user_error(result, str(bad), "f68b3c2dcbeaaa9fbdd348bbdeb94873")
    assert snapshot(data) == before  # the bad file is reported, not deleted or replaced
    assert not (out / "checkpoint.safetensors").exists() and not (out / "config.json").exists()


def test_label_out_of_range(cli_run, tmp_path):
    before = snapshot(cli_run["run"])
    result = run_cli("sample", cli_run["run"], "--out", tmp_path / "x", "--labels", "3,12", "--steps", 2)
    assert_user_error(result, "12", "0..9")
    assert list(tmp_path.iterdir()) == []
    assert snapshot(cli_run["run"]) == before


def test_unknown_preset(tmp_path):
    result = run_cli("train", "--preset", "dit-huge", "--out", tmp_path / "r", "--max-steps", 1)
    assert_user_error(result, "dit-huge", "dit-tiny")
    assert not (tmp_path / "r").exists()


def _corrupt(path: Path, kind: str) -> None:
    blob = path.read_bytes()
    if kind == "header":  # garbage over the start of the JSON header
        damaged = bytearray(blob)
        damaged[8:72] = b"#" * 64
        path.write_bytes(bytes(damaged))
    elif kind == "garbage":  # not a safetensors file at all
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":  # cut in half, as by a full disk
        path.write_bytes(blob[: len(blob) // 2])
    else:
        raise ValueError(kind)


@pytest.mark.parametrize(
    "kind,command,how",
    [
        ("header", "sample", "subprocess"),
        ("truncated", "resume", "subprocess"),
        # The same code paths again, without paying for a new interpreter each time.
        ("header", "resume", "in-process"),
        ("garbage", "sample", "in-process"),
        ("garbage", "resume", "in-process"),
        ("truncated", "sample", "in-process"),
    ],
)
def test_damaged_checkpoint(run_copy, kind, command, how, capsys):
    ckpt = run_copy / "checkpoint.safetensors"
    _corrupt(ckpt, kind)
    before = snapshot(run_copy)
    if command == "sample":
        argv = ["sample", run_copy, "--out", run_copy / "s2", "--per-class", 1, "--steps", 2]
    else:
        argv = ["train", "--resume", "--out", run_copy, "--max-steps", MAX_STEPS + 10, "--no-progress"]
    if how == "subprocess":
        assert_user_error(run_cli(*argv), str(ckpt), "corrupt or truncated")
    else:
        assert main([str(a) for a in argv]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("simple-dit: error:"), err
        assert str(ckpt) in err[0] and "corrupt or truncated" in err[0]
    assert snapshot(run_copy) == before


def test_unwritable_output(cli_run, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file, not a directory\n")
    result = run_cli("train", "--preset", "dit-tiny", "--out", blocker / "run", "--max-steps", 1, "--no-progress")
    assert_user_error(result, str(blocker / "run"))
    # The same check in `sample`, in-process.
    argv = ["sample", str(cli_run["run"]), "--out", str(blocker / "sub" / "s"), "--per-class", "1", "--steps", "2"]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simple-dit: error:") and str(blocker / "sub") in err[0], err
    assert blocker.read_text() == "a regular file, not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_eval_of_several_guidances_fails_before_sampling_where_it_cannot_record_the_pick(cli_run, monkeypatch, capsys):
    import simple_dit.io
    from simple_dit.sample import Pipeline

    def read_only(directory):
        raise UserError(f"cannot write to {directory}: Read-only file system")

    monkeypatch.setattr(simple_dit.io, "ensure_writable_dir", read_only)
    monkeypatch.setattr(Pipeline, "__call__", lambda *a, **k: pytest.fail("sampled before checking where to write"))
    assert main(["eval", str(cli_run["run"]), "--n", "6", "--guidance", "1,2"]) == 2
    assert "Read-only file system" in capsys.readouterr().err


def test_resume_takes_the_command_that_started_the_run(run_copy):
    assert main(["train", "--preset", "dit-tiny", "--out", str(run_copy), "--resume", "--max-steps", str(MAX_STEPS + 2), "--no-progress",
                 "--device", "cpu"]) == 0
    # The recipe given again with its saved values; how the run is watched and run may change.
    recipe = ["--lr", "0.001", "--batch-size", "32", "--seed", "0", "--objective", "eps", "--dataset", "mnist"]
    watch = ["--sample-every", "0", "--checkpoint-every", "3", "--precision", "fp32", "--device", "cpu"]
    assert main(["train", "--out", str(run_copy), "--resume", "--max-steps", str(MAX_STEPS + 4), "--no-progress", *recipe, *watch]) == 0
    config = json.loads((run_copy / "config.json").read_text())
    assert config["train"]["sample_every"] == 0 and config["train"]["checkpoint_every"] == 3 and config["train"]["precision"] == "fp32"
    assert load_weights(run_copy)[2]["step"] == MAX_STEPS + 4


def test_a_compiled_run_resumes_eager_with_no_compile(run_copy, monkeypatch):
    """--compile may change on resume, as README says; a run started compiled had no way back."""
    import simple_dit.train as training

    config = json.loads((run_copy / "config.json").read_text())
    config["train"]["compile"] = True  # as a run started with --compile records it
    (run_copy / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(training, "compile_model", lambda *a, **k: pytest.fail("compiled after --no-compile"))
    assert main(["train", "--out", str(run_copy), "--resume", "--no-compile", "--max-steps", str(MAX_STEPS + 1), "--no-progress", "--device", "cpu"]) == 0
    assert json.loads((run_copy / "config.json").read_text())["train"]["compile"] is False


def test_a_compile_time_logged_by_a_killed_attempt_is_not_kept_beside_the_next_ones(tmp_path):
    from simple_dit.logger import truncate_metrics

    records = [{"step": 0, "compile_seconds": 30.0}, {"step": 5, "loss": 0.5}, {"step": 5, "compile_seconds": 31.0}, {"step": 6, "loss": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    truncate_metrics(tmp_path, 5)  # resuming from the checkpoint of step 5, which compiles again
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == records[:2]


def test_the_package_lists_and_loads_its_public_names_and_modules_on_first_use():
    code = ("import sys, simple_dit; assert 'torch' not in sys.modules; assert {'Pipeline', 'get_preset'} <= set(dir(simple_dit)); "
            "assert simple_dit.config.get_preset('dit-tiny').preset == 'dit-tiny' and simple_dit.Pipeline.__name__ == 'Pipeline'")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_training_into_an_existing_run_needs_resume(run_copy):
    before = snapshot(run_copy)
    result = run_cli("train", "--preset", "dit-tiny", "--out", run_copy, "--max-steps", 5, "--no-progress")
    assert_user_error(result, str(run_copy), "--resume")
    assert snapshot(run_copy) == before


def test_resume_without_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("train", "--resume", "--out", tmp_path / "empty", "--max-steps", 5, "--no-progress")
    assert_user_error(result, "no checkpoint", str(tmp_path / "empty"))
    assert list((tmp_path / "empty").iterdir()) == []


# ---- more bad input, in-process (same code path, no interpreter start-up) ----------------------


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["sample", "{run}", "--out", "{tmp}/x", "--steps", "0"], "argument --steps: must be positive, got 0"),
        (["sample", "{run}", "--out", "{tmp}/x", "--labels", "3,x"], "comma-separated integers"),
        (["sample", "{run}", "--out", "{tmp}/x", "--n", "0"], "argument --n: must be positive"),
        (["sample", "{run}", "--out", "{tmp}/x", "--per-class", "1", "--sampler", "euler", "--steps", "2"], "euler"),
        (["sample", "{run}", "--out", "{tmp}/x", "--per-class", "1", "--steps", "1001"], "1000"),
        (["sample", "{tmp}/nowhere", "--out", "{tmp}/x"], "no checkpoint"),
        (["sample", "{run}", "--out", "{tmp}/x", "--guidance-interval", "0.3"], "--guidance-interval must be two numbers"),
        (["sample", "{run}", "--out", "{tmp}/x", "--guidance-interval", "0.3,x"], "--guidance-interval must be two numbers"),
        (["sample", "{run}", "--out", "{tmp}/x", "--guidance-interval", "1,0"], "0 <= LO < HI <= 1"),
        (["train", "--preset", "dit-tiny", "--out", "{tmp}/r", "--max-steps", "0"], "--max-steps must be positive"),
        (["train", "--preset", "dit-tiny", "--out", "{tmp}/r", "--lr", "-1", "--max-steps", "1"], "--lr must be positive"),
        (["train", "--resume", "--out", "{run}", "--lr", "0.1"], "drop --lr (the run's is 0.001)"),
        (["train", "--preset", "dit-tiny", "--out", "{tmp}/r", "--ema-decay", "1", "--max-steps", "1"], "--ema-decay must be in [0, 1)"),
        (["train", "--preset", "dit-tiny", "--out", "{tmp}/r", "--warmup-steps", "-1", "--max-steps", "1"], "--warmup-steps must be 0"),
        (["sample", "{run}", "--out", "{tmp}/x", "--guidance", "nan"], "guidance must be finite and at least 0"),
        (["sample", "{run}", "--out", "{tmp}/x", "--guidance", "-5"], "guidance must be finite and at least 0"),
        (["sample", "{run}", "--out", "{tmp}/x", "--seed", str(2**64)], "seed must be an integer from 0 to"),
        (["sample", "{run}", "--out", "{tmp}", "--n", "2"], "not a directory"),
        (["sample", "{run}", "--out", "{tmp}/x.jpg", "--n", "2"], "sample writes PNG, NPZ and GIF files"),
        (["train", "--preset", "dit-tiny", "--out", "{tmp}/r", "--seed", str(2**40), "--max-steps", "1"], "--seed must be an integer"),
        (["train", "--resume", "--out", "{run}", "--preset", "unet-tiny"], "drop --preset"),
        (["train", "--resume", "--out", "{run}", "--max-steps", "1", "--no-progress"], "past the requested stop (step 1)"),
        (["train", "--preset", "dit-tiny", "--out", "{tmp}/r", "--max-steps", "1", "--device", "meta"], "unsupported device 'meta'"),
        (["eval", "{run}", "--n", "6", "--steps", "0"], "argument --steps: must be positive"),
        (["eval", "{run}", "--n", "5"], "argument --n: must be at least 6, got 5"),
        (["eval", "{run}/s.npz", "--steps", "3"], "--steps says how to draw samples from a run; an .npz holds its images already"),
        (["eval", "{run}/s.npz", "--guidance", "2"], "--guidance says how to draw samples from a run"),
        (["eval", "{run}/s.npz", "--n", "7"], "--n says how to draw samples from a run"),
        (["eval", "{run}/s.npz", "--seed", "0"], "--seed says how to draw samples from a run"),
        (["eval", "{run}/s.npz", "--device", "banana"], "--device says how to draw samples from a run"),  # it was ignored, even when no device
        (["eval", "{run}", "--n", "6", "--bootstrap", "-1"], "argument --bootstrap: must be at least 0, got -1"),
        (["sample", "{run}", "--out", "{tmp}/x", "--per-class", "0"], "argument --per-class: must be positive"),
        (["sample", "{run}", "--out", "{tmp}/x", "--batch-size", "2.5"], "argument --batch-size: must be an integer, got '2.5'"),
        (["bench", "--preset", "dit-tiny", "--repeats", "0"], "argument --repeats: must be positive"),
        (["bench", "--preset", "dit-tiny", "--runs-together", "2", "--what", "sample"], "--runs-together times training steps"),
        (["bench", "--preset", "dit-tiny", "--reference", "--precision", "bf16"], "--reference times the plain fp32 path"),
        (["export", "{run}", "--out", "{tmp}/e", "--push-to-hub", ""], "--push-to-hub takes a Hugging Face repository id"),
        (["export", "{run}", "--out", "{tmp}/e", "--push-to-hub", "bad name"], "--push-to-hub takes a Hugging Face repository id"),
        (["--list-presets", "train", "--out", "{tmp}/r"], "--list-presets lists the presets and runs nothing"),
        (["sample", "{run}/samples.png", "--out", "{tmp}/x"], "samples.png is not a simple-dit checkpoint or export"),
        (["sample", "{run}", "--out", "{tmp}/x", "--n", str(2**70)], "argument --n: must be at most 2,147,483,647"),
        (["compare", "--presets", "dit-tiny", "--budget", "64-images", "--steps", "1001", "--out", "{tmp}/c"], "steps must be between 1 and 1000"),
        (["compare", "--presets", "dit-tiny", "--budget", "64-images", "--final-n", str(2**70), "--out", "{tmp}/c"], "argument --final-n: must be at most"),
        (["bench", "--preset", "dit-tiny", "--device", "mps"], "unsupported device 'mps'"),
        (["sample", "{run}", "--out", "{tmp}/x", "--n", "2", "--device", "cpu:5"], "there is one CPU device"),
        (["sample", "{run}", "--out", "{tmp}/x", "--labels", "3,99999999999999999999"], "label 99999999999999999999 is out of range"),
        (["compare", "--presets", "dit-tiny", "--budget", "64-images", "--seeds", "0,-1", "--out", "{tmp}/c"], "each seed in --seeds"),
        (["compare", "--presets", "dit-tiny", "--budget", "64-images", "--eval-every-frac", "1e-9", "--out", "{tmp}/c"], "at most 1000 evaluations"),
        (["compare", "--presets", "dit-tiny", "--budget", "64-images", "--out", "{run}"], "holds a training run"),
        (["train", "--preset", "dit-tiny", "--out", "{tmp}/r", "--max-steps", "1", "--data-dir", "{run}/config.json"], "is not a directory"),
        (["train", "--preset", "dit-tiny", "--out", "{run}/samples/sub", "--max-steps", "1"], "is inside the training run"),
        (["train", "--preset", "dit-tiny", "--out", "{tmp}/r", "--epochs", "1e306"], "steps at batch 32, more than a run can take"),
        (["train", "--preset", "dit-tiny", "--out", "{tmp}/r", "--minutes", "3e306"], "--minutes must be at most 10,000,000"),
        (["compare", "--presets", "dit-tiny", "--budget", "1e-12s", "--out", "{tmp}/c"], "less than a second of training"),
        (["compare", "--presets", "dit-tiny", "--budget", "1-flops", "--out", "{tmp}/c"], "steps at batch 32, less than one step of training"),
        (["compare", "--presets", "dit-tiny", "--budget", "10-images", "--out", "{tmp}/c"], "0.31 steps at batch 32, less than one step"),
        # Near the counts' limit the images alone take terabytes: refused, not killed by the OOM killer.
        (["sample", "{run}", "--out", "{tmp}/x", "--n", str(2**31 - 1), "--no-gif"], "GiB, more than this machine's"),
        (["eval", "{run}", "--n", str(2**31 - 1)], "images and their labels take"),
        (["train", "--preset", "dit-tiny", "--out", "{tmp}/r", "--max-steps", "2", "--eval-every", "1", "--eval-n", "2000000000"],
         "--eval-n 2,000,000,000: its images and labels take"),
        (["sample", "{run}", "--out", "{tmp}/x", "--per-class", str(2**31 - 1), "--no-gif"], "got 21474836470"),  # not "out of memory"
        (["eval", "{run}", "--n", "6", "--dataset", "fashion-mnist"], "was trained on mnist, and is scored against it"),
        (["sample", "{run}", "--out", "{tmp}/x" + "a" * 300, "--n", "2", "--no-gif"], "File name too long"),  # exit 2, as bad input
        # Values that start with a minus are values, checked as such (argparse said "expected one argument").
        (["sample", "{run}", "--out", "{tmp}/x", "--guidance-interval", "-1,2"], "--guidance-interval must satisfy 0 <= LO < HI <= 1"),
        (["compare", "--presets", "dit-tiny", "--budget", "-5m", "--out", "{tmp}/c"], "malformed budget '-5m'"),
    ],
)
def test_more_bad_input_in_process(cli_run, tmp_path, capsys, argv, fragment):
    def files():  # but .lock, which names the last process to take the run
        return {name: digest for name, digest in snapshot(cli_run["run"]).items() if name != ".lock"}

    before = files()
    argv = [a.format(run=cli_run["run"], tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simple-dit: error:") and fragment in err[0], err
    assert files() == before
    assert not list(tmp_path.glob("x.*")) and not (tmp_path / "r" / "checkpoint.safetensors").exists()


def test_a_wrong_kind_of_path_is_named_for_what_it_is(cli_run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    export_dir, broken = tmp_path / "export", tmp_path / "broken"
    assert main(["export", str(cli_run["run"]), "--out", str(export_dir)]) == 0
    shutil.copytree(cli_run["run"], broken, ignore=shutil.ignore_patterns("checkpoint.safetensors"))
    (broken / "checkpoint.safetensors").mkdir()
    capsys.readouterr()
    for argv, fragment in (
        (["train", "--preset", "dit-tiny", "--out", a_file, "--max-steps", 1], f"{a_file} is a file, where a directory is to be written"),
        (["export", cli_run["run"], "--out", a_file], f"{a_file} is a file, where a directory is to be written"),
        (["compare", "--presets", "dit-tiny", "--budget", "64-images", "--out", a_file], f"{a_file} is a file, where a directory"),
        (["export", export_dir, "--out", tmp_path / "again"], f"{export_dir} is an export already"),
        (["sample", broken, "--out", tmp_path / "x", "--n", 2], "checkpoint.safetensors is a directory, not a checkpoint"),
    ):
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (argv, err)
    assert a_file.read_text() == "mine" and not (tmp_path / "again").exists()


def test_a_comparison_given_as_a_run_says_where_its_runs_are(tmp_path, capsys):
    (tmp_path / "compare.json").write_text("{}")
    for argv in (["sample", str(tmp_path), "--out", str(tmp_path / "x")], ["export", str(tmp_path), "--out", str(tmp_path / "e")]):
        assert main(argv) == 2
        assert f"{tmp_path} is a comparison, not a run; its runs are the directories in {tmp_path / 'runs'}" in capsys.readouterr().err


def test_export_never_writes_over_a_run(cli_run, tmp_path, capsys):
    other = tmp_path / "other-run"
    shutil.copytree(cli_run["run"], other)
    before = snapshot(other)
    assert main(["export", str(cli_run["run"]), "--out", str(other)]) == 2
    assert "holds a training run" in capsys.readouterr().err and snapshot(other) == before


@pytest.mark.parametrize("argv,fragment", [(["train", "--out", ""], "argument --out: must not be empty"),
                                           (["train", "--out", "r", "--preset", ""], "argument --preset: must not be empty"),
                                           (["sample", "--out", "x", "--device", " "], "argument --device: must not be empty"),
                                           (["train", "--out", "r", "--data-dir", ""], "argument --data-dir: must not be empty"),
                                           (["train", "--out", "r", "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
                                           (["sample", "--out", "x", "--precision", "fp16"], "argument --precision: invalid choice")])
def test_a_malformed_argument_is_one_line(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simple-dit: error:") and fragment in err[0], err


@pytest.mark.parametrize("argv,fragment", [
    # (An unknown preset, so that the code before the check failed at once too, rather than trained.)
    (["compare", "--presets", "no-such", "--lrs", "1e-3", "--budget", "64-images", "--lrs", "3e-3", "--out", "c"], "--lrs is given twice"),
    (["sample", "--out", "x", "--n", "4", "--n=5"], "--n is given twice"),  # in a group of exclusive flags too
    (["train", "--out", "r", "--preset", "no-such", "--compile", "--no-compile"], "--compile and --no-compile are both given"),
    (["train", "--out", "r", "--preset", "no-such", "--resume", "--resume"], "--resume is given twice"),
    (["train", "--out", "r", "--preset", "no-such", "--lr", "1e-3", "--lr=1e-4"], "--lr is given twice"),
    (["--list-presets", "--list-presets"], "--list-presets is given twice"),
])  # fmt: skip
def test_a_flag_given_twice_is_refused_rather_than_the_last_kept(tmp_path, monkeypatch, capsys, argv, fragment):
    """argparse keeps the last of a repeated flag without a word: "--lrs 1e-3 ... --lrs 3e-3" swept one rate."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simple-dit: error:") and fragment in err[0], err
    assert not any(tmp_path.iterdir())


def test_running_out_of_memory_is_one_line_and_other_errors_keep_their_traceback(monkeypatch, capsys):
    import simple_dit.cli

    def allocate(args):  # what PyTorch's CPU allocator raises for a batch that does not fit
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried to allocate 4799999999952 bytes")

    monkeypatch.setitem(simple_dit.cli.COMMANDS, "bench", allocate)
    assert main(["bench", "--preset", "dit-tiny"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["simple-dit: error: out of memory; ask for less at a time (--batch-size, --n, --bootstrap)"]

    def bug(args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setitem(simple_dit.cli.COMMANDS, "bench", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["bench", "--preset", "dit-tiny"])


@pytest.mark.parametrize("filename", ["/run/tb/events.out", b"/run/tb/events.out"])
def test_a_failed_write_is_one_line_whatever_type_its_file_name(monkeypatch, capsys, filename):
    """TensorBoard's writer names its files in bytes."""
    import simple_dit.cli

    def write(args):
        raise PermissionError(13, "Permission denied", filename)

    monkeypatch.setitem(simple_dit.cli.COMMANDS, "bench", write)
    assert main(["bench", "--preset", "dit-tiny"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["simple-dit: error: /run/tb/events.out: Permission denied"]


def test_under_torchrun_compare_is_refused_and_rank_0_alone_says_why(monkeypatch, tmp_path, capsys):
    argv = ["compare", "--presets", "dit-tiny", "--budget", "64-images", "--out", str(tmp_path / "c")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == said and all("compare runs in one process" in line for line in err), (rank, err)
    assert not (tmp_path / "c").exists()


def test_a_missing_extra_is_a_one_line_hint(monkeypatch, tmp_path, capsys):
    import sys as _sys

    monkeypatch.setitem(_sys.modules, "matplotlib", None)  # as if `pip install simple-dit` without [report]
    rc = main(["compare", "--presets", "dit-tiny", "--budget", "64-images", "--lrs", "1e-3", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("simple-dit: error:") and "simple-dit[report]" in err[-1]
    assert not (tmp_path / "c").exists()  # refused before any work


def test_ctrl_c_while_the_command_starts_is_one_line(monkeypatch, capsys):
    """The entry point imports nothing heavy itself, so a Ctrl-C while the CLI (and PyTorch) is
    being imported lands in its handler."""
    import importlib.abc

    from simple_dit import launch

    class InterruptedImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "simple_dit.cli":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "simple_dit.cli")
    monkeypatch.setattr(sys, "meta_path", [InterruptedImport(), *sys.meta_path])
    assert launch.main() == 130
    assert capsys.readouterr().err == "simple-dit: interrupted\n"
    started = subprocess.run([sys.executable, "-c", "import sys, simple_dit.launch; print('torch' in sys.modules)"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert started.stdout.strip() == "False", started.stderr


def test_outputs_in_the_way_and_counts_past_the_data_are_refused_before_sampling(cli_run, tmp_path, capsys):
    """Each of these used to sample first (a minute, or hours, on a real model) and fail after."""
    from simple_dit.cli import main

    def files():  # but .lock, which names the last process to take the run
        return {name: digest for name, digest in snapshot(cli_run["run"]).items() if name != ".lock"}

    (tmp_path / "o.npz").mkdir()
    (tmp_path / "p.png").mkdir()
    run = str(cli_run["run"])
    for argv, fragment in (
        (["sample", run, "--out", str(tmp_path / "o"), "--n", "3", "--steps", "2"], f"{tmp_path / 'o.npz'} is a directory"),
        (["eval", run, "--n", "6", "--guidance", "1,2", "--steps", "2", "--plot", str(tmp_path / "p.png")], "p.png is a directory"),
        (["eval", run, "--n", "60001", "--steps", "2"], "--n 60,001 is more than the 60,000 training images"),
        (["serve", run, "--host", ""], "argument --host: must not be empty"),
        (["sample", run, "--out", f"{run}/samples.png", "--n", "3"], "samples.png is the run's own final grid"),
        (["eval", run, "--n", "6", "--guidance", "1,2", "--steps", "2", "--plot", f"{run}/samples.png"], "samples.png is the run's own final grid"),
        (["eval", run, "--n", "6", "--guidance", "1,2", "--steps", "2", "--plot", f"{run}/samples/step_0000005.png"], "is one of the run's grids"),
        (["sample", run, "--out", f"{run}/samples/step_0000005", "--n", "3"], "is one of the run's grids"),
    ):
        before = files()
        rc = main(argv)
        assert_user_error(subprocess.CompletedProcess(argv, rc, *capsys.readouterr()), fragment)
        assert files() == before and not (tmp_path / "o.png").exists()
