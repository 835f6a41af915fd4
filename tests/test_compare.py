"""`simple-dit compare`: budgets, the segmented train-and-evaluate loop, resuming, the report."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import snapshot

from simple_dit import compare as C
from simple_dit.errors import UserError
from simple_dit.io import append_jsonl, read_jsonl

PRESETS = "dit-tiny,unet-tiny"
LRS = "1e-3,3e-3"
BUDGET = "640-images"  # batch 32 -> 20 steps, evaluated at 5, 10, 15 and 20
# On the CPU even where a GPU is present: an interrupted comparison must end bit for bit where an
# uninterrupted one does, which holds on the CPU only (see conftest.RESUME_TOLERANCE).
SETTINGS = dict(eval_n=60, steps=3, precision="fp32", seed=0, device="cpu")
STEPS = [5, 10, 15, 20]  # at --eval-every-frac 0.25
RUN_NAMES = ["dit-tiny_lr0.001", "dit-tiny_lr0.003", "unet-tiny_lr0.001", "unet-tiny_lr0.003"]

# ---- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, kind, amount",
    [
        ("10m", "seconds", 600), ("90s", "seconds", 90), ("1.5h", "seconds", 5400), ("2min", "seconds", 120),
        ("200k-images", "images", 200_000), ("5000-images", "images", 5000), ("640-images", "images", 640),
        ("1.5M-images", "images", 1.5e6), ("1e5 images", "images", 1e5),
        ("1e15-flops", "flops", 1e15), ("500T-flops", "flops", 5e14), ("2.5e12-FLOPs", "flops", 2.5e12),
    ],
)  # fmt: skip
def test_parse_budget(text, kind, amount):
    budget = C.parse_budget(text)
    assert budget.kind == kind and budget.amount == pytest.approx(amount)
    assert C.parse_budget(str(budget)) == budget  # the canonical spelling parses back


@pytest.mark.parametrize("text", ["", "10", "ten minutes", "-5m", "0s", "10x", "5q-images", "inf-flops", "1e999-flops", "0.5-images", "10m-flops"])
def test_parse_budget_rejects_malformed(text):
    with pytest.raises(UserError, match="budget"):
        C.parse_budget(text)


def test_parse_lrs_and_presets():
    assert C.parse_lrs("1e-4, 3e-4,1e-3") == [1e-4, 3e-4, 1e-3]
    for bad in ("", "1e-3,,1e-4", "fast", "0", "-1e-3", "1e-3,0.001", "nan", [True], ["a"], [None]):
        with pytest.raises(UserError, match="lr"):
            C.parse_lrs(bad)
    for parse, bad in ((C.parse_seeds, [1.5]), (C.parse_seeds, ["a"]), (C.parse_guidances, [None]), (C.parse_objectives, [5])):
        with pytest.raises(UserError, match="malformed"):  # lists from the Python API, item by item as the flags' text
            parse(bad)
    assert C.parse_presets(" dit-tiny ,unet-tiny") == ["dit-tiny", "unet-tiny"]
    for bad, msg in (("dit-tiny,nope", "unknown preset 'nope'"), ("", "presets"), ("dit-tiny,dit-tiny", "repeats")):
        with pytest.raises(UserError, match=msg):
            C.parse_presets(bad)


def test_schedule_for_each_kind_of_budget():
    fractions = C.eval_fractions(0.25)
    assert fractions == [0.25, 0.5, 0.75, 1.0] and C.eval_fractions(0.3) == [0.3, 0.6, 0.9, 1.0] and C.eval_fractions(1) == [1.0]
    assert C.eval_fractions(0.3333333) == [0.3333333, 0.6666666, 1.0]  # not a point at 0.9999999 and another at 1
    images = C.schedule(C.parse_budget(BUDGET), fractions, batch_size=32, gflops_per_image=1.0)
    assert [(t.kind, t.value) for t in images] == [("steps", s) for s in STEPS]
    # FLOPs: 3 x forward GFLOPs per image; 3 * 0.5e9 * 640 FLOPs buy the same 640 images.
    flops = C.schedule(C.Budget("flops", 3 * 0.5e9 * 640), fractions, batch_size=32, gflops_per_image=0.5)
    assert [t.value for t in flops] == STEPS
    seconds = C.schedule(C.parse_budget("90s"), fractions, batch_size=32, gflops_per_image=1.0)
    assert [(t.kind, t.value) for t in seconds] == [("seconds", 22.5), ("seconds", 45.0), ("seconds", 67.5), ("seconds", 90.0)]
    # Points that round to the same optimiser step are merged; the last always ends the budget.
    tiny = C.schedule(C.parse_budget("40-images"), fractions, batch_size=32, gflops_per_image=1.0)
    assert [(t.point, t.value, t.fraction) for t in tiny] == [(1, 1, 1.0)]
    for bad in (0, -0.5, 1.5, math.nan):
        with pytest.raises(UserError, match="eval-every-frac"):
            C.eval_fractions(bad)


def test_pick_best_breaks_fid_ties_on_label_accuracy():
    runs = [
        {"lr": 1, "final": {"fid": 5.0, "label_accuracy": 0.5}},
        {"lr": 2, "final": {"fid": 4.0, "label_accuracy": 0.4}},
        {"lr": 3, "final": {"fid": 4.0, "label_accuracy": 0.6}},
        {"lr": 4, "final": {"fid": math.nan, "label_accuracy": 1.0}},
        {"lr": 5, "final": None},
    ]
    assert C.pick_best(runs)["lr"] == 3
    assert C.pick_best([runs[3], runs[4], runs[0]])["lr"] == 1


def test_read_jsonl_ignores_and_repairs_a_torn_last_line(tmp_path):
    path = tmp_path / "evals.jsonl"
    path.write_text('{"point": 1}\n{"point": 2}\n{"poi')
    assert read_jsonl(path) == [{"point": 1}, {"point": 2}]
    assert path.read_text().endswith('{"poi')  # reading alone leaves the file as it is
    assert read_jsonl(path, repair=True) == [{"point": 1}, {"point": 2}]
    append_jsonl(path, {"point": 3})
    assert path.read_text() == '{"point": 1}\n{"point": 2}\n{"point": 3}\n'
    assert read_jsonl(tmp_path / "missing.jsonl") == []


# ---- end to end --------------------------------------------------------------------------------

EVERY = 0.5  # evaluated at 10 and 20 steps
E2E_STEPS = [10, 20]


class _Interrupt(KeyboardInterrupt):
    pass


@pytest.fixture(scope="module")
def meter(mnist_dir):
    """The real evaluator, scored against 2,000 test images instead of 10,000 (seconds saved)."""
    from simple_dit import evaluate

    load = evaluate.load_dataset

    def small_test_split(name, split="train", data_dir=None, *args, **kwargs):
        ds = load(name, split, data_dir, *args, **kwargs)
        if split == "test":
            ds = dataclasses.replace(ds, images=ds.images[:2000], labels=ds.labels[:2000])
        return ds

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "load_dataset", small_test_split)
        meter = evaluate.QualityMeter("mnist", str(mnist_dir), progress=False)
    meter.bootstrap = 50  # intervals from fewer resamples: as real, and cheaper
    return meter


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, mnist_dir, meter):
    """A comparison killed while training the second segment of its second run (just before
    that segment's checkpoint, after some of its metrics were logged), then run again to the end;
    records what the second invocation did."""
    import simple_dit.train

    out = tmp_path_factory.mktemp("compare") / "report"
    kwargs = dict(lrs=LRS, eval_every_frac=EVERY, data_dir=str(mnist_dir), log=lambda msg: None, meter=meter, **SETTINGS)
    evaluate, train = C.runner._evaluate, C.runner._train
    calls = {"evaluate": 0, "train": 0}

    def counting(name, fn, interrupt_at=None):
        def wrapper(*args, **kw):
            calls[name] += 1
            if calls[name] == interrupt_at:
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(simple_dit.train, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(_Interrupt()))
                    return fn(*args, **kw)
            return fn(*args, **kw)

        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner, "_train", counting("train", train, interrupt_at=4))
        with pytest.raises(_Interrupt):
            C.compare(PRESETS, BUDGET, out, **kwargs)
    before = {name: (out / "runs" / name / C.EVALS_NAME).read_bytes() for name in RUN_NAMES[:2]}

    calls.update(evaluate=0, train=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner, "_evaluate", counting("evaluate", evaluate))
        mp.setattr(C.runner, "_train", counting("train", train))
        results = C.compare(PRESETS, BUDGET, out, **kwargs)
    return {"out": out, "results": results, "before": before, "calls": dict(calls), "kwargs": kwargs}


def test_a_stop_signal_while_compare_trains_says_how_to_continue_it(tmp_path, mnist_dir, meter, monkeypatch):
    """Training's own message points to train's --resume, which compare does not have."""
    import signal

    from simple_dit.errors import Interrupted

    def stopped(*args, **kwargs):
        raise Interrupted(signal.SIGTERM, "stopped by SIGTERM at step 3; checkpoint saved, --resume continues")

    monkeypatch.setattr(C.runner, "_train", stopped)
    kwargs = dict(lrs=LRS, eval_every_frac=EVERY, data_dir=str(mnist_dir), log=lambda msg: None, meter=meter, **SETTINGS)
    with pytest.raises(Interrupted) as info:
        C.compare("dit-tiny", BUDGET, tmp_path / "c", **kwargs)
    assert info.value.signum == signal.SIGTERM and "--resume" not in str(info.value)
    assert "the same compare command continues the comparison" in str(info.value)


def test_a_point_lost_from_evals_jsonl_is_not_rescored_from_later_weights(resumed, tmp_path):
    out = tmp_path / "report"
    shutil.copytree(resumed["out"], out)
    evals = out / "runs" / RUN_NAMES[0] / C.EVALS_NAME
    evals.write_text("".join(evals.read_text().splitlines(keepends=True)[1:]))  # point 1's record gone, point 2's kept
    before = snapshot(out)
    with pytest.raises(UserError, match="has no record of evaluation point 1 .10 steps., but the run has trained past it"):
        C.compare(PRESETS, BUDGET, out, **resumed["kwargs"])
    assert {k: v for k, v in snapshot(out).items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


@pytest.mark.parametrize("kept", [1, 0])
def test_a_point_missing_from_a_run_whose_weights_are_gone_keeps_the_other_records(kept, resumed, tmp_path):
    """Training the run again would have replaced its other points' records (and on another
    machine, with other scores): it is refused, and nothing is deleted; so too where no record is
    left, the scored points' grids showing that the run had weights."""
    out = tmp_path / "report"
    shutil.copytree(resumed["out"], out, ignore=shutil.ignore_patterns("*.safetensors"))
    evals = out / "runs" / RUN_NAMES[0] / C.EVALS_NAME
    evals.write_text("".join(evals.read_text().splitlines(keepends=True)[:kept]))  # point 2's record gone, or both
    before = {k: v for k, v in snapshot(out).items() if k != ".lock"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner, "_train", lambda *a, **k: pytest.fail("trained again"))
        with pytest.raises(UserError, match=f"has no record of evaluation point {kept + 1} .* and the run's weights are gone"):
            C.compare(PRESETS, BUDGET, out, **resumed["kwargs"])
    assert {k: v for k, v in snapshot(out).items() if k != ".lock"} == before


