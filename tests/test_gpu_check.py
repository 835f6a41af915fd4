"""scripts/gpu-check.sh: its arguments, its plan in both modes, and its summary, driven by a stub
Python so that these tests take a second. The real dry run (`bash scripts/gpu-check.sh
--cpu-dry-run`, about a minute and a half on 2 cores) runs in .ci/run after the test suite."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "gpu-check.sh"


def gpu_check(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})  # fmt: skip


def plan(*args) -> list[tuple[str, int, str]]:
    result = gpu_check("--plan", *args)
    assert result.returncode == 0, result.stderr
    return [(name, int(cap), command) for name, cap, command in (line.split("\t") for line in result.stdout.splitlines())]


def test_help_and_bad_arguments():
    shown = gpu_check("--help")
    assert shown.returncode == 0 and "--cpu-dry-run" in shown.stdout
    for bad in (["--bogus"], ["--out"], ["--out="]):
        result = gpu_check(*bad)
        assert result.returncode == 2 and result.stderr.startswith("gpu-check.sh: error:"), (bad, result.stderr)


def test_the_gpu_plan_runs_what_issue_8_asks():
    steps = plan("--out", "somewhere")
    commands = {name: command for name, _, command in steps}
    names = list(commands)
    # Most wanted first: the compiled benches (the targets), the tests, the comparison, then the other
    # benches (the issue's table has the eager numbers already), diffusers, where each target's step
    # spends its time, the two missed training targets against one lever at a time, and last whether
    # two identical UNet runs repeat, in each precision.
    first_other = next(i for i, n in enumerate(names) if n.startswith("bench-") and not n.endswith("-compile"))
    assert names[0] == "environment" and all(n.endswith("-compile") for n in names[1 : names.index("tests")])
    parts = [n for n in names if n.startswith("parts-")]
    levers = [n for n in names if n.startswith("levers-")]
    repeats = [n for n in names if n.startswith("repeat-")]
    assert repeats == names[-2:] == ["repeat-unet-tiny-fp32", "repeat-unet-tiny-bf16"]
    assert [commands[n].split("repeatability.py ", 1)[1] for n in repeats] == [
        "--preset unet-tiny --precision fp32 --device cuda", "--preset unet-tiny --precision bf16 --device cuda"]
    names = names[: -len(repeats)]
    assert names.index("tests") + 1 == names.index("compare-article") < first_other and names[-len(parts) - len(levers) - 1] == "diffusers-compare"
    assert levers == names[-2:] == ["levers-dit-mini-bpreset-compile", "levers-dit-seed-b1024-compile"]
    assert [commands[n].split("step_levers.py ", 1)[1] for n in levers] == [
        "--preset dit-mini --repeats 10 --device cuda --compile", "--preset dit-seed --batch-size 1024 --repeats 10 --device cuda --compile"]
    assert names[-len(parts) - len(levers) : -len(levers)] == parts and sorted(commands[n].split("step_parts.py ", 1)[1] for n in parts) == [
        "--preset dit-mini --device cuda --compile", "--preset dit-mini --device cuda --compile --inductor combo_kernels=True",
        "--preset dit-seed --batch-size 1024 --device cuda --compile", "--preset dit-seed --device cuda --compile",
        "--preset unet-seed --device cuda --compile",
    ]  # fmt: skip
    assert "parts-dit-mini-bpreset-combo_kernels" in parts  # a step's name tells the compiler setting it tried
    # Plus one test process per core (at most 8) where the script's Python can import pytest-xdist.
    assert re.search(r"-m pytest -q( -n [1-8])?$", commands["tests"]), commands["tests"]
    benches = [c for n, c in commands.items() if n.startswith("bench-")]
    for preset in ("dit-seed", "unet-seed", "dit-mini"):
        mine = [c.split(" bench ", 1)[1] for c in benches if f"--preset {preset} " in c]
        eager = [c for c in mine if "--compile" not in c and "--runs-together" not in c]
        assert all("--device cuda" in c for c in mine)
        assert sorted("--batch-size 1024" in c for c in eager) == [False, False, True]  # preset batch, 1024, reference
        assert sum("--reference" in c and "--batch-size" not in c for c in eager) == 1
        assert any("--compile" in c and "--batch-size" not in c for c in mine)  # each target at the preset's batch
        assert any("--runs-together 9" in c and "--batch-size" not in c for c in mine)  # several runs filling the GPU
    assert any("--preset dit-seed --batch-size 1024" in c and "--compile" in c for c in benches)  # the 40%-of-peak target
    assert "bench/diffusers_compare.py --preset dit-seed --batch-size 128" in commands["diffusers-compare"]
    assert commands["compare-article"].endswith(  # a DIR given is the caller's
        f"compare --presets unet-seed,dit-seed --budget 600k-images --lrs 1e-4,3e-4,1e-3 --compile --device cuda --out {os.getcwd()}/somewhere/compare"
    )
    assert all(cap < 470 for _, cap, _ in steps)


def test_the_dry_run_plan_is_the_same_steps_on_the_cpu_with_tiny_presets():
    gpu, dry = plan(), plan("--cpu-dry-run")
    kinds = lambda steps: [n.split("-")[0] + ("-compile" if n.startswith("bench-") and n.endswith("-compile") else "") for n, _, _ in steps]  # noqa: E731
    assert sorted(set(kinds(gpu))) == sorted(set(kinds(dry)))
    commands = {name: command for name, _, command in dry}
    assert re.search(r"-m pytest -q tests/test_models.py( -n [1-8])?$", commands["tests"]), commands["tests"]
    assert all("--device cpu" in c and "seed" not in c for n, c in commands.items() if n.startswith(("bench-", "diffusers", "compare")))
    assert "--budget 2k-images" in commands["compare-article"] and "--eval-n 12" in commands["compare-article"]
    # The comparison one run at a time, as on the GPU, but eager (a cold compile would take a third of
    # the dry run); the compiled runs trained together (the verdict grid's GPU path) in one bench.
    assert "--runs-together" not in commands["compare-article"] and "bench-dit-tiny-bpreset-together3-compile" in commands


def test_only_keeps_the_steps_of_the_kinds_named():
    result = gpu_check("--plan", env={"GPU_CHECK_ONLY": "compare bench-compile"})
    names = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert result.returncode == 0 and len(names) == 6 and "compare-article" in names
    assert all(n.endswith("-compile") for n in names if n != "compare-article")
    bad = gpu_check("--plan", env={"GPU_CHECK_ONLY": "everything"})
    assert bad.returncode == 2 and "names no step kind" in bad.stderr
    typo = gpu_check("--plan", env={"GPU_CHECK_ONLY": "env lever"})  # its steps used to be dropped without a word
    assert typo.returncode == 2 and "names no step kind 'lever'" in typo.stderr


@pytest.mark.parametrize("name, value, fragment", [("GPU_CHECK_BUDGET_S", "abc", "is not a number of seconds"),
                                                   ("GPU_CHECK_CAPS", "env=abc", "is not KIND=SECONDS"),
                                                   ("GPU_CHECK_CAPS", "tests=", "is not KIND=SECONDS"),
                                                   ("GPU_CHECK_CAPS", "env", "is not KIND=SECONDS"),  # used to cap env at "env"
                                                   ("GPU_CHECK_CAPS", "test=5", "names no step kind 'test'"),  # used to be ignored
                                                   ("GPU_CHECK_CAPS", "env=0", "at least 1 second")])  # timeout 0: no limit
def test_a_malformed_setting_is_one_line_before_any_step(name, value, fragment, tmp_path):
    result = gpu_check("--cpu-dry-run", "--out", tmp_path / "out", env={name: value, "GPU_CHECK_ONLY": "env"})
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()] and fragment in result.stderr
    assert not (tmp_path / "out").exists()


def test_numbers_with_a_leading_zero_are_decimal():
    """bash read a budget of 08 as a bad octal number (the check then ran no step and said ok)
    and 0100 as 64."""
    plan = gpu_check("--cpu-dry-run", "--plan", env={"GPU_CHECK_ONLY": "env", "GPU_CHECK_CAPS": "env=0100", "GPU_CHECK_BUDGET_S": "08"})
    assert plan.returncode == 0 and plan.stdout.split("\t")[1] == "100", plan.stdout


def test_a_check_that_runs_no_step_is_not_ok(tmp_path):
    result = gpu_check("--cpu-dry-run", "--out", tmp_path / "out", env={"GPU_CHECK_ONLY": "env", "GPU_CHECK_BUDGET_S": "5"})
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 1 and not summary["ok"] and [s["status"] for s in summary["steps"]] == ["not_run"]


STUB = r"""#!/usr/bin/env bash
# Stands in for python: answers each command gpu-check.sh runs, from the arguments alone.
case "$*" in
  "-c import pytest") exit 0 ;;
  "-c import diffusers") exit 1 ;;
  -c*) echo '{"python": "stub", "cuda_available": false}' ;;
  "-m pytest"*) echo "....."; echo "5 passed, 1 skipped in 0.10s" ;;
  *"bench --preset dit-mini"*"--reference"*) echo "boom" >&2; exit 1 ;;
  *" bench "*) echo "     train_images_per_s: 12.0"; echo '{"preset": "p", "batch_size": 8, "train_images_per_s": 12.0, "sample_images_per_s": 40.0, "unrelated": 1}' ;;
  *"repeatability.py"*) echo '{"preset": "unet-tiny", "precision": "fp32", "compiled": false, "steps": 4, "settings": {"as-trained": {"largest_difference": 0.0}}}' ;;
  *"step_levers.py"*) echo '{"preset": "p", "batch_size": 8, "compiled": false, "rows": {"ours": {"images_per_s": 12.0, "x_ours": 1.0}}, "device": "stub"}' ;;
  *"step_parts.py"*) echo '{"preset": "p", "batch_size": 8, "step_ms": 2.5, "optimizer_ms": 0.5, "profile": {"launches": 9, "top_kernels": [{"name": "k"}]}, "device": "stub"}' ;;
  *" compare "*)
    out=${@: -1}; mkdir -p "$out/runs/a_lr0.001"; echo '{}' >"$out/runs/a_lr0.001/evals.jsonl"
    echo '{"floor": {"fid": 0.5}, "presets": [{"preset": "a", "best_lr": 0.001, "best": {"fid": 3.0, "label_accuracy": 0.9}, "images_per_s": 100.0, "runs": [{"lr": 0.001, "final": {"train_seconds": 9.5}}]}]}' >"$out/results.json" ;;
  *) echo "stub: unexpected $*" >&2; exit 3 ;;
