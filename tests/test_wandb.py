"""Weights & Biases logging (``train --wandb``), offline and without network: WANDB_MODE=offline
writes the W&B run into the run directory, and these tests read its transaction log
(``run-ID.wandb``, LevelDB log framing around wandb's protobuf records) back record by record."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import struct
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_config

from simple_dit.cli import main
from simple_dit.errors import UserError
from simple_dit.logger import WANDB_RUN_NAME, RunLogger, WandbOptions
from simple_dit.train import train

TRAIN_KEYS = {"train/loss", "train/grad_norm", "train/lr", "train/images_per_s"}
EVAL_KEYS = {"eval/fid", "eval/label_accuracy", "eval/precision", "eval/recall"}

# The machines that run scripts/gpu-check.sh have PyTorch but not the extras; CI installs them.
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install 'simple-dit[wandb]')")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's output capture alone
    monkeypatch.delenv("WANDB_DIR", raising=False)


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file (32 KiB blocks of CRC'd chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def offline_runs(run_dir: Path, run_id: str) -> list[dict]:
    """Per offline W&B run of ``run_id`` under ``run_dir/wandb``, oldest first: its run record's
    project, group and config, and its history rows as {key: value}."""
    runs = []
    for path in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        # wandb's service process may still be flushing the log when finish() has returned (seen
        # once on a loaded machine): read again until the run record is there.
        deadline = time.monotonic() + 20
        while True:
            run, history = None, []
            for record in wandb_records(path):
                kind = record.WhichOneof("record_type")
                if kind == "run":
                    run = record.run
                elif kind == "history":
                    history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
            if run is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert run is not None, f"{path} has no run record"
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        runs.append({"dir": path.parent, "project": run.project, "group": run.run_group, "config": config, "history": history})
    return runs


def steps_with(history: list[dict], key: str) -> list[int]:
    return [row["step"] for row in history if key in row]


@dataclasses.dataclass
class FakeScores:
    n: int
    fid: float = 12.5
    precision: float = 0.5
    recall: float = 0.25
    label_accuracy: float = 0.75


class FakeMeter:
    """Stands in for the evaluator (which takes seconds to set up): the logging is under test."""

    def __init__(self, *args, **kwargs):
        pass

    def score(self, images, labels=None, **kwargs):
        return FakeScores(n=len(images))

    def floor(self, n, **kwargs):
        return FakeScores(n=n, fid=0.5, precision=1.0, recall=1.0, label_accuracy=1.0)


@needs_wandb
def test_train_logs_config_metrics_evaluations_and_grids_and_resume_continues_the_run(tmp_path, mnist_dir, monkeypatch):
    import simple_dit.evaluate

    monkeypatch.setattr(simple_dit.evaluate, "QualityMeter", FakeMeter)
    run = tmp_path / "run"
    config = tiny_config(max_steps=12)
    config.train.log_every, config.train.sample_every, config.train.eval_every, config.train.eval_n = 5, 10, 10, 6
    train(config, run, progress=False, device="cpu", wandb=WandbOptions("simple-dit-test", group="grouped"))

    run_id = json.loads((run / WANDB_RUN_NAME).read_text())["id"]
    [first] = offline_runs(run, run_id)
    assert (first["project"], first["group"]) == ("simple-dit-test", "grouped")
    assert first["config"]["train"]["max_steps"] == 12 and first["config"]["preset"] == "dit-tiny"
    assert first["config"]["model"] == dataclasses.asdict(config.model)
    history = first["history"]
    for key in TRAIN_KEYS:
        assert steps_with(history, key) == [5, 10, 12], key
    for key in EVAL_KEYS:
        assert steps_with(history, key) == [10], key
    assert [row["eval/fid"] for row in history if "eval/fid" in row] == [12.5]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/loss"] for row in history if "train/loss" in row] == [m["loss"] for m in metrics if "loss" in m]
    grids = [row for row in history if row.get("samples/_type") == "image-file"]
    assert [row["step"] for row in grids] == [10, 12]
    for row in grids:
        assert (first["dir"] / "files" / row["samples/path"]).stat().st_size > 1000

    # TensorBoard gets the same grids.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb")).Reload()
    assert [e.step for e in events.Images("samples")] == [10, 12]

    # A resumed run continues the same W&B run, with the new stopping rule in its config.
    config.train.max_steps = 17
    train(config, run, resume=True, progress=False, device="cpu", wandb=WandbOptions("simple-dit-test", group="grouped"))
    assert json.loads((run / WANDB_RUN_NAME).read_text())["id"] == run_id
    runs = offline_runs(run, run_id)
    assert len(runs) == 2, [r["dir"] for r in runs]
    assert runs[1]["config"]["train"]["max_steps"] == 17
    assert steps_with(runs[1]["history"], "train/loss") == [15, 17]
    assert steps_with(runs[1]["history"], "samples/path") == [17]


@needs_wandb
def test_a_string_is_the_project(tmp_path):
    logger = RunLogger(tmp_path, config={"preset": "x"}, wandb="just-a-project")
    logger.log({"step": 3, "loss": 0.5}, scalars={"loss": "train/loss"})
    logger.close()
    run_id = json.loads((tmp_path / WANDB_RUN_NAME).read_text())["id"]
    [run] = offline_runs(tmp_path, run_id)
    assert run["project"] == "just-a-project" and run["group"] == "" and run["config"]["preset"] == "x"
    assert [(row["step"], row["train/loss"]) for row in run["history"]] == [(3, 0.5)]


@needs_wandb
def test_a_wandb_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore detail")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(UserError, match=r"--wandb: cannot start a W&B run \(api_key not configured.*WANDB_MODE=offline") as e:
        RunLogger(tmp_path, wandb="p")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "metrics.jsonl").exists()


@needs_wandb
def test_a_resume_whose_wandb_cannot_start_leaves_the_run_as_it_was(tmp_path, mnist_dir, monkeypatch, capsys):
    """The new stopping rule is not recorded, nor the records past the checkpoint dropped, for a
    resume that never started."""
    import wandb

    from conftest import snapshot

    run = tmp_path / "run"
    train(tiny_config(max_steps=4), run, progress=False, device="cpu", final_samples=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 9, "loss": 1.0}) + "\n")  # a record past the checkpoint, of a killed attempt
    before = snapshot(run)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: (_ for _ in ()).throw(wandb.errors.UsageError("api_key not configured")))
    argv = ["train", "--resume", "--out", str(run), "--max-steps", "8", "--no-progress", "--data-dir", str(mnist_dir), "--device", "cpu", "--wandb"]
    assert main(argv) == 2
    assert "cannot start a W&B run" in capsys.readouterr().err
    assert {k: v for k, v in snapshot(run).items() if k not in (WANDB_RUN_NAME, ".lock")} == {k: v for k, v in before.items() if k != ".lock"}


@needs_wandb
def test_a_new_run_whose_wandb_cannot_start_leaves_no_directory(tmp_path, mnist_dir, monkeypatch, capsys):
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kwargs: (_ for _ in ()).throw(wandb.errors.UsageError("api_key not configured")))
    argv = ["train", "--preset", "dit-tiny", "--out", str(tmp_path / "run"), "--max-steps", "2", "--no-progress",
            "--data-dir", str(mnist_dir), "--device", "cpu", "--wandb"]  # fmt: skip
    assert main(argv) == 2
    assert "cannot start a W&B run" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_wandb_flag_without_wandb_installed_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    out = tmp_path / "run"
    assert main(["train", "--preset", "dit-tiny", "--out", str(out), "--max-steps", "5", "--no-progress", "--wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["simple-dit: error: --wandb needs wandb, which is not installed: pip install 'simple-dit[wandb]'"]
    assert not out.exists()


@needs_wandb
def test_compare_groups_its_runs_under_its_directory_and_logs_each_evaluation(tmp_path, mnist_dir):
    from simple_dit.compare import compare

    out = tmp_path / "my-comparison"
    compare("dit-tiny", "64-images", out, lrs="1e-3,3e-3", eval_every_frac=0.5, eval_n=6, steps=2, data_dir=str(mnist_dir),
            device="cpu", log=lambda msg: None, meter=FakeMeter(), wandb="simple-dit-test")  # fmt: skip
    run_dirs = sorted((out / "runs").iterdir())
    assert len(run_dirs) == 2
    ids = set()
    for run_dir in run_dirs:
        run_id = json.loads((run_dir / WANDB_RUN_NAME).read_text())["id"]
        ids.add(run_id)
        runs = offline_runs(run_dir, run_id)  # two training segments, each followed by an evaluation
        assert {(r["project"], r["group"]) for r in runs} == {("simple-dit-test", "my-comparison")}
        history = [row for r in runs for row in r["history"]]
        assert steps_with(history, "eval/fid") == steps_with(history, "eval_samples/path") == [1, 2]
        assert set(steps_with(history, "train/loss")) == {1, 2}
        assert runs[0]["config"]["train"]["lr"] in (1e-3, 3e-3)
    assert len(ids) == 2
