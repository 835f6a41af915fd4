"""Bad input through the Python API: a UserError naming the argument, before anything is written.

Found by an audit of the public entry points (train, Pipeline, compare, export): each case here
used to end in an error from deep inside Python or torch, in a silent misreading, or after files
had been written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import devices, snapshot, tiny_config

from simple_dit import compare as C
from simple_dit.config import get_preset
from simple_dit.errors import UserError
from simple_dit.export import export
from simple_dit.models import build_model
from simple_dit.sample import Pipeline
from simple_dit.train import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mnist_dir):
    run = tmp_path_factory.mktemp("api") / "run"
    train(tiny_config(max_steps=2), run, data_dir=str(mnist_dir), device="cpu", progress=False)
    return run


def unchanged(run: Path):
    return {k: v for k, v in snapshot(run).items() if k != ".lock"}


@pytest.mark.parametrize("flags", [{"resume": "no"}, {"resume": 1}, {"progress": "no"}, {"final_samples": "False"}])
def test_train_refuses_a_flag_that_is_not_a_bool(tiny_run, mnist_dir, flags):
    """resume="no" is truthy: it used to train the run on."""
    before = unchanged(tiny_run)
    with pytest.raises(UserError, match=f"{next(iter(flags))} must be True or False"):
        train(tiny_config(max_steps=4), tiny_run, data_dir=str(mnist_dir), device="cpu", **flags)
    assert unchanged(tiny_run) == before


@pytest.mark.parametrize("config", [None, "dit-tiny", get_preset("dit-tiny").to_dict()])
def test_train_refuses_what_is_not_a_run_config(tmp_path, config):
    with pytest.raises(UserError, match="expected a RunConfig"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value", [("preset", 5), ("description", None)])
def test_train_refuses_a_preset_name_or_description_that_is_not_a_string(tmp_path, field, value):
    """It used to be written into config.json as given, and the run's reports to name preset 5."""
    config = tiny_config(max_steps=1)
    setattr(config, field, value)
    with pytest.raises(UserError, match="preset and description are strings"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_wandb_project_that_is_not_a_name(tmp_path, mnist_dir):
    with pytest.raises(UserError, match="--wandb takes a W&B project name"):
        train(tiny_config(max_steps=1), tmp_path / "run", data_dir=str(mnist_dir), device="cpu", wandb=5)
    assert not (tmp_path / "run").exists()


def test_a_pipeline_refuses_a_dit_built_for_another_image_size():
    """The positions are a buffer, not saved with the weights; the network failed at its first call."""
    config = get_preset("dit-tiny")
    config.model.input_size = 14
    with pytest.raises(UserError, match="pos_embed is"):
        Pipeline(config, build_model(get_preset("dit-tiny").model))


def test_a_pipeline_refuses_a_model_without_values():
    """A network built on the meta device failed inside torch's .to()."""
    config = get_preset("dit-tiny")
    with torch.device("meta"):
        model = build_model(config.model)
    with pytest.raises(UserError, match="on the meta device"):
        Pipeline(config, model)


def test_a_pipeline_keeps_its_own_config():
    config = get_preset("dit-tiny")
    pipe = Pipeline(config, build_model(config.model))
    config.model.input_size = 14  # the caller's object, edited afterwards
    assert pipe.config.model.input_size == 28 and pipe([1], steps=1).shape == (1, 1, 28, 28)


@pytest.mark.parametrize("names", ["abcdefghij", 5])
def test_a_pipeline_refuses_class_names_given_as_one_string_or_a_number(names):
    config = get_preset("dit-tiny")
    with pytest.raises(UserError, match="class_names is a sequence of names"):
        Pipeline(config, build_model(config.model), class_names=names)


def test_a_pipeline_call_refuses_a_progress_that_is_not_a_bool():
    config = get_preset("dit-tiny")
    with pytest.raises(UserError, match="progress must be True or False"):
        Pipeline(config, build_model(config.model))([1], steps=2, progress="no")


def test_a_model_source_that_cannot_be_read_is_one_line():
    with pytest.raises(UserError, match="cannot read .*File name too long"):
        Pipeline.from_pretrained("/tmp/" + "a" * 5000)


@pytest.mark.parametrize("objective", ["eps", "flow"])
def test_a_billion_sampler_steps_are_refused_before_sampling(objective):
    config = get_preset("dit-tiny")
    config.diffusion.objective = objective
    sampler = "euler" if objective == "flow" else "ddim"
    with pytest.raises(UserError, match="steps must be between 1 and 1000"):
        Pipeline(config, build_model(config.model))([1], steps=10**9, sampler=sampler)


def test_a_guidance_that_overflows_is_refused_after_one_step_not_every_batch():
    """(A flow model: epsilon samplers clip their x0 estimates, which keeps even this finite.)"""
    config = get_preset("dit-tiny")
    config.diffusion.objective = "flow"
    model = build_model(config.model)
    for p in model.parameters():  # adaLN-Zero's zeros would make every label's prediction the same
        torch.nn.init.normal_(p, std=0.1)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))  # the sampling copy keeps it
    with pytest.raises(UserError, match="non-finite values .* or guidance 1e.308 is too large"):
        Pipeline(config, model, precision="fp32")(list(range(10)) * 4, steps=20, guidance=1e308, batch_size=10)
    assert len(calls) == 1  # one guided evaluation (both halves in one batch) of the first of four batches