def test_compare_writes_a_consistent_report(resumed):
    out, results = resumed["out"], resumed["results"]
    for name in ("report.md", "report.html", "results.json", "loss.png", "samples_dit-tiny.png", "samples_unet-tiny.png",
                 "quality_vs_images.png", "quality_vs_seconds.png", "quality_vs_flops.png", "guidance_frontier.png", "verdict.png"):  # fmt: skip
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))

    lrs = C.parse_lrs(LRS)
    assert [e["preset"] for e in results["presets"]] == ["dit-tiny", "unet-tiny"]
    assert [e["label"] for e in results["presets"]] == ["dit-tiny (eps)", "unet-tiny (eps)"]
    for entry in results["presets"]:
        assert entry["params"] > 0 and entry["gflops_per_image"] > 0 and entry["images_per_s"] > 0
        assert entry["best_lr"] in lrs and entry["best_guidance"] == 3.0
        assert [r["lr"] for r in entry["runs"]] == lrs and [r["seed"] for r in entry["runs"]] == [0, 0]
        for run in entry["runs"]:
            evals = run["evals"]
            assert [e["step"] for e in evals] == E2E_STEPS and [e["point"] for e in evals] == [1, 2]
            assert [e["images_seen"] for e in evals] == [32 * s for s in E2E_STEPS]
            assert all(e["n"] == 60 and e["sampler"] == "ddim" and math.isfinite(e["fid"]) for e in evals)
            assert all(0 <= e[k] <= 1 for e in evals for k in ("label_accuracy", "precision", "recall"))
            # Every score has its bootstrap interval, around it.
            assert all(e[f"{k}_ci"][0] <= e[k] <= e[f"{k}_ci"][1] for e in evals for k in ("fid", "label_accuracy", "precision", "recall"))
            assert all(e["guidance"] == 3.0 and [g["guidance"] for g in e["by_guidance"]] == [3.0] for e in evals)
            assert not (out / run["run_dir"] / "guidance.json").exists()  # one guidance scale: nothing picked
            assert 0 < evals[0]["train_seconds"] < evals[1]["train_seconds"]
            assert all(e["machine"] == results["machine"]["device"] for e in evals)  # what trained it, for the report
            assert run["final"] == evals[-1] and run["complete"]
            # One loss record per logged step, even where a killed segment had logged some already.
            steps = [p["step"] for p in run["loss"]]
            assert steps == sorted(set(steps)) and steps[-1] == 20
            assert (out / run["run_dir"] / "checkpoint.safetensors").is_file()
        best = min(entry["runs"], key=lambda r: (r["final"]["fid"], -r["final"]["label_accuracy"]))
        assert entry["best_lr"] == best["lr"]
        # One seed: the means are that seed's numbers, the spread its bootstrap interval.
        for k in ("fid", "label_accuracy", "precision", "recall"):
            assert entry["best"][k] == best["final"][k] and entry["best_stats"][k]["kind"] == "ci"
            assert [entry["best_stats"][k]["lo"], entry["best_stats"][k]["hi"]] == best["final"][f"{k}_ci"]
    assert 0 < results["floor"]["fid"] and results["floor"]["n"] == 60
    assert [v["metric"] for v in results["verdict"]] == ["fid", "label_accuracy"]

    html = (out / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert len(sources) == 8 and all(s.startswith("data:image/png;base64,") for s in sources)  # 2 grids + 6 figures
    assert "<link" not in html and "<script" not in html  # nothing to fetch
    md = (out / "report.md").read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / image).is_file(), image
    for entry in results["presets"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {entry['label']} |"))
        assert f"| {entry['best_lr']:g} |" in row and f"{entry['best']['fid']:.2f}" in row
        assert entry["preset"] in html and f"{entry['best']['fid']:.2f}" in html
    assert "lowest FID among the guidance scales" in md and ("ahead of" in md or "tie with" in md)


def test_resume_redoes_nothing_that_was_finished(resumed):
    out, before, calls = resumed["out"], resumed["before"], resumed["calls"]
    # The second invocation skipped run 1, kept run 2's first point and trained run 2 on from its
    # step-10 checkpoint: 1 + 2 + 2 segments and as many evaluations.
    assert calls == {"evaluate": 5, "train": 5}
    first, second = (out / "runs" / name / C.EVALS_NAME for name in RUN_NAMES[:2])
    assert first.read_bytes() == before[RUN_NAMES[0]] and len(read_jsonl(first)) == 2
    assert before[RUN_NAMES[1]].count(b"\n") == 1
    assert second.read_bytes().startswith(before[RUN_NAMES[1]]) and len(read_jsonl(second)) == 2
    # The killed segment had logged steps 15 and 20 before it died; the resumed training dropped
    # them from metrics.jsonl before redoing those steps.
    raw = [r["step"] for r in read_jsonl(second.parent / "metrics.jsonl")]
    assert raw == [5, 10, 15, 20] and [r["step"] for r in C.read_metrics(second.parent)] == [5, 10, 15, 20]

    # The interrupted run ends exactly where an uninterrupted one does.
    straight = out.parent / "straight"
    C.compare("dit-tiny", BUDGET, straight, **dict(resumed["kwargs"], lrs="3e-3"))
    keys = ("step", "images_seen", "fid", "label_accuracy", "precision", "recall")
    scores = [[{k: e[k] for k in keys} for e in read_jsonl(d / "runs" / RUN_NAMES[1] / C.EVALS_NAME)] for d in (out, straight)]
    assert scores[0] == scores[1]

    # A finished comparison run again only rewrites its report.
    snapshots = {name: (out / "runs" / name / C.EVALS_NAME).read_bytes() for name in RUN_NAMES}
    (out / "report.html").unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner, "_train", lambda *a, **k: pytest.fail("trained again"))
        mp.setattr(C.runner, "_evaluate", lambda *a, **k: pytest.fail("evaluated again"))
        C.compare(PRESETS, BUDGET, out, **resumed["kwargs"])
    assert (out / "report.html").is_file()
    assert snapshots == {name: (out / "runs" / name / C.EVALS_NAME).read_bytes() for name in RUN_NAMES}


def test_rerun_with_other_settings_is_refused(resumed):
    with pytest.raises(UserError, match="eval-n 60, not 100"):
        C.compare(PRESETS, BUDGET, resumed["out"], **dict(resumed["kwargs"], eval_n=100))
    with pytest.raises(UserError, match="budget 640-images, not 1280-images"):
        C.compare(PRESETS, "1280-images", resumed["out"], **resumed["kwargs"])


def test_time_budget_stops_each_segment_at_its_share_of_the_seconds(tmp_path, mnist_dir, meter):
    budget = C.parse_budget("1s")
    settings = C.Settings(["dit-tiny"], [1e-3], budget, [0.5, 1.0], 60, 3, None, [2.0], "mnist", [0], "fp32")
    targets = C.schedule(budget, settings.fractions, batch_size=32, gflops_per_image=1.0)
    run_dir = tmp_path / "run"
    C.runner._run_one("dit-tiny", 1e-3, settings, run_dir, targets, data_dir=str(mnist_dir), device="cpu", log=lambda m: None, meter=meter)
    evals = read_jsonl(run_dir / C.EVALS_NAME)
    assert [(e["target_kind"], e["target"]) for e in evals] == [("seconds", 0.5), ("seconds", 1.0)]
    # Each segment stops at the first step that reaches its target.
    assert 0.5 <= evals[0]["train_seconds"] < 1.0 <= evals[1]["train_seconds"]
    assert evals[0]["step"] < evals[1]["step"]


# ---- seeds, objectives and guidance scales -----------------------------------------------------

