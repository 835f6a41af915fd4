"""scripts/verdict-grid.sh, driven by a stub `simple-dit` that records its commands and answers
with a results.json, so that these tests take a second: the three steps in order into one
directory, flow at each preset's own best epsilon learning rate, the confirmation last, and a
failing step stops the grid. (What each `compare` does is tested in test_compare.py: resuming,
the report covering the directory, --final-n.)"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

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


def grid(tmp_path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    stub, log = tmp_path / "simple-dit", tmp_path / "log.txt"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {**os.environ, "SIMPLE_DIT": str(stub), "PYTHON": sys.executable, "STUB_LOG": str(log), **env}
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "verdict")], capture_output=True, text=True, env=env, timeout=60)
    return result, log.read_text().splitlines() if log.exists() else []


def test_the_three_steps_run_in_order_into_one_directory(tmp_path):
    result, commands = grid(tmp_path)
    assert result.returncode == 0, result.stderr
    out = str(tmp_path / "verdict")
    common = f"--budget 10m --seeds 0,1,2 --guidances 1.5,2,3,4 --eval-every-frac 1 --eval-n 1000 --steps 10 --out {out}"
    assert commands == [
        f"compare --presets unet-seed,dit-seed --objective eps --lrs 1e-4,3e-4,1e-3 {common}",
        f"compare --presets unet-seed --objective flow --lrs 0.001 {common}",  # each preset's own best epsilon lr
        f"compare --presets dit-seed --objective flow --lrs 0.0003 {common}",
        f"compare --presets dit-mini --lrs 3e-3 {common}",
        f"compare --presets unet-seed,dit-seed --objective eps --lrs 1e-4,3e-4,1e-3 --final-n 5000 {common}",
    ]
    assert "3/3" in result.stderr and f"report: {out}/report.md" in result.stderr


def test_settings_come_from_the_environment(tmp_path):
    env = {"VERDICT_PRESETS": "dit-seed", "VERDICT_MINI": "", "VERDICT_SEEDS": "0", "VERDICT_LRS": "1e-3",
           "VERDICT_BUDGET": "160-images", "VERDICT_EVAL": "--eval-n 12 --steps 2", "VERDICT_FINAL_N": "20"}  # fmt: skip
    result, commands = grid(tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert [shlex.split(c)[:7] for c in commands] == [
        ["compare", "--presets", "dit-seed", "--objective", "eps", "--lrs", "1e-3"],
        ["compare", "--presets", "dit-seed", "--objective", "flow", "--lrs", "0.0003"],
        ["compare", "--presets", "dit-seed", "--objective", "eps", "--lrs", "1e-3"],
    ]
    assert all("--budget 160-images --seeds 0 --eval-n 12 --steps 2 --out" in c for c in commands)
    assert "--final-n 20" in commands[-1]


def test_a_failing_step_stops_the_grid(tmp_path):
    result, commands = grid(tmp_path, STUB_FAIL_ON="--objective flow")
    assert result.returncode == 2 and len(commands) == 2  # step 1, then the failing flow run; nothing after it


def test_a_preset_without_an_epsilon_result_is_a_clear_error(tmp_path):
    result, commands = grid(tmp_path, VERDICT_PRESETS="unet-tiny")
    assert result.returncode != 0 and len(commands) == 1
    assert "verdict-grid: no epsilon result for unet-tiny" in result.stderr