@pytest.mark.parametrize("kwargs, fragment", [
    ({"meter": "x"}, "meter must be an evaluate.QualityMeter"), ({"log": 5}, "log must be a function"),
    ({"dataset": ["mnist"]}, "unknown dataset"), ({"wandb": 5}, "--wandb takes a W&B project name"),
    ({"objectives": "flow", "steps": 10**9}, "steps must be between 1 and 1000"),
])  # fmt: skip
def test_compare_refuses_bad_arguments_before_writing_anything(tmp_path, kwargs, fragment):
    if "wandb" in kwargs:
        pytest.importorskip("wandb")
    with pytest.raises(UserError, match=fragment):
        C.compare("dit-tiny", "64-images", tmp_path / "cmp", device="cpu", **kwargs)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("presets", [None, 123])
def test_compare_names_presets_that_are_not_names(tmp_path, presets):
    with pytest.raises(UserError, match="--presets takes comma-separated preset names"):
        C.compare(presets, "64-images", tmp_path / "cmp")


def test_compare_inside_a_training_run_writes_nothing_there(tiny_run):
    before = unchanged(tiny_run)
    with pytest.raises(UserError, match="is inside the training run"):
        C.compare("dit-tiny", "64-images", tiny_run / "cmp", device="cpu")
    assert unchanged(tiny_run) == before and not (tiny_run / "cmp").exists()


def test_export_refuses_a_comparison_and_arguments_of_the_wrong_kind(tiny_run, tmp_path):
    comparison = tmp_path / "cmp"
    comparison.mkdir()
    (comparison / C.SETTINGS_NAME).write_text(json.dumps({}))
    with pytest.raises(UserError, match="holds a comparison"):
        export(tiny_run, comparison)
    assert sorted(p.name for p in comparison.iterdir()) == [C.SETTINGS_NAME]
    with pytest.raises(UserError, match="unknown --dtype"):
        export(tiny_run, tmp_path / "e", dtype=["fp32"])
    with pytest.raises(UserError, match="export metadata is a dict"):
        export(tiny_run, tmp_path / "e", metadata="x")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("kwargs, fragment", [
    ({"guidance": 2.0, "guidances": "1,3"}, "not both"), ({"eval_every_frac": True}, "--eval-every-frac must be in"),
])  # fmt: skip
def test_compare_refuses_arguments_it_would_misread(tmp_path, kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        C.compare("dit-tiny", "64-images", tmp_path / "cmp", device="cpu", **kwargs)
    assert not (tmp_path / "cmp").exists()


def test_a_pipeline_refuses_booleans_among_labels_and_empty_class_names():
    config = get_preset("dit-tiny")
    pipe = Pipeline(config, build_model(config.model))
    with pytest.raises(UserError, match="not True or False"):
        pipe([3, True], steps=1)
    with pytest.raises(UserError, match="must name the model's 10 classes, got 0"):
        Pipeline(config, build_model(config.model), class_names=[])


def test_a_data_dir_that_is_not_a_path_is_named(tmp_path):
    with pytest.raises(UserError, match="data_dir must be a path, got int"):
        train(tiny_config(max_steps=1), tmp_path / "run", data_dir=5, device="cpu")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", devices)
def test_a_grid_takes_images_on_any_device(tmp_path, device):
    config = get_preset("dit-tiny")
    pipe = Pipeline(config, build_model(config.model))
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8, device=device)
    assert pipe.save_grid(images, [3, 7], tmp_path / "g.png").stat().st_size > 0


@pytest.mark.parametrize("images, fragment", [
    (torch.zeros(2, 5, 28, 28, dtype=torch.uint8), "got 5 channels"),
    (torch.zeros(2, 1, 28, 28, dtype=torch.uint8, device="meta"), "on meta"),
])  # fmt: skip
def test_a_grid_names_images_it_cannot_draw(tmp_path, images, fragment):
    """PIL's "Cannot handle this data type" and torch's meta errors, before."""
    config = get_preset("dit-tiny")
    pipe = Pipeline(config, build_model(config.model))
    with pytest.raises(UserError, match=fragment):
        pipe.save_grid(images, [3, 7], tmp_path / "g.png")
    assert not list(tmp_path.iterdir())


def test_a_path_with_a_nul_character_is_named(tmp_path):
    config = get_preset("dit-tiny")
    pipe = Pipeline(config, build_model(config.model))
    with pytest.raises(UserError, match="NUL character"):
        pipe.save_grid(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), [3], str(tmp_path / "a\0b.png"))
