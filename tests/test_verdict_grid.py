"""scripts/verdict-grid.sh, driven by a stub `simple-dit` that records its commands and answers
with a results.json, so that these tests take a second: the two steps in order into one
directory, flow at each preset's own best epsilon learning rate, a failing step stops the grid,
and the records that carry the grid from one machine to the next (no weights). (What each
`compare` does is tested in test_compare.py: resuming, the report covering the directory,
--final-n, finished runs without checkpoints.)"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "verdict-grid.sh"
STUB = r"""#!/usr/bin/env bash
# Stands in for simple-dit: logs its arguments; `compare` writes the results.json its --out would hold.
echo "$*" >>"$STUB_LOG"
[ -n "${STUB_FAIL_ON:-}" ] && case "$*" in *"$STUB_FAIL_ON"*) exit 2 ;; esac
out=${@: -1}
mkdir -p "$out"
echo '{"presets": [{"preset": "unet-seed", "objective": "eps", "best_lr": 0.001},
                   {"preset": "dit-seed", "objective": "eps", "best_lr": 0.0003},
                   {"preset": "dit-seed", "objective": "flow", "best_lr": 0.01}]}' >"$out/results.json"
"""


def grid(tmp_path, *args, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    stub, log = tmp_path / "simple-dit", tmp_path / "log.txt"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {**os.environ, "SIMPLE_DIT": str(stub), "PYTHON": sys.executable, "STUB_LOG": str(log), **env}
    argv = ["bash", str(SCRIPT), *args, str(tmp_path / "verdict"), str(tmp_path / "records")]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    return result, log.read_text().splitlines() if log.exists() else []


def test_the_two_steps_run_in_order_into_one_directory(tmp_path):
    result, commands = grid(tmp_path)
    assert result.returncode == 0, result.stderr
    out = str(tmp_path / "verdict")
    common = f"--budget 10m --seeds 0,1,2 --final-n 5000 --guidances 1.5,2,3,4 --eval-every-frac 1 --eval-n 1000 --steps 10 --out {out}"
    assert commands == [
        f"compare --presets unet-seed,dit-seed --objective eps --lrs 1e-4,3e-4,1e-3 {common}",
        f"compare --presets unet-seed --objective flow --lrs 0.001 {common}",  # each preset's own best epsilon lr
        f"compare --presets dit-seed --objective flow --lrs 0.0003 {common}",
        f"compare --presets dit-mini --lrs 3e-3 {common}",
    ]
    assert "2/2" in result.stderr and f"report: {out}/report.md" in result.stderr


def _run_dir(path, evals: str = "{}\n"):
    path.mkdir(parents=True)
    (path / "evals.jsonl").write_text(evals)
    (path / "config.json").write_text("{}")
    (path / "checkpoint.safetensors").write_bytes(b"weights")
    (path / "samples.png").write_bytes(b"a copy of the last evaluation's grid")
    (path / "tb").mkdir()
    (path / "tb" / "events").write_bytes(b"events")
    return path


def test_records_carry_finished_runs_and_the_report_without_weights(tmp_path):
    out, records = tmp_path / "verdict", tmp_path / "records"
    _run_dir(out / "runs" / "unet-seed_lr0.001")
    _run_dir(records / "runs" / "dit-seed_lr0.001")  # from another machine: restored, weights and all absent
    _run_dir(records / "runs" / "unet-seed_lr0.001", evals="old\n")  # OUT's own is newer: not restored over it
    result, _ = grid(tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "runs" / "dit-seed_lr0.001" / "evals.jsonl").is_file()
    assert (out / "runs" / "unet-seed_lr0.001" / "evals.jsonl").read_text() == "{}\n"
    kept = records / "runs" / "unet-seed_lr0.001"
    assert sorted(p.name for p in kept.iterdir()) == ["config.json", "evals.jsonl"]  # no checkpoint, TensorBoard or copy
    assert (kept / "evals.jsonl").read_text() == "{}\n" and (records / "results.json").is_file()
    assert (out / "runs" / "unet-seed_lr0.001" / "checkpoint.safetensors").is_file()  # OUT keeps its weights


def test_save_alone_trains_nothing_and_a_stopped_grid_saves_too(tmp_path):
    out, records = tmp_path / "verdict", tmp_path / "records"
    _run_dir(out / "runs" / "unet-seed_lr0.001")
    result, commands = grid(tmp_path, "--save")
    assert result.returncode == 0 and commands == [] and (records / "runs" / "unet-seed_lr0.001" / "evals.jsonl").is_file()
    _run_dir(out / "runs" / "dit-seed_lr0.001")
    result, commands = grid(tmp_path, STUB_FAIL_ON="--objective eps")
    assert result.returncode == 2 and len(commands) == 1 and (records / "runs" / "dit-seed_lr0.001" / "evals.jsonl").is_file()


def test_settings_come_from_the_environment(tmp_path):
    env = {"VERDICT_PRESETS": "dit-seed", "VERDICT_MINI": "", "VERDICT_SEEDS": "0", "VERDICT_LRS": "1e-3",
           "VERDICT_BUDGET": "160-images", "VERDICT_EVAL": "--eval-n 12 --steps 2", "VERDICT_FINAL_N": "20"}  # fmt: skip
    result, commands = grid(tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert [shlex.split(c)[:7] for c in commands] == [
        ["compare", "--presets", "dit-seed", "--objective", "eps", "--lrs", "1e-3"],
        ["compare", "--presets", "dit-seed", "--objective", "flow", "--lrs", "0.0003"],
    ]
    assert all("--budget 160-images --seeds 0 --final-n 20 --eval-n 12 --steps 2 --out" in c for c in commands)


def test_a_failing_step_stops_the_grid(tmp_path):
    result, commands = grid(tmp_path, STUB_FAIL_ON="--objective flow")
    assert result.returncode == 2 and len(commands) == 2  # step 1, then the failing flow run; nothing after it


def test_a_preset_without_an_epsilon_result_is_a_clear_error(tmp_path):
    result, commands = grid(tmp_path, VERDICT_PRESETS="unet-tiny")
    assert result.returncode != 0 and len(commands) == 1
    assert "verdict-grid: no epsilon result for unet-tiny" in result.stderr


def test_the_gpu_profile_is_one_step_with_both_objectives_on_cuda(tmp_path):
    result, commands = grid(tmp_path, "--gpu")
    assert result.returncode == 0, result.stderr
    out = str(tmp_path / "verdict")
    assert commands == [
        "compare --presets unet-seed,dit-seed,dit-unet-size,unet-dit-size --objective eps,flow --lrs 1e-4,3e-4,1e-3 "
        "--budget 600k-images --seeds 0,1,2 --final-n 5000 --guidances 1.5,2,3,4 --eval-every-frac 0.25 --eval-n 1000 "
        f"--steps 20 --device cuda --compile --runs-together 9 --out {out}"
    ]
    assert (tmp_path / "records" / "results.json").is_file()


def test_unknown_options_are_refused_before_anything_runs(tmp_path):
    result, commands = grid(tmp_path, "--gpus")
    assert result.returncode == 2 and commands == [] and "unknown option '--gpus'" in result.stderr
    assert not (tmp_path / "verdict").exists()
    for args in (["out", "records", "extra"], ["out", "--save"]):  # the option was taken for RECORDS
        result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert result.returncode == 2 and "options come before OUT and RECORDS" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "records").exists()


def test_relative_paths_are_the_callers(tmp_path):
    stub, log = tmp_path / "simple-dit", tmp_path / "log.txt"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {**os.environ, "SIMPLE_DIT": str(stub), "PYTHON": sys.executable, "STUB_LOG": str(log)}
    result = subprocess.run(["bash", str(SCRIPT), "--save", "out", "records"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "runs").is_dir() and (tmp_path / "records" / "runs").is_dir()


@pytest.mark.parametrize("to_group", [True, False])
def test_a_stop_signal_lets_the_running_compare_finish_then_saves_the_records(to_group, tmp_path):
    # The stub stands in for a compare in training: on SIGTERM it "checkpoints" (writes a finished
    # run's records) and exits; the grid must wait for it and save what it wrote.
    stub, log, out, records = tmp_path / "simple-dit", tmp_path / "log.txt", tmp_path / "verdict", tmp_path / "records"
    stub.write_text(
        '#!/usr/bin/env bash\necho "$*" >>"$STUB_LOG"\nrun="${@: -1}/runs/unet-seed_lr0.001"\n'
        'trap \'mkdir -p "$run" && echo "{}" >"$run/evals.jsonl"; exit 1\' TERM\n'
        'while :; do sleep 0.1; done\n'
    )
    stub.chmod(0o755)
    env = {**os.environ, "SIMPLE_DIT": str(stub), "PYTHON": sys.executable, "STUB_LOG": str(log)}
    grid_process = subprocess.Popen(["bash", str(SCRIPT), str(out), str(records)], env=env, start_new_session=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if to_group:
        os.killpg(grid_process.pid, signal.SIGTERM)  # as `timeout` does: the whole process group
    else:
        os.kill(grid_process.pid, signal.SIGTERM)  # the script alone: it passes the signal on (it used to wait for compare's end)
    _, stderr = grid_process.communicate(timeout=30)
    assert grid_process.returncode == 143, stderr
    assert (records / "runs" / "unet-seed_lr0.001" / "evals.jsonl").read_text() == "{}\n"