esac
"""


@pytest.fixture
def stub_python(tmp_path):
    path = tmp_path / "python"
    path.write_text(STUB)
    path.chmod(0o755)
    return path


def test_the_summary_is_one_json_object_last_with_every_step(stub_python, tmp_path, mnist_dir):
    out = tmp_path / "check"
    result = gpu_check("--cpu-dry-run", "--out", out, env={"PYTHON": str(stub_python), "SIMPLE_DIT_DATA": str(mnist_dir)})
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads((out / "summary.json").read_text()) == summary
    steps = {s["name"]: s for s in summary["steps"]}
    assert [n for n, s in steps.items() if s["status"] != "ok"] == ["bench-dit-mini-b8-reference", "diffusers-compare"]
    assert summary["failed"] == ["bench-dit-mini-b8-reference"] and summary["ok"] is False and result.returncode == 1
    assert steps["diffusers-compare"]["status"] == "skipped" and "diffusers" in steps["diffusers-compare"]["reason"]
    assert steps["tests"]["result"] == {"passed": 5, "skipped": 1}
    assert re.search(r"tests \(at most \d+ s\): \S+ -m pytest -q tests/test_models.py( -n [1-8])?$", result.stderr, re.M)  # xdist importable
    assert steps["bench-dit-tiny-b8"]["result"] == {"preset": "p", "batch_size": 8, "train_images_per_s": 12.0, "sample_images_per_s": 40.0}
    # The kernels by name stay in the step's log: the summary must stay one short line.
    assert steps["parts-unet-tiny-b8"]["result"] == {"preset": "p", "batch_size": 8, "step_ms": 2.5, "optimizer_ms": 0.5, "profile": {"launches": 9}}
    assert steps["levers-dit-tiny-b8"]["result"] == {"preset": "p", "batch_size": 8, "compiled": False, "rows": {"ours": {"images_per_s": 12.0, "x_ours": 1.0}}}
    assert steps["repeat-unet-tiny-fp32"]["result"] == {"preset": "unet-tiny", "precision": "fp32", "compiled": False,
                                                         "settings": {"as-trained": {"largest_difference": 0.0}}}
    assert "boom" in (out / "logs" / "bench-dit-mini-b8-reference.log").read_text()
    compare = steps["compare-article"]["result"]
    assert compare["evals_done"] == {"a_lr0.001": 1} and compare["floor_fid"] == 0.5
    assert compare["presets"] == [{"preset": "a", "best_lr": 0.001, "fid": 3.0, "label_accuracy": 0.9, "images_per_s": 100.0, "train_seconds": {"0.001": 9.5}}]
    assert all(isinstance(s["seconds"], float) for s in summary["steps"]) and summary["mode"] == "cpu-dry-run"


def test_the_last_line_is_short_enough_for_a_remote_runner_to_return_whole(tmp_path, mnist_dir):
    """A remote runner returns the last 12,000 characters of output: numbers keep 4 significant
    digits, logs are found by step name, and the line has no padding."""
    precise = tmp_path / "precise-python"
    precise.write_text(STUB.replace('"train_images_per_s": 12.0', '"train_images_per_s": 12345.678901'))
    precise.chmod(0o755)
    out = tmp_path / "check"
    result = gpu_check("--cpu-dry-run", "--out", out, env={"PYTHON": str(precise), "SIMPLE_DIT_DATA": str(mnist_dir)})
    last = result.stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["steps"][1]["result"]["train_images_per_s"] == 12350.0 and ", " not in last and '"log"' not in last
    assert all((out / "logs" / f"{s['name']}.log").is_file() for s in summary["steps"] if s["status"] != "not_run")


def test_a_comparison_cut_off_resumes_only_when_asked(stub_python, tmp_path, mnist_dir):
    out = tmp_path / "check"
    env = {"PYTHON": str(stub_python), "SIMPLE_DIT_DATA": str(mnist_dir), "GPU_CHECK_ONLY": "compare"}
    gpu_check("--cpu-dry-run", "--out", out, env=env)
    kept = out / "compare" / "runs" / "b_lr0.01" / "evals.jsonl"  # a run trained before the cap stopped it
    kept.parent.mkdir(parents=True)
    kept.write_text("{}\n")
    result = gpu_check("--cpu-dry-run", "--out", out, env=env | {"GPU_CHECK_RESUME": "1"})
    compare = json.loads(result.stdout.strip().splitlines()[-1])["steps"][0]["result"]
    assert compare["resumed"] is True and compare["evals_done"] == {"a_lr0.001": 1, "b_lr0.01": 1}
    result = gpu_check("--cpu-dry-run", "--out", out, env=env)
    compare = json.loads(result.stdout.strip().splitlines()[-1])["steps"][0]["result"]
    assert "resumed" not in compare and compare["evals_done"] == {"a_lr0.001": 1} and not kept.exists()


def test_a_step_past_its_limit_is_stopped_and_the_others_still_run(stub_python, tmp_path, mnist_dir):
    slow = tmp_path / "slow-python"
    slow.write_text(STUB.replace('"-m pytest"*) echo', '"-m pytest"*) sleep 30; echo'))
    slow.chmod(0o755)
    out = tmp_path / "check"
    env = {"PYTHON": str(slow), "SIMPLE_DIT_DATA": str(mnist_dir), "GPU_CHECK_CAPS": "tests=1"}
    result = gpu_check("--cpu-dry-run", "--out", out, env=env)
    steps = {s["name"]: s for s in json.loads(result.stdout.strip().splitlines()[-1])["steps"]}
    assert steps["tests"]["status"] == "timeout" and steps["tests"]["seconds"] < 15
    assert steps["compare-article"]["status"] == "ok" and result.returncode == 1


@pytest.mark.parametrize("line", [
    "simple-dit: torch.compile failed (AttributeError: 'tuple' object has no attribute 'sum'); training eager",
    "simple-dit: torch.compile ran without CUDA graphs (TORCH_LOGS=perf_hints says why); steps keep their Python dispatch cost",
    "simple-dit: CUDA graph capture failed (RuntimeError: operation not permitted when stream is capturing); training without it",
])  # fmt: skip
def test_a_step_whose_compiler_fell_back_fails(stub_python, tmp_path, mnist_dir, line):
    """`--compile` quietly training eager, or compiled without its CUDA graphs (one stderr line,
    exit 0), is no measurement of what the compiler was asked for."""
    fallback = tmp_path / "fallback-python"
    fallback.write_text(STUB.replace('*" bench "*) echo', f'*" bench "*"--compile"*) echo "{line}" >&2; exit 0 ;;\n  *" bench "*) echo'))
    fallback.chmod(0o755)
    result = gpu_check("--cpu-dry-run", "--out", tmp_path / "check", env={"PYTHON": str(fallback), "SIMPLE_DIT_DATA": str(mnist_dir)})
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    compiled = [s for s in summary["steps"] if "compile" in s["name"] and s["name"].startswith("bench")]
    assert compiled and all(s["status"] == "failed" and s["reason"] == line for s in compiled)
    assert set(summary["failed"]) >= {s["name"] for s in compiled} and result.returncode == 1
    assert all(s["status"] == "ok" for s in summary["steps"] if s["name"].startswith("bench") and "compile" not in s["name"]
               and "reference" not in s["name"])  # fmt: skip


def test_no_mnist_skips_the_steps_that_need_it(stub_python, tmp_path):
    result = gpu_check("--cpu-dry-run", "--out", tmp_path / "check", env={"PYTHON": str(stub_python), "SIMPLE_DIT_DATA": str(tmp_path / "nowhere")})
    steps = {s["name"]: s for s in json.loads(result.stdout.strip().splitlines()[-1])["steps"]}
    for name in ("tests", "compare-article"):
        assert steps[name]["status"] == "skipped" and "MNIST" in steps[name]["reason"]


def test_wheels_install_pytest_and_xdist_where_pytest_is_missing(stub_python, tmp_path, mnist_dir):
    stub = tmp_path / "no-pytest-python"
    stub.write_text(STUB.replace('"-c import pytest") exit 0', '"-c import pytest") exit 1').replace(
        '  -c*)', '  "-m pip install"*) echo "$@" >>"$GPU_CHECK_PIP_LOG" ;;\n  -c*)'))
    stub.chmod(0o755)
    out, pip_log = tmp_path / "check", tmp_path / "pip.txt"
    env = {"PYTHON": str(stub), "SIMPLE_DIT_DATA": str(mnist_dir), "GPU_CHECK_WHEELS": str(tmp_path / "wheels"),
           "GPU_CHECK_ONLY": "env", "GPU_CHECK_PIP_LOG": str(pip_log)}  # fmt: skip
    result = gpu_check("--cpu-dry-run", "--out", out, env=env)
    assert result.returncode == 0, result.stderr
    install = ["-m", "pip", "install", "-q", "--no-index", "--find-links", str(tmp_path / "wheels"), "--target", str(out / "site")]
    # pytest, then pytest-xdist where its wheels are there too (the suite then runs one process per core)
    assert [line.split() for line in pip_log.read_text().splitlines()] == [install + ["pytest"], install + ["pytest-xdist"]]


def test_the_verdict_grid_runs_only_when_asked_for_and_resumes_from_its_records():
    assert not any(name.startswith("verdict") for name, _, _ in plan()), "the default check has no time for the grid"
    # On a GPU the grid's own directories (its records in docs/, restored and saved there); the dry
    # run keeps to the check's directory.
    for args, ending in (((), "verdict-grid.sh --gpu"), (("--cpu-dry-run",), "--gpu runs/gpu-check/verdict runs/gpu-check/verdict-records")):
        result = gpu_check("--plan", *args, env={"GPU_CHECK_ONLY": "verdict"})
        [(name, cap, command)] = [line.split("\t") for line in result.stdout.splitlines()]
        assert result.returncode == 0 and name == "verdict-grid" and command.split().count("--gpu") == 1
        assert ("--device cpu" in command) == bool(args) and "-m simple_dit.cli" in command
        assert command.endswith(ending)