SWEEP = dict(lrs="1e-3", eval_every_frac=1.0, eval_n=30, steps=2, precision="fp32", guidances="1,2", objectives="eps,flow", device="cpu")
SWEEP_RUNS = ["dit-tiny_lr0.001", "dit-tiny_flow_lr0.001", "dit-tiny_lr0.001_seed1", "dit-tiny_flow_lr0.001_seed1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mnist_dir, meter):
    """dit-tiny with its own objective (eps) and flow, at two guidance scales: seed 0 through the
    API, then extended to seeds 0,1 through the command line; records what the extension trained."""
    from simple_dit.cli import main

    out = tmp_path_factory.mktemp("sweep") / "report"
    C.compare("dit-tiny", "320-images", out, seeds="0", data_dir=str(mnist_dir), log=lambda m: None, meter=meter, **SWEEP)
    trained, train = [], C.runner._train
    argv = ["compare", "--presets", "dit-tiny", "--budget", "320-images", "--lrs", "1e-3", "--eval-every-frac", "1", "--eval-n", "30",
            "--steps", "2", "--precision", "fp32", "--guidances", "1,2", "--objective", "eps,flow", "--seeds", "0,1",
            "--data-dir", str(mnist_dir), "--device", "cpu", "--out", str(out)]  # fmt: skip
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        mp.setattr(C.runner, "_train", lambda config, run_dir, **kw: (trained.append(run_dir.name), train(config, run_dir, **kw))[1])
        mp.setattr(C.runner._Meters, "get", lambda *a: meter)
        assert main(argv) == 0
    return {"out": out, "trained": trained, "stdout": stdout.getvalue(), "results": json.loads((out / "results.json").read_text()),
            "kwargs": dict(SWEEP, seeds="0,1", data_dir=str(mnist_dir), log=lambda m: None, meter=meter)}  # fmt: skip


def test_each_seed_and_objective_is_its_own_run(sweep):
    from simple_dit.checkpoint import load_config

    out = sweep["out"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(SWEEP_RUNS)
    assert sweep["trained"] == SWEEP_RUNS[2:]  # the extension trained the new seeds only
    for name in SWEEP_RUNS:
        config = load_config(out / "runs" / name)
        assert config.diffusion.objective == ("flow" if "flow" in name else "eps")
        assert config.train.seed == (1 if name.endswith("seed1") else 0)
        (record,) = read_jsonl(out / "runs" / name / C.EVALS_NAME)
        assert record["sampler"] == ("euler" if "flow" in name else "ddim")
        assert [g["guidance"] for g in record["by_guidance"]] == [1.0, 2.0]


def test_mean_spread_and_verdict_over_seeds(sweep):
    from simple_dit.evaluate import GUIDANCE_RULE, pick_guidance

    results, out = sweep["results"], sweep["out"]
    assert results["settings"]["seeds"] == [0, 1] and results["settings"]["objectives"] == ["eps", "flow"]
    assert results["settings"]["guidances"] == [1.0, 2.0] and results["settings"]["guidance_rule"] == GUIDANCE_RULE
    assert [e["label"] for e in results["presets"]] == ["dit-tiny (eps)", "dit-tiny (flow)"]
    for entry in results["presets"]:
        (agg,) = entry["lrs"]
        finals = {r["seed"]: r["final"] for r in entry["runs"]}
        assert sorted(finals) == [0, 1] == agg["seeds"]
        # The guidance: the rule applied to the seed means of the final scores.
        means = [{"guidance": g, **{m: sum(next(x for x in finals[s]["by_guidance"] if x["guidance"] == g)[m] for s in (0, 1)) / 2
                                    for m in ("fid", "label_accuracy")}} for g in (1.0, 2.0)]  # fmt: skip
        assert entry["best_guidance"] == agg["guidance"] == pick_guidance(means)["guidance"]
        for m in ("fid", "label_accuracy", "precision", "recall"):
            values = [next(x for x in finals[s]["by_guidance"] if x["guidance"] == entry["best_guidance"])[m] for s in (0, 1)]
            stat = entry["best_stats"][m]
            assert stat["values"] == values and stat["kind"] == "min-max"
            assert stat["mean"] == pytest.approx(sum(values) / 2) == entry["best"][m]
            assert (stat["lo"], stat["hi"], stat["spread"]) == pytest.approx((min(values), max(values), max(values) - min(values)))
        assert [row["guidance"] for row in agg["guidances"]] == [1.0, 2.0]
    assert [v["metric"] for v in results["verdict"]] == ["fid", "label_accuracy"]
    for v in results["verdict"]:
        (other,) = v["others"]
        a, b = (next(e["best_stats"][v["metric"]] for e in results["presets"] if e["label"] == label) for label in (v["leader"], other["label"]))
        assert other["difference"] == pytest.approx(abs(a["mean"] - b["mean"]))
        assert other | C.difference_test(a, b) == other and other["tie"] == (other["p"] >= 0.05) and other["seeds"] == [2, 2]
    lines = results["verdict_text"]
    assert len(lines) == 2 and all(("tie with" in line) != ("ahead of" in line) and "Welch's t-test over 2 and 2 seeds" in line for line in lines)
    assert all(line in sweep["stdout"] for line in lines)
    # One preset, two objectives: the objective's effect is the whole verdict, said once more as such.
    assert results["effects"] == [{"factor": "objective", "fixed": "dit-tiny", "verdict": results["verdict"]}]
    assert results["effects_text"] == [f"objectives of dit-tiny: {line}" for line in lines]
    md = (out / "report.md").read_text()
    assert all(line in md for line in lines + results["effects_text"]) and "mean (min–max) over 2 seeds" in md and GUIDANCE_RULE in md
    assert all(line in sweep["stdout"] for line in results["effects_text"])
    assert "![" in md and "guidance_frontier.png" in md and (out / "guidance_frontier.png").stat().st_size > 0
    # Two scales swept: every pick is at an edge of the range, and the report says so.
    assert f"The guidance picked for {', '.join(e['label'] for e in results['presets'])} is at the edge of the swept scales (1–2)" in md
    for entry in results["presets"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {entry['label']} |"))
        fid = entry["best_stats"]["fid"]
        assert f"{fid['mean']:.2f} ({fid['lo']:.2f}–{fid['hi']:.2f})" in row


def test_each_run_records_the_guidance_its_final_evaluation_picked(sweep):
    from simple_dit.evaluate import pick_guidance
    from simple_dit.sample import Pipeline

    for name in SWEEP_RUNS:
        run_dir = sweep["out"] / "runs" / name
        (record,) = read_jsonl(run_dir / C.EVALS_NAME)
        recorded = json.loads((run_dir / "guidance.json").read_text())
        assert recorded["guidance"] == record["guidance"] == pick_guidance(record["by_guidance"])["guidance"]
        assert recorded["scores"] == record["by_guidance"] and recorded["n"] == 30
        assert record["fid"] == next(g["fid"] for g in record["by_guidance"] if g["guidance"] == record["guidance"])
        assert Pipeline.from_pretrained(run_dir).guidance == recorded["guidance"]


def test_finished_sweep_is_not_redone_and_keeps_its_guidances(sweep):
    snapshots = {name: (sweep["out"] / "runs" / name / C.EVALS_NAME).read_bytes() for name in SWEEP_RUNS}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner, "_train", lambda *a, **k: pytest.fail("trained again"))
        mp.setattr(C.runner, "_evaluate", lambda *a, **k: pytest.fail("evaluated again"))
        C.compare("dit-tiny", "320-images", sweep["out"], **sweep["kwargs"])
    assert snapshots == {name: (sweep["out"] / "runs" / name / C.EVALS_NAME).read_bytes() for name in SWEEP_RUNS}
    with pytest.raises(UserError, match="guidances 1,2, not 1,3"):
        C.compare("dit-tiny", "320-images", sweep["out"], **dict(sweep["kwargs"], guidances="1,3"))


def test_settings_of_an_older_version_resume_or_are_refused(tmp_path):
    settings = C.Settings(["dit-tiny"], [1e-3], C.parse_budget("640-images"), [1.0], 60, 3, None, [3.0], "mnist", [0], "fp32")
    legacy = {"presets": ["dit-tiny"], "lrs": [1e-3], "fractions": [1.0], "eval_n": 60, "steps": 3, "sampler": None, "guidance": 3.0,
              "dataset": "mnist", "seed": 0, "precision": "fp32", "budget": {"kind": "images", "amount": 640.0, "text": "640-images"}}  # fmt: skip
    (tmp_path / C.SETTINGS_NAME).write_text(json.dumps(legacy))
    C.runner._check_settings(tmp_path, settings)  # its run directories are seed 0's: resumed
    assert json.loads((tmp_path / C.SETTINGS_NAME).read_text())["seeds"] == [0]
    (tmp_path / C.SETTINGS_NAME).write_text(json.dumps(dict(legacy, seed=5)))
    with pytest.raises(UserError, match="older simple-dit with --seed 5"):
        C.runner._check_settings(tmp_path, dataclasses.replace(settings, seeds=[5]))


def test_seed_stats_and_ties():
    assert C.seed_stats([1.0, 2.0, 3.0]) | {"values": None} == {"mean": 2.0, "spread": 1.0, "kind": "std", "lo": 1.0, "hi": 3.0, "values": None}
    assert C.seed_stats([1.0, 3.0])["kind"] == "min-max" and C.seed_stats([1.0, 3.0])["spread"] == 2.0
    assert C.seed_stats([2.0], ci=[1.5, 3.5]) | {"values": None} == {"mean": 2.0, "spread": 1.0, "kind": "ci", "lo": 1.5, "hi": 3.5, "values": None}
    assert C.seed_stats([2.0])["spread"] is None and math.isnan(C.seed_stats([1.0, None])["mean"])
    assert C.seed_stats([2.0], ci=[None, None])["spread"] is None  # an interval not computed: no spread, not a crash

    def entry(label, fid, acc):
        return {"label": label, "best_stats": {"fid": C.seed_stats(fid), "label_accuracy": C.seed_stats(acc)}}

    fid, acc = C.verdict([entry("a", [5.0, 6.0], [0.5, 0.6]), entry("b", [1.0, 1.5], [0.52, 0.58]), entry("c", [9.0, 9.0], [0.1, 0.1])])
    assert fid["leader"] == "b" and [(o["label"], o["tie"]) for o in fid["others"]] == [("a", False), ("c", False)]
    # b against a: Welch's t = 4.25 / sqrt(0.125/2 + 0.5/2) = 7.60 on 1.47 degrees of freedom
    assert fid["others"][0]["test"] == "welch" and fid["others"][0]["p"] == pytest.approx(0.0372, abs=1e-4)
    # a against c: 0.45 apart, t = 9, but on one degree of freedom (two seeds, c without spread): p = 0.07
    assert acc["leader"] == "a" and [(o["label"], o["tie"]) for o in acc["others"]] == [("b", True), ("c", True)]
    assert acc["others"][0]["difference"] == pytest.approx(0.0) and acc["others"][0]["p"] == pytest.approx(1.0)


def test_a_verdict_calls_a_difference_only_where_a_test_over_the_seeds_rejects_equal_means():
    """Overlapping seed bands are no win: {9, 10, 11} against {10.5, 11.5, 12.5} is 1.5 apart, more
    than either standard deviation (1.0), yet Welch's p is 0.14 (t = 1.84 on 4 degrees of freedom). One seed each is tested on its
    bootstrap intervals; one seed against several, or a seed without an interval, is not tested."""
    def entry(label, fid, ci=None):
        return {"label": label, "best_stats": {"fid": C.seed_stats(fid, ci), "label_accuracy": C.seed_stats(fid, ci)}}

    (fid, _) = C.verdict([entry("a", [9.0, 10.0, 11.0]), entry("b", [10.5, 11.5, 12.5])])
    (other,) = fid["others"]
    assert other["test"] == "welch" and other["p"] == pytest.approx(0.1401, abs=1e-4) and other["tie"] is True
    (fid, _) = C.verdict([entry("a", [9.0, 10.0, 11.0]), entry("b", [13.0, 14.0, 15.0])])
    assert fid["others"][0]["p"] == pytest.approx(0.0080, abs=1e-4) and fid["others"][0]["tie"] is False
    (fid, _) = C.verdict([entry("a", [1.0], [0.8, 1.2]), entry("b", [1.5], [1.3, 1.7])])
    # z = 0.5 / (hypot(0.2, 0.2) / 1.96) = 3.46
    assert fid["others"][0]["test"] == "bootstrap" and fid["others"][0]["p"] == pytest.approx(0.00053, abs=5e-5) and not fid["others"][0]["tie"]
    (fid, _) = C.verdict([entry("a", [1.0], [0.8, 1.2]), entry("b", [1.1], [0.9, 1.3])])
    assert fid["others"][0]["tie"] is True
    for entries in ([entry("a", [10.0]), entry("b", [10.01])], [entry("a", [1.0], [0.8, 1.2]), entry("b", [1.5, 1.6, 1.7])],
                    [entry("a", [0.9, 0.9]), entry("b", [1.0, 1.0])],  # identical seeds: no spread measured
                    [entry("a", [0.9], [0.9, 0.9]), entry("b", [1.0], [1.0, 1.0])]):  # nor in the evaluation samples
        (fid, _) = C.verdict(entries)
        assert fid["others"][0] | {"difference": None} == {"label": "b", "difference": None, "seeds": fid["others"][0]["seeds"],
                                                          "p": None, "test": None, "tie": None}  # fmt: skip


def test_every_pair_is_tested_not_only_each_against_the_leader():
    """The UNet against the article's DiT, both behind a smaller DiT: the verdict tests each against
    the leader; the pairwise table answers the question about the two others."""
    from simple_dit.compare.report import _pairwise_rows

    def entry(label, fid, acc):
        return {"label": label, "best_stats": {"fid": C.seed_stats(fid), "label_accuracy": C.seed_stats(acc)}}

    entries = [entry("mini", [0.5, 0.6, 0.7], [0.99, 0.99, 1.0]), entry("unet", [1.0, 1.2, 1.4], [0.97, 0.98, 0.99]),
               entry("dit", [9.0, 11.0, 13.0], [0.5, 0.7, 0.9]), entry("broken", [math.nan], [math.nan])]  # fmt: skip
    pairs = C.runner.pairwise(entries)
    assert [(p["a"], p["b"]) for p in pairs] == [("mini", "unet"), ("mini", "dit"), ("unet", "dit")]  # a preset without scores is left out
    unet_dit = pairs[2]
    assert unet_dit["fid"] == C.difference_test(entries[1]["best_stats"]["fid"], entries[2]["best_stats"]["fid"]) and unet_dit["fid"]["p"] < 0.05
    head, rows = _pairwise_rows(pairs)
    assert head == ["", "unet", "dit"] and rows[0][0] == "mini" and rows[1][1] == "" and rows[1][2].startswith(f"{unet_dit['fid']['p']:.3f}*")


def test_the_verdict_says_which_test_it_used():
    def entry(label, fid, ci=None):
        return {"label": label, "best_stats": {"fid": C.seed_stats(fid, ci), "label_accuracy": C.seed_stats(fid, ci)}}

    for entries, said in [
        ([entry("a", [1.0], [0.8, 1.2]), entry("b", [1.5], [1.3, 1.7])],
         "ahead of b 1.50 [1.30, 1.70] (difference 0.50, p < 0.001 on the evaluation samples only: one seed each, so the spread between "
         "training seeds is unknown)"),
        ([entry("a", [1.0], [0.8, 1.2]), entry("b", [1.5, 1.6, 1.7])], "not tested against b 1.60 ± 0.10 (difference 0.60; 1 seed against 3: no test)"),
        ([entry("a", [9.0, 10.0, 11.0]), entry("b", [10.5, 11.5, 12.5])], "tie with b 11.50 ± 1.00 (difference 1.50, p = 0.140, Welch's t-test over 3 and 3 seeds)"),
    ]:  # fmt: skip
        results = {"presets": entries, "verdict": C.verdict(entries)}
        assert said in C.verdict_lines(results)[0]


@pytest.mark.parametrize("t, df, p", [(12.7062, 1, 0.05), (4.302653, 2, 0.05), (2.776445, 4, 0.05), (2.228139, 10, 0.05),
                                      (1.983972, 100, 0.05), (0.0, 3, 1.0), (3.0, 2.5, 0.0726), (1.959964, 1e6, 0.05)])  # fmt: skip
def test_student_t_tail_matches_the_tables(t, df, p):
    assert C.runner.student_t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)


def test_effects_separate_the_backbone_from_the_objective():
    def entry(preset, objective, fid, acc, stats_key="best_stats"):
        stats = {"fid": C.seed_stats(fid), "label_accuracy": C.seed_stats(acc)}
        return {"label": f"{preset} ({objective})", "preset": preset, "objective": objective, stats_key: stats}

    entries = [entry("unet", "eps", [6.0, 7.0, 8.0], [0.7, 0.8, 0.9]), entry("dit", "eps", [50.0, 55.0, 60.0], [0.2, 0.2, 0.2]),
               entry("unet", "flow", [0.4, 0.5, 0.6], [0.98, 0.99, 1.0]), entry("dit", "flow", [0.5, 0.6, 0.7], [0.97, 0.98, 0.99])]  # fmt: skip
    found = {(e["factor"], e["fixed"]): e["verdict"] for e in C.effects(entries)}
    assert list(found) == [("backbone", "eps"), ("backbone", "flow"), ("objective", "unet"), ("objective", "dit")]
    fid = {key: (v[0]["leader"], [(o["label"], o["tie"]) for o in v[0]["others"]]) for key, v in found.items()}
    assert fid[("backbone", "eps")] == ("unet (eps)", [("dit (eps)", False)])
    assert fid[("backbone", "flow")] == ("unet (flow)", [("dit (flow)", True)])  # 0.1 apart: Welch's p = 0.29
    assert fid[("objective", "dit")] == ("dit (flow)", [("dit (eps)", False)])
    assert C.effects(entries[:2]) == []  # one objective: the verdict is the backbones' already
    # Only entries scored the same way are judged: an unconfirmed preset leaves its groups out.
    confirmed = [entry("unet", "eps", [6.0], [0.8], "confirmed_stats"), entry("unet", "flow", [0.5], [0.99], "confirmed_stats"),
                 entry("dit", "eps", [50.0], [0.2])]  # fmt: skip
    assert [(e["factor"], e["fixed"]) for e in C.effects(confirmed, "confirmed_stats")] == [("objective", "unet")]


# ---- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--presets", "dit-tiny,nope", "--budget", "640-images"], "unknown preset 'nope'"),
        (["--presets", "dit-tiny", "--budget", "lots"], "malformed budget 'lots'"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--lrs", "1e-3;3e-3"], "malformed --lrs"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--eval-every-frac", "2"], "--eval-every-frac"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--eval-n", "3"], "--eval-n"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--eval-n", "60001"], "more than the 60,000 training images"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--final-n", "60001"], "--final-n 60,001 is more than the 60,000 training images"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--sampler", "euler"], "sampler 'euler'"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--seeds", ""], "malformed --seeds ''"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--seeds", "0,x"], "malformed --seeds '0,x'"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--seeds", "1,1"], "--seeds repeats"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--seeds", "0,1", "--seed", "2"], "--seeds or --seed"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--objective", "foo"], "unknown objective 'foo'"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--objective", "eps,"], "malformed --objective"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--guidances", "1,x"], "malformed --guidances '1,x'"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--guidances", "1,nan"], "must be finite"),
        (["--presets", "dit-tiny", "--budget", "640-images", "--objective", "flow", "--sampler", "ddim"], "sampler 'ddim'"),
        (["--presets", "dit-tiny", "--budget", "1e300-images"], "more than a run can take"),
        (["--presets", "unet-tiny,dit-tiny", "--budget", "1e24-flops"], "steps at batch 32, more than a run can take"),
    ],
)
def test_cli_rejects_bad_input(args, fragment, tmp_path, capsys):
    from conftest import assert_user_error

    from simple_dit.cli import main

    rc = main(["compare", *args, "--out", str(tmp_path / "out")])
    assert_user_error(subprocess.CompletedProcess(args, rc, *capsys.readouterr()), fragment)
    assert rc == 2 and not (tmp_path / "out").exists()


def test_a_comparison_without_its_data_writes_nothing(tmp_path, monkeypatch):
    """The data was looked for only when the first run trained: compare.json and empty run
    directories were left, and the directory then refused other settings though nothing had trained."""
    monkeypatch.setenv("SIMPLE_DIT_DATA", str(tmp_path / "no-data-here"))
    with pytest.raises(UserError, match="SIMPLE_DIT_DATA=.* is missing"):
        C.compare("dit-tiny,unet-tiny", "300-images", tmp_path / "out", eval_n=50, steps=5)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("holding, fragment", [
    ({"report.md": "my notes", "notes.txt": "mine"}, "is not empty and holds no comparison (notes.txt)"),
    ({"compare.json": '{"presets": ['}, "compare.json is damaged, so its runs' settings are unknown"),
    ({"runs/dit-tiny_lr0.001/evals.jsonl": ""}, "holds runs but no compare.json"),
    ({"dit-tiny_lr0.001/checkpoint.safetensors": ""}, "holds no comparison (dit-tiny_lr0.001)"),  # the runs/ of a comparison
])  # fmt: skip
def test_compare_refuses_a_directory_that_is_not_a_comparison(holding, fragment, tmp_path, capsys):
    """A comparison writes its reports over the last ones: never over files that are not its."""
    from conftest import assert_user_error, snapshot

    from simple_dit.cli import main

    out = tmp_path / "out"
    for name, text in holding.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    rc = main(["compare", "--presets", "dit-tiny", "--budget", "320-images", "--lrs", "1e-3", "--out", str(out)])
    assert_user_error(subprocess.CompletedProcess([], rc, *capsys.readouterr()), fragment)
    assert snapshot(out) == before and not (out / ".lock").exists()


def test_cli_rejects_unwritable_out(tmp_path, capsys):
    from simple_dit.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["compare", "--presets", "dit-tiny", "--budget", "640-images", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simple-dit: error: cannot write to"), err


def test_parameter_matched_presets():
    import torch

    from simple_dit.config import get_preset
    from simple_dit.models import build_model, count_parameters

    def params(name):
        with torch.device("meta"):  # shapes only: no time spent initialising 32M weights
            return count_parameters(build_model(get_preset(name).model))

    for small, big in (("dit-unet-size", "unet-seed"), ("unet-dit-size", "dit-seed")):
        assert abs(params(small) / params(big) - 1) < 0.01, (small, big)
        assert get_preset(small).train.lr == 3e-4


def test_the_report_covers_every_run_in_the_directory(sweep, tmp_path):
    """An invocation that plans a part of the directory (here: one objective, one seed) still
    reports every run of the same settings there, e.g. a learning-rate grid for one objective
    and the other objective at the best rate only."""
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    (out / "runs" / "notes").mkdir()
    (out / "runs" / "notes" / C.EVALS_NAME).write_text("{}\n")  # not a run: ignored
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner, "_train", lambda *a, **k: pytest.fail("trained again"))
        mp.setattr(C.runner, "_evaluate", lambda *a, **k: pytest.fail("evaluated again"))
        results = C.compare("dit-tiny", "320-images", out, **dict(sweep["kwargs"], seeds="0", objectives="flow"))
    assert [e["label"] for e in results["presets"]] == ["dit-tiny (flow)", "dit-tiny (eps)"]
    assert results["settings"]["seeds"] == [0, 1] and sorted(results["settings"]["objectives"]) == ["eps", "flow"]
    for entry in results["presets"]:
        assert sorted(r["seed"] for r in entry["runs"]) == [0, 1] and [a["seeds"] for a in entry["lrs"]] != []
        same = next(e for e in sweep["results"]["presets"] if e["label"] == entry["label"])
        assert entry["best_stats"]["fid"]["values"] == same["best_stats"]["fid"]["values"]


def test_final_n_confirms_each_run_on_fresh_samples_once(sweep, tmp_path):
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    kwargs = dict(sweep["kwargs"], final_n=40)
    from simple_dit.diffusion import GUIDE_EVERY_STEP
    from simple_dit.sample import Pipeline

    sampled, draw = [], Pipeline.__call__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner, "_train", lambda *a, **k: pytest.fail("trained again"))
        mp.setattr(Pipeline, "__call__", lambda pipe, *a, **k: (sampled.append((pipe.config.diffusion.objective, k.get("guidance_interval"))),
                                                                 draw(pipe, *a, **k))[1])  # fmt: skip
        results = C.compare("dit-tiny", "320-images", out, **kwargs)
    # Both objectives are scored alike: guided at every step, though flow models default to less.
    assert {objective for objective, _ in sampled} == {"eps", "flow"} and {i for _, i in sampled} == {GUIDE_EVERY_STEP}
    for entry in results["presets"]:
        confirmations = []
        for run in entry["runs"]:
            records = read_jsonl(out / run["run_dir"] / C.runner.CONFIRM_NAME)
            # at the guidance the run's own final evaluation picked, as soon as it finished, and at
            # its preset's pick (on the seed means) where that is another scale
            picks = sorted({run["final"]["guidance"], entry["best_guidance"]})
            assert sorted(r["guidance"] for r in records) == picks
            for record in records:
                assert record["n"] == 40 and record["step"] == run["final"]["step"]
                assert record["seed"] == run["seed"] + C.runner.CONFIRM_SEED_OFFSET and "fid_ci" in record
            confirmations.append(next(r for r in records if r["guidance"] == entry["best_guidance"]))
        st = entry["confirmed_stats"]
        assert st["fid"]["values"] == [c["fid"] for c in confirmations] and st["fid"]["kind"] == "min-max"
        assert st["label_accuracy"]["values"] != entry["best_stats"]["label_accuracy"]["values"] or st["fid"]["values"] != entry["best_stats"]["fid"]["values"]
    assert [v["metric"] for v in results["confirmed_verdict"]] == ["fid", "label_accuracy"]
    # its own real-data floor: FID's bias depends on n, so the selection's floor is no yardstick here
    assert results["confirmed_floor"]["n"] == 40 and results["floor"]["n"] == kwargs["eval_n"]
    md = (out / "report.md").read_text()
    assert md.count("| real data (floor) |") == 2
    assert "Confirmed on 40 fresh samples" in md and all(line in md for line in results["confirmed_verdict_text"])
    snapshot = {p: p.read_bytes() for p in out.glob("runs/*/confirm.jsonl")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner, "_train", lambda *a, **k: pytest.fail("trained again"))
        mp.setattr(C.runner, "_evaluate", lambda *a, **k: pytest.fail("evaluated again"))
        again = C.compare("dit-tiny", "320-images", out, **kwargs)
    assert snapshot == {p: p.read_bytes() for p in out.glob("runs/*/confirm.jsonl")}
    assert again["confirmed_verdict"] == results["confirmed_verdict"]
    with pytest.raises(UserError, match="--final-n must be 0"):
        C.compare("dit-tiny", "320-images", out, **dict(kwargs, final_n=3))


def test_seeds_confirmed_at_another_guidance_than_their_presets_pick_are_not_pooled(sweep, tmp_path):
    """A seed whose own final evaluation picked another scale than the seed means did was confirmed
    at that scale when it finished: pooled, the scales' difference would pass for seed spread. It is
    confirmed again at the pick while its weights are there; a report from records alone waits."""
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    kwargs = dict(sweep["kwargs"], final_n=40)
    C.compare("dit-tiny", "320-images", out, **kwargs)
    flow = out / "runs" / SWEEP_RUNS[-1] / C.runner.CONFIRM_NAME  # flow, seed 1
    entry = next(e for e in json.loads((out / "results.json").read_text())["presets"] if e["objective"] == "flow")
    other = 1.0 if entry["best_guidance"] == 2.0 else 2.0
    flow.write_text(json.dumps(read_jsonl(flow)[0] | {"guidance": other}) + "\n")  # as if its own pick had been the other scale
    with pytest.MonkeyPatch.context() as mp:  # both real-data floors come from the last report
        mp.setattr(C.runner._Meters, "get", lambda *a: pytest.fail("a floor was scored again"))
        assert main_report_only(out) == 0
    results = json.loads((out / "results.json").read_text())
    assert [e["label"] for e in results["presets"] if e["confirmed_stats"] is None] == ["dit-tiny (flow)"] and not results["confirmed_verdict"]
    assert "The confirmed verdict waits for the confirmation of dit-tiny (flow)" in (out / "report.md").read_text()
    evaluated, evaluate = [], C.runner._evaluate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner, "_train", lambda *a, **k: pytest.fail("trained again"))
        mp.setattr(C.runner, "_evaluate", lambda *a, **k: (evaluated.append(k["guidances"]), evaluate(*a, **k))[1])
        results = C.compare("dit-tiny", "320-images", out, **kwargs)
    assert evaluated == [[entry["best_guidance"]]]
    assert sorted(r["guidance"] for r in read_jsonl(flow)) == [1.0, 2.0]
    assert all(e["confirmed_stats"] for e in results["presets"]) and results["confirmed_verdict"]


def test_a_preset_whose_every_run_diverged_is_named_not_dropped_silently(sweep, tmp_path):
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out, ignore=shutil.ignore_patterns("*.safetensors"))
    for name in SWEEP_RUNS:
        if "flow" in name:
            evals = out / "runs" / name / C.EVALS_NAME
            (record,) = read_jsonl(evals)
            evals.write_text(json.dumps({k: record[k] for k in ("point", "fraction", "target_kind", "target", "step", "images_seen",
                                                                  "train_seconds")} | {"diverged": True, "message": "loss is nan"}) + "\n")  # fmt: skip
    assert main_report_only(out) == 0
    results = json.loads((out / "results.json").read_text())
    assert not results["verdict"]
    assert "Not in the verdict: dit-tiny (flow) (no learning rate with a finished seed and none diverged" in (out / "report.md").read_text()


def test_a_preset_out_of_the_verdict_does_not_hold_back_the_confirmed_one(sweep, tmp_path):
    """A third preset whose only run diverged has no scores to confirm: the two that do are still
    judged on their confirmation."""
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    C.compare("dit-tiny", "320-images", out, **dict(sweep["kwargs"], final_n=40))
    src, dst = out / "runs" / SWEEP_RUNS[0], out / "runs" / "unet-tiny_lr0.001"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "confirm.jsonl"))
    (dst / "config.json").write_text(json.dumps(json.loads((dst / "config.json").read_text()) | {"preset": "unet-tiny"}))
    (record,) = read_jsonl(dst / C.EVALS_NAME)
    (dst / C.EVALS_NAME).write_text(json.dumps({k: record[k] for k in ("point", "fraction", "target_kind", "target", "step", "images_seen",
                                                                      "train_seconds")} | {"diverged": True, "message": "loss is nan"}) + "\n")  # fmt: skip
    assert main_report_only(out) == 0
    results = json.loads((out / "results.json").read_text())
    assert "unet-tiny (eps)" in [e["label"] for e in results["presets"]] and results["verdict"] and results["confirmed_verdict"]


def test_continuing_a_confirmed_comparison_without_final_n_keeps_its_confirmations(sweep, tmp_path):
    """--final-n defaulted to 0: continuing a comparison without repeating it recorded 0 and the
    report's confirmed table and verdict vanished, with nothing said."""
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    C.compare("dit-tiny", "320-images", out, **dict(sweep["kwargs"], final_n=40))
    confirmed = json.loads((out / "results.json").read_text())["confirmed_verdict"]
    assert confirmed
    C.compare("dit-tiny", "320-images", out, **{k: v for k, v in sweep["kwargs"].items() if k != "final_n"})
    assert json.loads((out / C.SETTINGS_NAME).read_text())["final_n"] == 40
    assert json.loads((out / "results.json").read_text())["confirmed_verdict"] == confirmed


def test_report_only_without_the_dataset_leaves_out_a_confirmed_floor_it_cannot_score(sweep, tmp_path):
    """A comparison confirmed before the confirmation had its own floor: rewriting its report
    from records on a machine without the dataset leaves that row out, and says so."""
    from simple_dit.cli import main

    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    C.compare("dit-tiny", "320-images", out, **dict(sweep["kwargs"], final_n=40))
    last = json.loads((out / "results.json").read_text())
    del last["confirmed_floor"]
    (out / "results.json").write_text(json.dumps(last))

    def no_dataset(*args):
        raise UserError("no MNIST in nowhere")

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(C.runner._Meters, "get", no_dataset)
        assert main(["compare", "--report-only", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["confirmed_floor"] is None
    assert "real-data floor at 40 samples is left out (no MNIST in nowhere)" in err.getvalue()
    assert (out / "report.md").read_text().count("| real data (floor) |") == 1


def test_a_floor_is_reused_at_the_seed_it_was_drawn_with(sweep, tmp_path):
    """An invocation with --seeds 1 in a directory that also holds seed 0 draws its floor at seed
    1, while results.json's settings cover seeds 0 and 1: the floor records its own seed."""
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    (out / "compare.json").write_text(json.dumps(json.loads((out / "compare.json").read_text()) | {"seeds": [1]}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner._Meters, "get", lambda *a: sweep["kwargs"]["meter"])
        assert main_report_only(out) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["seeds"] == [0, 1] and results["floor"]["seed"] == 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner._Meters, "get", lambda *a: pytest.fail("the floor was scored again"))
        assert main_report_only(out) == 0


def test_a_final_record_from_before_guidance_sweeps_is_confirmed_at_the_default_scale(sweep, tmp_path):
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    run = out / "runs" / SWEEP_RUNS[0]
    records = [{k: v for k, v in r.items() if k not in ("guidance", "by_guidance")} for r in read_jsonl(run / C.EVALS_NAME)]
    (run / C.EVALS_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    C.compare("dit-tiny", "320-images", out, **dict(sweep["kwargs"], final_n=40))
    assert [r["guidance"] for r in read_jsonl(run / C.runner.CONFIRM_NAME)] == [1.0]


def main_report_only(out) -> int:
    from simple_dit.cli import main

    return main(["compare", "--report-only", "--out", str(out)])


def test_finished_runs_kept_without_their_checkpoints_are_reported_not_retrained(sweep, tmp_path):
    """A comparison kept in git (records, no weights) and continued elsewhere: its finished runs
    are reported as they were, and --final-n says plainly that it cannot confirm them."""
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    for checkpoint in out.glob("runs/*/checkpoint.safetensors"):
        checkpoint.unlink()
    elsewhere = out / "runs" / SWEEP_RUNS[-1] / C.EVALS_NAME  # one run came from another machine
    elsewhere.write_text("".join(json.dumps(r | {"machine": "another CPU"}) + "\n" for r in read_jsonl(elsewhere)))
    logged = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner, "_train", lambda *a, **k: pytest.fail("trained again"))
        mp.setattr(C.runner, "_evaluate", lambda *a, **k: pytest.fail("evaluated again"))
        results = C.compare("dit-tiny", "320-images", out, **dict(sweep["kwargs"], seeds="0", final_n=40, log=logged.append))
    assert sorted(run["run_dir"] for e in results["presets"] for run in e["runs"]) == sorted(f"runs/{r}" for r in SWEEP_RUNS)
    for entry in results["presets"]:
        same = next(e for e in sweep["results"]["presets"] if e["label"] == entry["label"])
        assert entry["best_stats"]["fid"]["values"] == same["best_stats"]["fid"]["values"] and entry["confirmed_stats"] is None
    # once for each scale it would be confirmed at: the two planned (seed 0) runs at their own pick,
    # every run at its preset's pick (on the seed means) where that is another scale
    expected = {(run["run_dir"], g) for e in results["presets"] for run in e["runs"]
                for g in ({e["best_guidance"]} | ({run["final"]["guidance"]} if run["seed"] == 0 else set()))}  # fmt: skip
    said = [m for m in logged if "cannot be confirmed" in m]
    assert sorted(said) == sorted(f"{Path(d).name}: its weights at step 10 are gone; it cannot be confirmed at guidance {g:g}" for d, g in expected)
    assert all((out / "runs" / r / C.EVALS_NAME).is_file() for r in SWEEP_RUNS)
    here = results["machine"]["device"]
    assert f"trained on {here} (3 runs); another CPU (1 run) with" in (out / "report.md").read_text()


def test_report_only_rewrites_the_report_from_the_runs_on_disk_and_trains_nothing(sweep, tmp_path, capsys):
    """An interim report of a grid from its records (no weights), e.g. while the grid trains on:
    settings from the comparison's own compare.json, every run it holds, unfinished ones too."""
    from simple_dit.cli import main

    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out, ignore=shutil.ignore_patterns("*.safetensors"))
    for name in ("report.md", "report.html", "results.json"):
        (out / name).unlink()
    unfinished = out / "runs" / SWEEP_RUNS[-1] / C.EVALS_NAME
    unfinished.write_text("")  # a run of the grid still in training: no point yet
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner, "_train", lambda *a, **k: pytest.fail("trained"))
        mp.setattr(C.runner, "_evaluate", lambda *a, **k: pytest.fail("evaluated"))
        mp.setattr(C.runner._Meters, "get", lambda *a: sweep["kwargs"]["meter"])
        assert main(["compare", "--report-only", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["seeds"] == [0, 1] and sorted(results["settings"]["objectives"]) == ["eps", "flow"]
    assert [e["label"] for e in results["presets"]] == ["dit-tiny (eps)", "dit-tiny (flow)"]  # the settings' order
    runs = {run["run_dir"]: run for entry in results["presets"] for run in entry["runs"]}
    assert sorted(runs) == sorted(f"runs/{r}" for r in SWEEP_RUNS)
    assert runs[f"runs/{SWEEP_RUNS[-1]}"]["final"] is None and not runs[f"runs/{SWEEP_RUNS[-1]}"]["complete"]
    eps, flow = results["presets"]
    same = {e["label"]: e for e in sweep["results"]["presets"]}
    assert eps["best_stats"]["fid"]["values"] == same["dit-tiny (eps)"]["best_stats"]["fid"]["values"]
    # the flow seed still in training is left out, not a NaN: the finished seed stands alone
    assert flow["lrs"][0]["seeds"] == [0] and not flow["lrs"][0]["complete"]
    seed0 = runs[f"runs/{SWEEP_RUNS[1]}"]["final"]
    assert flow["best_stats"]["fid"]["values"] == [r["fid"] for r in C.guidance_rows(seed0) if r["guidance"] == flow["best_guidance"]]
    md = (out / "report.md").read_text()
    assert "Cells: mean (min–max) over 2 seeds; one seed [its 95% bootstrap interval" in md and "1 (incomplete)" in md
    assert "report:" in capsys.readouterr().out


def test_report_only_keeps_a_run_whose_checkpoint_is_damaged(sweep, tmp_path):
    """A run the last invocation did not plan is found by its config: a damaged checkpoint falls
    back to the config.json beside it instead of dropping the run (and changing the verdict)."""
    from simple_dit.cli import main

    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    settings = json.loads((out / C.SETTINGS_NAME).read_text())
    (out / C.SETTINGS_NAME).write_text(json.dumps(settings | {"seeds": [0]}))  # the seed-1 runs are then only on disk
    checkpoint = out / "runs" / SWEEP_RUNS[2] / "checkpoint.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner._Meters, "get", lambda *a: sweep["kwargs"]["meter"])
        assert main(["compare", "--report-only", "--out", str(out)]) == 0
    runs = {run["run_dir"] for entry in json.loads((out / "results.json").read_text())["presets"] for run in entry["runs"]}
    assert runs == {f"runs/{r}" for r in SWEEP_RUNS}


def test_report_only_with_no_run_records_keeps_the_last_report(sweep, tmp_path, capsys):
    from simple_dit.cli import main

    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out, ignore=shutil.ignore_patterns("*.safetensors", "runs"))
    (out / "runs").mkdir()  # e.g. records not yet copied in
    before = snapshot(out)
    assert main(["compare", "--report-only", "--out", str(out)]) == 2
    assert "holds no runs yet" in capsys.readouterr().err and snapshot(out) == before


def test_report_only_names_a_directory_where_the_settings_belong(tmp_path, capsys):
    from simple_dit.cli import main

    (tmp_path / "out" / "compare.json").mkdir(parents=True)
    assert main(["compare", "--report-only", "--out", str(tmp_path / "out")]) == 2
    assert "compare.json is a directory, where the comparison keeps its settings" in capsys.readouterr().err


@pytest.mark.parametrize("key, value", [("lrs", "abc"), ("guidances", None), ("seeds", [-1]), ("presets", ["nope"]),
                                        ("eval_n", "60"), ("sampler", 3), ("fractions", "x"), ("fractions", [float("nan")]),
                                        ("fractions", [-1, 1]), ("fractions", []), ("final_n", -5), ("precision", "bogus"),
                                        ("asked", "all"), ("asked", [{"preset": "dit-tiny", "lr": 1e-3, "seed": 0}]),
                                        ("asked", [{"preset": "dit-tiny", "objective": "eps", "lr": -1, "seed": 0}])])  # fmt: skip
def test_report_only_of_a_damaged_compare_json_is_one_line(sweep, tmp_path, capsys, key, value):
    from simple_dit.cli import main

    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out, ignore=shutil.ignore_patterns("*.safetensors"))
    settings = json.loads((out / C.SETTINGS_NAME).read_text())
    settings[key] = value
    (out / C.SETTINGS_NAME).write_text(json.dumps(settings))
    before = snapshot(out)
    assert main(["compare", "--report-only", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is damaged or from an older simple-dit" in err[0] and snapshot(out) == before
    assert "restore it" in err[0] and "another --out" in err[0]  # as resuming it says: rerunning into it is refused
    # Resuming it is refused too, before its settings or results are rewritten.
    with pytest.raises(UserError, match="is damaged, so its runs' settings are unknown"):
        C.compare("dit-tiny", "320-images", out, **sweep["kwargs"])
    assert snapshot(out) == before


@pytest.mark.parametrize("damage", [
    lambda r: r.pop("step"), lambda r: r.update(fid="bad", target_kind="epochs"), lambda r: r.update(fid_ci=[1.0]),
    lambda r: r.update(by_guidance=[{}], images_seen=None), lambda r: r.update(grid="/etc/passwd"),
    lambda r: r.update(by_guidance=[]), lambda r: r.update(grid="../../x.png", sampler=["x"]), lambda r: r.update(fid=float("nan")),
    "<<<<<<< HEAD",
])  # fmt: skip
def test_a_damaged_evaluation_record_is_one_line_and_nothing_is_rewritten(sweep, tmp_path, capsys, damage):
    """A record edited by hand, or a damaged file (a merge's conflict markers), stops the report
    and the comparison with one line naming it: skipped, its point would count as not scored, and
    where the run's weights are gone its other records would be lost to training it again."""
    from simple_dit.cli import main

    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    damaged = out / "runs" / SWEEP_RUNS[0] / C.EVALS_NAME
    lines = [json.dumps(r) for r in read_jsonl(damaged)]
    if isinstance(damage, str):
        lines.append(damage)
    else:
        record = json.loads(lines[-1])
        damage(record)
        lines[-1] = json.dumps(record)
    damaged.write_text("".join(line + "\n" for line in lines))
    before = {k: v for k, v in snapshot(out).items() if k != ".lock"}
    assert main(["compare", "--report-only", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{len(lines)} of {damaged} is not" in err[0] and "restore the file" in err[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner, "_train", lambda *a, **k: pytest.fail("trained again"))
        with pytest.raises(UserError, match=f"{len(lines)} of {re.escape(str(damaged))} is not"):
            C.compare("dit-tiny", "320-images", out, **sweep["kwargs"])
    assert {k: v for k, v in snapshot(out).items() if k != ".lock"} == before


def test_a_final_record_that_lost_its_newline_and_damaged_training_logs_are_kept(sweep, tmp_path):
    """An editor that drops the file's last newline does not make a finished run without weights
    train again, nor do unreadable loss records (the report draws the others)."""
    from simple_dit.cli import main

    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out, ignore=shutil.ignore_patterns("*.safetensors"))
    evals = out / "runs" / SWEEP_RUNS[0] / C.EVALS_NAME
    records = read_jsonl(evals)
    evals.write_text(evals.read_text().rstrip("\n"))
    metrics = out / "runs" / SWEEP_RUNS[0] / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps({"step": "x", "loss": 1.0}) + "\n" + json.dumps({"step": 3, "loss": "nan"}) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner._Meters, "get", lambda *a: sweep["kwargs"]["meter"])
        assert main(["compare", "--report-only", "--out", str(out)]) == 0
    runs = {run["run_dir"]: run for entry in json.loads((out / "results.json").read_text())["presets"] for run in entry["runs"]}
    assert len(runs[f"runs/{SWEEP_RUNS[0]}"]["evals"]) == len(records) and runs[f"runs/{SWEEP_RUNS[0]}"]["complete"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner, "_train", lambda *a, **k: pytest.fail("trained again"))
        mp.setattr(C.runner, "_evaluate", lambda *a, **k: pytest.fail("scored again"))
        C.compare("dit-tiny", "320-images", out, **sweep["kwargs"])
    assert read_jsonl(evals) == records and evals.read_text().endswith("}\n")


def test_report_only_takes_the_real_data_floor_of_the_last_report(sweep, tmp_path):
    """Records kept in git rewrite their report on a machine without the dataset: the floor is the
    last report's, scored at the same sample count and seed; with another count it is scored again."""
    from simple_dit.cli import main

    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out, ignore=shutil.ignore_patterns("*.safetensors"))
    floor = json.loads((out / "results.json").read_text())["floor"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner._Meters, "get", lambda *a: pytest.fail("the floor was scored again"))
        assert main(["compare", "--report-only", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["floor"] == floor
    last = json.loads((out / "results.json").read_text())
    last["floor"]["n"] += 1  # scored at another count than these settings': not this comparison's floor
    (out / "results.json").write_text(json.dumps(last))
    scored = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.runner._Meters, "get", lambda *a: scored.append(a) or sweep["kwargs"]["meter"])
        assert main(["compare", "--report-only", "--out", str(out)]) == 0
    assert len(scored) == 1 and json.loads((out / "results.json").read_text())["floor"] == floor


def test_report_only_keeps_the_machine_that_trained_not_the_one_rewriting(sweep, tmp_path):
    """Records rewritten on a laptop still say what trained them (device, threads, torch)."""
    from simple_dit.cli import main

    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out, ignore=shutil.ignore_patterns("*.safetensors"))
    last = json.loads((out / "results.json").read_text())
    last["machine"] = {"device": "NVIDIA H200", "torch_threads": 7, "torch": "2.11.0+cu130"}
    (out / "results.json").write_text(json.dumps(last))
    assert main(["compare", "--report-only", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["machine"] == last["machine"]
    assert "with 7 torch threads" in (out / "report.md").read_text()
    last["machine"] = {"device": "NVIDIA H200", "torch_threads": "many"}  # damaged: this machine's, as with no report
    (out / "results.json").write_text(json.dumps(last))
    assert main(["compare", "--report-only", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["machine"]["torch_threads"] == torch.get_num_threads()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--presets", "dit-tiny"], "drop --presets"),
        (["--eval-n", "50"], "drop --eval-n"),
        ([], "holds no comparison"),
    ],
)
def test_report_only_refuses_settings_and_directories_without_a_comparison(args, fragment, tmp_path, capsys):
    from conftest import assert_user_error

    from simple_dit.cli import main

    (tmp_path / "out").mkdir()
    rc = main(["compare", "--report-only", *args, "--out", str(tmp_path / "out")])
    assert_user_error(subprocess.CompletedProcess(args, rc, *capsys.readouterr()), fragment)
    assert rc == 2 and list((tmp_path / "out").iterdir()) == []


def test_compare_without_presets_or_budget_is_a_clear_error(tmp_path, capsys):
    from simple_dit.cli import main

    assert main(["compare", "--budget", "1m", "--out", str(tmp_path / "out")]) == 2
    assert "needs --presets and --budget" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_compare_trains_each_preset_s_runs_together(tmp_path, mnist_dir, meter):
    """compare --runs-together: the runs of each preset train as one batched network and are
    scored like any other; the comparison then reports them as usual."""
    log = []
    results = C.compare(
        "dit-tiny,unet-tiny", "512-images", tmp_path, lrs="1e-3,3e-4", eval_n=20, steps=2, eval_every_frac=0.5,
        device="cpu", precision="fp32", log=log.append, meter=meter, together=4,
    )  # fmt: skip
    assert sum("2 runs of dit-tiny together" in line for line in log) == 2  # one group, two evaluation points
    assert sum("2 runs of unet-tiny together" in line for line in log) == 2
    # Each point's wall time, training and scoring apart, where a GPU's setup costs would show.
    assert sum(re.fullmatch(r"unet-tiny group: [\d,]+ steps reached in [\d.]+ s wall", line) is not None for line in log) == 2, log
    assert sum(re.fullmatch(r"unet-tiny group: point \d scored in [\d.]+ s wall", line) is not None for line in log) == 2, log
    assert not any("training to" in line and "together" not in line for line in log)
    for run_dir in (tmp_path / "runs").iterdir():
        evals = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
        assert [e["point"] for e in evals] == [1, 2] and all(e["fid"] > 0 for e in evals)
    assert {e["preset"] for e in results["presets"]} == {"dit-tiny", "unet-tiny"}
    assert all(math.isfinite(e["best_stats"]["fid"]["mean"]) for e in results["presets"])


def test_a_best_learning_rate_at_the_edge_of_those_swept_is_pointed_out():
    """As the guidance at an edge was: the rate is what a comparison is asked for, and one at the
    edge of the sweep may not be the best."""
    from simple_dit.compare.report import _lr_edge_note

    def preset(label, best, lrs):
        return {"label": label, "best_lr": best, "lrs": [{"lr": lr} for lr in lrs]}

    results = {"presets": [preset("unet-seed (eps)", 1e-4, [1e-4, 3e-4, 1e-3]), preset("dit-seed (eps)", 3e-4, [1e-4, 3e-4, 1e-3]),
                           preset("dit-mini (flow)", 3e-3, [3e-3])]}  # fmt: skip
    assert _lr_edge_note(results) == ("Best learning rates at the edge of those swept: unet-seed (eps) 0.0001 of 0.0001–0.001; "
                                      "a rate beyond the range may do better.")  # fmt: skip
    results["presets"] = results["presets"][1:]
    assert _lr_edge_note(results) is None


def test_the_machine_line_counts_every_finished_run():
    """A run recorded before machines were (docs/verdict-10m's unet-seed lr 1e-4) was left out:
    the counts came to 26 of its 27 runs."""
    from simple_dit.compare.report import _machines

    runs = [{"final": {"machine": "Xeon"}}] * 2 + [{"final": {"machine": "EPYC"}}, {"final": {"step": 10}}, {"final": None}]
    assert _machines({"presets": [{"runs": runs}]}) == "Xeon (2 runs); EPYC (1 run); not recorded (1 run)"
    assert _machines({"presets": [{"runs": runs[:2] + runs[3:]}]}) == "Xeon"  # one machine: named alone, as before


def test_a_learning_rate_missing_a_seed_is_marked_incomplete(sweep, tmp_path):
    """A seed whose run has not started leaves no records: its learning rate's row showed the
    other seed's count as if that were the whole grid."""
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    assert main_report_only(out) == 0
    assert "(incomplete)" not in (out / "report.md").read_text()
    shutil.rmtree(out / "runs" / "dit-tiny_lr0.001_seed1")  # as if not yet started
    assert main_report_only(out) == 0
    rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| dit-tiny (eps) | 0.001")]
    assert any(row.endswith("| 1 (incomplete) |") for row in rows), rows  # the learning rates' table, its seeds column


def test_the_runs_asked_for_are_recorded_and_those_not_finished_are_named(sweep, tmp_path):
    """compare.json's lists are the union of what each invocation asked; which runs were asked is
    recorded beside them, so that the report can say the grid is not whole and which runs are not
    counted (a preset or seed not yet started left no trace: the settings line read as a whole grid)."""
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    asked = json.loads((out / C.SETTINGS_NAME).read_text())["asked"]
    # The API's seed 0 first, then the command's seeds 0 and 1: each run once, in the order asked.
    assert [(a["objective"], a["seed"]) for a in asked] == [("eps", 0), ("flow", 0), ("eps", 1), ("flow", 1)]
    assert {a["preset"] for a in asked} == {"dit-tiny"} and {a["lr"] for a in asked} == {1e-3}
    C.compare("dit-tiny", "320-images", out, **dict(sweep["kwargs"], seeds="2", objectives="flow", lrs="3e-3"), final_n=0)
    shutil.rmtree(out / "runs" / "dit-tiny_flow_lr0.003_seed2")  # as if the last invocation had been stopped before it
    assert main_report_only(out) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["settings"]["asked"]) == 5
    assert results["unfinished"] == [{"preset": "dit-tiny", "objective": "flow", "lr": 3e-3, "seed": 2, "started": False}]
    md = (out / "report.md").read_text()
    assert "seeds 0, 1, 2 (each its own run; not every combination: 5 runs asked for)" in md, md[:3000]
    assert "Not yet counted, not finished: 1 of the 5 runs asked for (dit-tiny (flow) lr 0.003 seed 2 (not started))" in md
    # A run in training (records of its steps, no evaluation point yet) has started.
    (out / "runs" / "dit-tiny_flow_lr0.003_seed2").mkdir()
    shutil.copy(out / "runs" / "dit-tiny_flow_lr0.001" / "metrics.jsonl", out / "runs" / "dit-tiny_flow_lr0.003_seed2")
    assert main_report_only(out) == 0
    assert "(dit-tiny (flow) lr 0.003 seed 2 (unfinished))" in (out / "report.md").read_text()


def _copied_run(out: Path, source: str, lr: float, seed: int, scale_fid: float = 1.0, diverged: bool = False) -> None:
    """A copy of the sweep's run ``source`` kept as records (no weights), as the run of ``lr`` and
    ``seed``, its scores scaled or its one evaluation point a divergence."""
    from simple_dit.compare.budget import run_name

    config = json.loads((out / "runs" / source / "config.json").read_text())
    config["train"]["lr"], config["train"]["seed"] = lr, seed
    own = "flow" if "flow" in source else None
    copy = out / "runs" / run_name("dit-tiny", lr, seed, own)
    shutil.copytree(out / "runs" / source, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    (copy / "config.json").write_text(json.dumps(config))
    records = read_jsonl(copy / C.EVALS_NAME)
    if diverged:
        keep = ("point", "fraction", "target_kind", "target", "step", "images_seen", "train_seconds", "machine")
        records = [{**{k: r[k] for k in keep}, "diverged": True, "message": "training diverged"} for r in records]
    else:
        records = [dict(r, fid=r["fid"] * scale_fid, by_guidance=[dict(g, fid=g["fid"] * scale_fid) for g in r.get("by_guidance", [])]) for r in records]
    (copy / C.EVALS_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))


def _eps_entry(out: Path) -> dict:
    (eps,) = [e for e in json.loads((out / "results.json").read_text())["presets"] if e["objective"] == "eps"]
    return eps


def test_the_best_learning_rate_is_picked_among_those_with_every_seed(sweep, tmp_path):
    """A learning rate run at one seed beside one run at two was picked on a mean over other seeds
    when that one seed scored better; and still was where another objective had a seed more."""
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    _copied_run(out, "dit-tiny_lr0.001", 3e-3, 0, scale_fid=0.1)  # the one seed scored better
    assert main_report_only(out) == 0
    eps = _eps_entry(out)
    assert [(a["lr"], a["seeds"]) for a in eps["lrs"]] == [(1e-3, [0, 1]), (3e-3, [0])]
    assert eps["lrs"][1]["final"]["fid"] < eps["lrs"][0]["final"]["fid"] and eps["best_lr"] == 1e-3
    _copied_run(out, "dit-tiny_flow_lr0.001_seed1", 1e-3, 2)  # flow gains a seed eps lacks: the pick stays within eps's seeds
    assert main_report_only(out) == 0
    assert _eps_entry(out)["best_lr"] == 1e-3


def test_a_learning_rate_with_a_diverged_seed_does_not_take_the_preset_out_of_the_verdict(sweep, tmp_path):
    """A run that diverged at its last point has every record, so its learning rate counted as
    complete; where it was the only one, the preset had no best learning rate."""
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    shutil.rmtree(out / "runs" / "dit-tiny_lr0.001_seed1")
    _copied_run(out, "dit-tiny_lr0.001", 3e-3, 0)
    _copied_run(out, "dit-tiny_lr0.001", 3e-3, 1, diverged=True)
    assert main_report_only(out) == 0
    eps = _eps_entry(out)
    assert [(a["lr"], a["seeds"], a["diverged"]) for a in eps["lrs"]] == [(1e-3, [0], False), (3e-3, [0, 1], True)]
    assert eps["best_lr"] == 1e-3 and "Not in the verdict" not in (out / "report.md").read_text()


def test_the_report_says_how_the_runs_trained_where_they_differ():
    """Under a time budget a run in bf16, or compiled, sees more images: runs continued on another
    machine (``auto`` resolved otherwise) or with another --compile were mixed without a word."""
    from simple_dit.compare.report import _how_trained

    def results(*finals, precision="auto", compile=False):
        return {"settings": {"precision": precision, "compile": compile}, "presets": [{"runs": [{"final": f} for f in finals]}]}

    bf16, fp32 = {"train_precision": "bf16", "compiled": False}, {"train_precision": "fp32", "compiled": False}
    assert _how_trained(results(bf16, bf16)) == "precision auto (bf16)"
    assert _how_trained(results(bf16, fp32, bf16)) == "precision auto: bf16 (2 runs); fp32 (1 run)"
    assert _how_trained(results(bf16, {"step": 3})) == "precision auto: bf16 (1 run); not recorded (1 run); eager (1 run); not recorded (1 run)"
    assert _how_trained(results(bf16, dict(bf16, compiled=True))) == "precision auto (bf16); eager (1 run); compiled (1 run)"
    assert _how_trained(results({"step": 3}, precision="fp32", compile=True)) == "precision fp32, compiled"  # records from before


def test_each_evaluation_point_records_how_its_run_trained(sweep):
    for name in SWEEP_RUNS:
        (record,) = read_jsonl(sweep["out"] / "runs" / name / C.EVALS_NAME)
        assert record["train_precision"] == "fp32" and record["compiled"] is False
    assert "precision fp32." in (sweep["out"] / "report.md").read_text()


def test_a_report_leaves_no_sample_grid_of_an_earlier_report_beside_its_own(sweep, tmp_path):
    """Continuing a comparison with --objective eps,flow names the grids samples_<preset>_<objective>.png:
    the earlier report's samples_<preset>.png stayed beside them, showing what the report no longer does."""
    out = tmp_path / "report"
    shutil.copytree(sweep["out"], out)
    own = sorted(p.name for p in out.glob("samples_*.png"))
    assert own == ["samples_dit-tiny_eps.png", "samples_dit-tiny_flow.png"]
    shutil.copy(out / own[0], out / "samples_dit-tiny.png")
    assert main_report_only(out) == 0
    assert sorted(p.name for p in out.glob("samples_*.png")) == own
