"""Quality metrics: closed-form cases, and the evaluator on real, noisy and mislabelled images."""

import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from simple_dit.data import load_dataset
from simple_dit.errors import UserError
from simple_dit.evaluate import (
    QualityMeter,
    classify,
    frechet_distance,
    load_evaluator,
    precision_recall,
    score_features,
)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    # Exact sample statistics: FID = |mu_a - mu_b|^2 + sum_i (sqrt(var_a_i) - sqrt(var_b_i))^2.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    base = (base - base.mean(0)) / base.std(0)
    # Decorrelate exactly so the sample covariance is the identity.
    q, _ = torch.linalg.qr(base - base.mean(0))
    white = q * (len(base) - 1) ** 0.5
    a = white * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([0.0, 1.0, -1.0])
    b = white * torch.tensor([3.0, 2.0, 1.0]) + torch.tensor([2.0, 1.0, 0.0])
    expected = (2.0**2 + 0 + 1.0**2) + ((1 - 3) ** 2 + 0 + (0.5 - 1) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_is_symmetric_and_zero_on_identical_sets():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g)
    b = torch.randn(500, 8, generator=g) + 0.3
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, b) > 0.1


def test_precision_recall_hand_computed():
    # Reals on a line at 0,1,2,3 (k=1 radius 1 each); fakes: one at 0.5 (inside), one far away.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    fake = torch.tensor([[0.5], [100.0], [100.5]], dtype=torch.float64)
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(1 / 3)
    # Fake radii (k=1): 0.5 -> 99.5 (nearest other fake is 100), 100 -> 0.5, 100.5 -> 0.5.
    # Every real lies within 99.5 of the fake at 0.5.
    assert recall == pytest.approx(1.0)


def test_label_accuracy_and_class_balance_hand_computed():
    feats = torch.randn(8, 4, dtype=torch.float64)
    predicted = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2])
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    s = score_features(feats, predicted, labels, torch.randn(50, 4, dtype=torch.float64), num_classes=3)
    assert s.label_accuracy == pytest.approx(6 / 8)
    # Predicted histogram (2,4,2)/8 vs requested (2,2,4)/8: TV = 0.5 * (0 + 2 + 2) / 8.
    assert s.class_balance_tv == pytest.approx(0.25)


@pytest.fixture(scope="module")
def meter():
    return QualityMeter("mnist", progress=False)


def test_bundled_evaluator_is_accurate(meter):
    _, meta = load_evaluator("mnist")
    assert float(meta["test_accuracy"]) >= 0.993
    test = load_dataset("mnist", "test")
    assert (classify(meter.model, test.images) == test.labels).float().mean() >= 0.993


@pytest.mark.parametrize("damage, fragment", [
    (lambda path: path.write_bytes(path.read_bytes()[:100]), "are damaged"),  # truncated
    (lambda path: path.write_bytes(b""), "are damaged"),
    (lambda path: path.write_bytes(path.read_bytes()[:8] + b"{garbled" + path.read_bytes()[16:]), "are damaged"),
    (lambda path: path.unlink() or path.mkdir(), "is a directory, where the evaluator's weights are cached"),
])  # fmt: skip
def test_a_damaged_cached_evaluator_is_one_line_not_a_retraining(damage, fragment, tmp_path, monkeypatch):
    """(Fashion-MNIST's evaluator is trained on first use and cached; a copy of the bundled MNIST
    one stands in for it.)"""
    from simple_dit.evaluate import _bundled_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = tmp_path / "simple-dit" / "evaluators" / "evaluator-fashion-mnist.safetensors"
    cached.parent.mkdir(parents=True)
    shutil.copyfile(_bundled_path("mnist"), cached)
    damage(cached)
    monkeypatch.setattr("simple_dit.evaluate.train_evaluator", lambda *a, **k: pytest.fail("retrained"))
    with pytest.raises(UserError, match=fragment):
        load_evaluator("fashion-mnist")


def test_an_evaluator_that_cannot_be_cached_is_still_used(tmp_path, monkeypatch, capsys):
    from simple_dit.evaluate import Evaluator

    (tmp_path / "simple-dit").write_text("a file where the cache directory would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    trained = Evaluator()
    monkeypatch.setattr("simple_dit.evaluate.train_evaluator", lambda *a, **k: (trained, 0.9))
    model, meta = load_evaluator("fashion-mnist", progress=False)
    assert model is trained and meta["test_accuracy"] == "0.9000"
    assert "the fashion-mnist evaluator is not cached" in capsys.readouterr().err


def test_real_images_score_near_the_floor_and_corruptions_score_badly(meter):
    n = 1000
    test = meter.train_set  # a different random training subset than the floor's
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(123))[:n]
    real, labels = test.images[idx], test.labels[idx]
    floor = meter.floor(n)
    real_scores = meter.score(real, labels)
    assert real_scores.label_accuracy > 0.98
    assert real_scores.fid < 2 * floor.fid + 1.0
    assert real_scores.precision > 0.6 and real_scores.recall > 0.6

    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    noise_scores = meter.score(noise, labels)
    assert noise_scores.fid > 20 * max(floor.fid, 1.0)
    assert noise_scores.precision < 0.1

    shuffled = labels[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    shuffled_scores = meter.score(real, shuffled)
    assert shuffled_scores.label_accuracy < 0.3
    assert shuffled_scores.fid == pytest.approx(real_scores.fid)  # FID ignores labels


def test_eval_cli_on_npz_prints_json(tmp_path, meter):
    idx = torch.arange(300)
    images = meter.train_set.images[idx].permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "real.npz", arr_0=images, labels=meter.train_set.labels[idx].numpy())
    out = subprocess.run([sys.executable, "-m", "simple_dit.cli", "eval", str(tmp_path / "real.npz"), "--json"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("n", "fid", "label_accuracy", "precision", "recall", "floor_fid"):
        assert key in result
    assert result["n"] == 300 and result["label_accuracy"] > 0.98


def test_eval_cli_rejects_a_bad_npz(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    out = subprocess.run([sys.executable, "-m", "simple_dit.cli", "eval", str(tmp_path / "bad.npz")], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("simple-dit: error:") and "Traceback" not in out.stderr
    assert "not an .npz archive" in out.stderr and "pickle" not in out.stderr  # np.load's own guess is misleading


def _bad_npz_files(tmp_path) -> dict:
    images = np.zeros((10, 28, 28, 1), np.uint8)
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=images, labels=np.arange(10))
    files = {"empty": b"", "truncated": good.read_bytes()[:500]}
    for name, data in files.items():
        (tmp_path / f"{name}.npz").write_bytes(data)
    np.savez(tmp_path / "channels-first.npz", arr_0=images.transpose(0, 3, 1, 2), labels=np.arange(10))
    np.savez(tmp_path / "no-images.npz", arr_0=images[:0])
    np.savez(tmp_path / "too-many.npz", arr_0=np.zeros((60_001, 28, 28, 1), np.uint8))
    for name, labels in {"fewer-labels": np.arange(3), "2-d-labels": np.arange(10).reshape(2, 5),
                         "string-labels": np.array(list("abcdefghij")), "float-labels": np.arange(10) + 0.5}.items():  # fmt: skip
        np.savez(tmp_path / f"{name}.npz", arr_0=images, labels=labels)
    np.save(tmp_path / "lone-array.npy", images)
    # A header that claims a billion images over 7 KB of data: np.load would allocate 784 GB first.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 28, 28, 1)})
    with zipfile.ZipFile(tmp_path / "huge-header.npz", "w") as archive:
        archive.writestr("arr_0.npy", header.getvalue() + images.tobytes())
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    return {"weights-file": tmp_path / "model.safetensors"} | {name: tmp_path / f"{name}.npz" for name in [*files, "fewer-labels", "2-d-labels", "string-labels", "float-labels", "huge-header", "channels-first", "no-images", "too-many"]} | {
        "lone-array": tmp_path / "lone-array.npy"}


@pytest.mark.parametrize("name, fragment", [
    ("empty", "not an .npz"), ("truncated", "cannot read"), ("fewer-labels", "labels must be"), ("2-d-labels", "labels must be"),
    ("string-labels", "labels must be"), ("float-labels", "labels must be"), ("lone-array", "not an .npz"), ("huge-header", "the file is damaged"),
    ("channels-first", "(N, 28, 28, 1) (N, H, W, C), got uint8 (10, 1, 28, 28)"), ("no-images", "holds 0 images; scoring needs at least 6"),
    ("too-many", "holds 60,001 images, more than the 60,000 training images"), ("weights-file", "is not an .npz of images"),
])  # fmt: skip
def test_a_malformed_npz_is_one_line(tmp_path, name, fragment, capsys):
    from simple_dit.cli import main

    path = _bad_npz_files(tmp_path)[name]
    assert main(["eval", str(path), *(["--n", "200"] if name == "weights-file" else [])]) == 2  # the file, not the flag, is wrong
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simple-dit: error:") and str(path) in err[0], err
    assert fragment in err[0], err


def test_score_and_floor_refuse_labels_and_sizes_that_do_not_fit(meter):
    from simple_dit.errors import UserError

    images, labels = meter.train_set.images[:20], meter.train_set.labels[:20]
    for bad in (labels[:19], labels.float(), labels.view(4, 5), labels.tolist()):
        with pytest.raises(UserError, match="labels must be a tensor of 20 integer class indices"):
            meter.score(images, bad)
    for n in (-5, 0, 2.5, len(meter.train_set) + 1):
        with pytest.raises(UserError, match="the real-data floor takes"):
            meter.floor(n)
    for options, fragment in (({"bootstrap": 2.5}, "bootstrap must be"), ({"level": 1.5}, "confidence level"), ({"seed": 2.5}, "bootstrap seed")):
        with pytest.raises(UserError, match=fragment):
            meter.score(images, labels, **options)


def test_training_logs_quality_scores_with_the_loss(tmp_path):
    from simple_dit import get_preset
    from simple_dit.train import train

    config = get_preset("dit-tiny")
    config.train.max_steps, config.train.eval_every, config.train.eval_n = 10, 10, 20
    train(config, tmp_path / "run", progress=False, device="cpu", final_samples=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_fid" in r]
    assert [r["step"] for r in evals] == [10]
    assert evals[0]["eval_n"] == 20 and 0 <= evals[0]["eval_label_accuracy"] <= 1 and evals[0]["eval_fid"] > 0
    assert any("loss" in r and r["step"] == 10 for r in records)


# ---- bootstrap confidence intervals ------------------------------------------------------------


def test_bootstrap_replicates_with_unit_weights_are_the_point_estimates():
    """With every sample drawn once, the vectorised replicates equal the plain metrics."""
    from simple_dit.evaluate import _kth_neighbour_radius, fid_replicates, recall_replicates

    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 6, generator=g, dtype=torch.float64)
    fake = torch.randn(150, 6, generator=g, dtype=torch.float64) * 1.2 + 0.3
    ones = torch.ones(1, 150, dtype=torch.float64)
    assert float(fid_replicates(fake, real, ones)[0]) == pytest.approx(frechet_distance(fake, real), rel=1e-9)
    _, recall = precision_recall(real, fake, real_radii=_kth_neighbour_radius(real, 3))
    assert float(recall_replicates(real, fake, ones)[0]) == pytest.approx(recall)


def test_recall_replicates_count_duplicates_like_a_resampled_set():
    """A weighted resample scores as the same multiset of points, materialised, does."""
    from simple_dit.evaluate import bootstrap_weights, recall_replicates

    g = torch.Generator().manual_seed(2)
    real = torch.randn(300, 5, generator=g, dtype=torch.float64)
    fake = torch.randn(80, 5, generator=g, dtype=torch.float64)
    weights = bootstrap_weights(80, 5, seed=3)
    for w, replicate in zip(weights, recall_replicates(real, fake, weights)):
        resampled = fake.repeat_interleave(w.long(), dim=0)
        assert float(replicate) == pytest.approx(precision_recall(real, resampled)[1])


def test_bootstrap_intervals_contain_the_estimate_and_narrow_with_n(meter):
    train = meter.train_set
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(7))
    # Real images, a quarter of them under a wrong label: label accuracy about 0.75, not 1.
    labels = train.labels.clone()
    labels[idx[::4]] = (labels[idx[::4]] + 1) % 10
    widths = {}
    for n in (150, 1500):
        s = meter.score(train.images[idx[:n]], labels[idx[:n]], bootstrap=100)
        for key in ("fid", "label_accuracy", "precision", "recall"):
            lo, hi = getattr(s, f"{key}_ci")
            assert lo <= getattr(s, key) <= hi, (n, key, lo, getattr(s, key), hi)
            widths[n, key] = hi - lo
        if n == 150:
            assert meter.score(train.images[idx[:n]], labels[idx[:n]], bootstrap=100) == s  # seeded: the same intervals
    for key in ("fid", "label_accuracy", "precision", "recall"):
        assert widths[1500, key] < widths[150, key], key
    assert 0 < widths[1500, "label_accuracy"] < 0.1
    assert meter.score(train.images[idx[:50]], labels[idx[:50]], bootstrap=0).fid_ci is None


# ---- guidance ----------------------------------------------------------------------------------


def test_pick_guidance_rule():
    from simple_dit.evaluate import GUIDANCE_RULE, pick_guidance

    rows = [  # the 10-minute dit-mini of issue 9, and one more
        {"guidance": 1.0, "fid": 1.69, "label_accuracy": 0.859},
        {"guidance": 1.5, "fid": 0.41, "label_accuracy": 0.970},
        {"guidance": 3.0, "fid": 1.28, "label_accuracy": 0.9975},
        {"guidance": 4.0, "fid": 1.20, "label_accuracy": 0.9900},
    ]
    assert pick_guidance(rows)["guidance"] == 4.0  # within 0.01 of 0.9975, and a lower FID than 3
    assert pick_guidance(rows[:3])["guidance"] == 3.0
    assert pick_guidance([dict(r, label_accuracy=None) for r in rows])["guidance"] == 1.5  # no labels: FID alone
    assert pick_guidance([dict(rows[1], fid=float("nan")), rows[0]])["guidance"] == 1.0
    assert "lowest FID" in GUIDANCE_RULE and "0.01" in GUIDANCE_RULE


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mnist_dir):
    from conftest import tiny_config

    from simple_dit.train import train

    run = tmp_path_factory.mktemp("guidance") / "run"
    train(tiny_config("dit-tiny", max_steps=20), run, data_dir=mnist_dir, progress=False, device="cpu", final_samples=False)
    return run


def _in_process(argv, capsys) -> subprocess.CompletedProcess:
    from simple_dit.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, rc, out, err)


def test_eval_guidance_list_records_the_pick_and_sampling_uses_it(tiny_run, meter, monkeypatch, capsys, tmp_path):
    from simple_dit import evaluate
    from simple_dit.diffusion import DEFAULT_GUIDANCE
    from simple_dit.sample import Pipeline

    monkeypatch.setattr(evaluate, "QualityMeter", lambda *a, **k: meter)  # the module's meter: no second set-up
    plot = tmp_path / "frontier.png"
    done = _in_process(["eval", tiny_run, "--n", 30, "--steps", 2, "--guidance", "1,2", "--bootstrap", 20, "--plot", plot, "--json",
                        "--device", "cpu"], capsys)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    recorded = json.loads((tiny_run / "guidance.json").read_text())
    assert [row["guidance"] for row in result["guidances"]] == [1.0, 2.0] == [row["guidance"] for row in recorded["scores"]]
    assert recorded["guidance"] == result["guidance"] == evaluate.pick_guidance(result["guidances"])["guidance"]
    assert recorded["rule"] == result["guidance_rule"] == evaluate.GUIDANCE_RULE and evaluate.GUIDANCE_RULE in done.stdout
    assert recorded["n"] == 30 and recorded["steps"] == 2 and recorded["sampler"] == "ddim"
    picked = next(row for row in result["guidances"] if row["guidance"] == result["guidance"])
    for key in ("fid", "label_accuracy", "precision", "recall", "fid_ci", "label_accuracy_ci", "n", "floor_fid"):
        assert key in result
    assert all(result[k] == picked[k] for k in ("fid", "fid_ci", "label_accuracy", "n"))  # the old keys hold the pick
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The pipeline, sample and eval now default to the recorded guidance; an explicit one still wins.
    pipe = Pipeline.from_pretrained(tiny_run, device="cpu")  # where the commands below sample
    assert pipe.guidance == recorded["guidance"] != DEFAULT_GUIDANCE
    labels = pipe.cycled_labels(4)
    for i, (extra, guidance) in enumerate((([], recorded["guidance"]), (["--guidance", 3], 3.0))):
        out = tmp_path / f"s{i}"
        assert _in_process(["sample", tiny_run, "--out", out, "--n", 4, "--steps", 2, "--no-gif", "--device", "cpu", *extra], capsys).returncode == 0
        with np.load(tmp_path / f"s{i}.npz") as npz:
            expected = pipe(labels, steps=2, guidance=guidance, seed=0).permute(0, 2, 3, 1).numpy()
            assert np.array_equal(npz["arr_0"], expected)
    single = _in_process(["eval", tiny_run, "--n", 30, "--steps", 2, "--bootstrap", 0, "--json", "--device", "cpu"], capsys)
    assert json.loads(single.stdout.strip().splitlines()[-1])["guidance"] == recorded["guidance"]


def test_a_guidance_picked_for_earlier_weights_stays_the_default_and_says_so(tiny_run, meter, mnist_dir, monkeypatch, capsys, tmp_path):
    from simple_dit import evaluate

    monkeypatch.setattr(evaluate, "QualityMeter", lambda *a, **k: meter)
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    assert _in_process(["eval", run, "--n", 30, "--steps", 2, "--guidance", "1,2", "--bootstrap", 0, "--device", "cpu"], capsys).returncode == 0
    recorded = json.loads((run / "guidance.json").read_text())
    assert recorded["step"] == 20  # the weights it was picked for
    sample = ["sample", run, "--out", tmp_path / "s", "--n", 4, "--steps", 2, "--no-gif", "--device", "cpu"]
    assert "was picked for" not in _in_process(sample, capsys).stderr
    resumed = _in_process(["train", "--resume", "--out", run, "--max-steps", 22, "--no-progress", "--data-dir", mnist_dir, "--device", "cpu"], capsys)
    assert resumed.returncode == 0, resumed.stderr
    done = _in_process(sample, capsys)
    note = f"({recorded['guidance']:g}) was picked for the weights of step 20, these are step 22's; rerun simple-dit eval with a --guidance list"
    assert done.returncode == 0 and done.stderr.count(note) == 1, done.stderr
    assert json.loads((run / "guidance.json").read_text()) == recorded  # still the default, untouched
    assert "was picked for" not in _in_process([*sample, "--guidance", 2], capsys).stderr  # a scale given explicitly needs no default
    assert _in_process(["eval", run, "--n", 30, "--steps", 2, "--guidance", "1,2", "--bootstrap", 0, "--device", "cpu"], capsys).returncode == 0
    assert json.loads((run / "guidance.json").read_text())["step"] == 22
    assert "was picked for" not in _in_process(sample, capsys).stderr


def test_eval_and_sample_reject_bad_guidance(tiny_run, tmp_path, capsys):
    from conftest import assert_user_error

    for value, fragment in (("1,x", "malformed --guidance '1,x'"), ("2,2", "repeats"), ("-1", "at least 0")):
        assert_user_error(_in_process(["eval", tiny_run, "--guidance", value], capsys), fragment)
    npz = tmp_path / "x.npz"
    np.savez(npz, arr_0=np.zeros((8, 28, 28, 1), np.uint8), labels=np.zeros(8, np.int64))
    assert_user_error(_in_process(["eval", npz, "--guidance", "1,2"], capsys), "needs a run directory")
    assert_user_error(_in_process(["eval", tiny_run, "--plot", tmp_path / "f.jpg"], capsys), "--plot", ".png")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_run, damaged)
    (damaged / "guidance.json").write_text('{"guidance": "high"}')
    assert_user_error(_in_process(["sample", damaged, "--out", tmp_path / "s", "--n", 2], capsys), "guidance.json is damaged")
    # What the message advises works, and so does a scale given explicitly: neither needs the damaged default.
    assert _in_process(["sample", damaged, "--out", tmp_path / "s", "--n", 2, "--steps", 2, "--guidance", 2, "--no-gif", "--device", "cpu"],
                       capsys).returncode == 0  # fmt: skip
    assert _in_process(["eval", damaged, "--n", 30, "--steps", 2, "--bootstrap", 0, "--guidance", "1,2", "--device", "cpu"], capsys).returncode == 0
    assert json.loads((damaged / "guidance.json").read_text())["guidance"] in (1, 2)
    # A directory where guidance.json belongs: damage to sample, and in the way of eval's pick before it samples.
    (damaged / "guidance.json").unlink()
    (damaged / "guidance.json").mkdir()
    assert_user_error(_in_process(["sample", damaged, "--out", tmp_path / "s", "--n", 2], capsys), "guidance.json is damaged")
    assert_user_error(_in_process(["eval", damaged, "--n", 30, "--steps", 2, "--guidance", "1,2"], capsys), "guidance.json is in the way")


def test_the_tables_show_a_confidence_column_only_where_there_are_intervals():
    from simple_dit.evaluate import format_guidance_table, format_report

    plain = {"n": 100, "fid": 1.0, "label_accuracy": 0.9, "floor_fid": 0.1, "floor_label_accuracy": 0.99}
    with_ci = plain | {"fid_ci": [0.9, 1.1], "label_accuracy_ci": [0.8, 0.95]}
    assert "CI" not in format_report(plain) and "  1.0000        0.1000" in format_report(plain)
    assert "95% CI" in format_report(with_ci) and "[0.9000, 1.1000]" in format_report(with_ci)
    rows = [{"guidance": 1.0, "fid": 1.0, "label_accuracy": 0.9}]
    assert "CI" not in format_guidance_table(rows, {"fid": 0.1}, 1.0).splitlines()[0]
    assert "FID [95% CI]" in format_guidance_table([rows[0] | {"fid_ci": [0.9, 1.2]}], {"fid": 0.1}, 1.0).splitlines()[0]


def test_score_refuses_what_is_not_an_image_tensor_and_a_bootstrap_past_its_limit(meter):
    import numpy as np

    from simple_dit.errors import UserError
    from simple_dit.evaluate import MAX_BOOTSTRAP

    images = load_dataset("mnist", "test").images[:12]
    with pytest.raises(UserError, match="expected a torch.uint8 tensor of images"):
        meter.score(list(images))
    with pytest.raises(UserError, match=f"up to {MAX_BOOTSTRAP:,}"):
        meter.score(images, bootstrap=MAX_BOOTSTRAP + 1)
    assert meter.score(images, bootstrap=10, level=np.float32(0.9)).fid_ci is not None


def test_an_interval_of_equal_replicates_contains_its_estimate():
    """Samples collapsed to one image give equal replicates, and the bias shift put the interval
    1e-13 below the estimate: the report's error bars came out negative and it crashed."""
    from simple_dit.evaluate import percentile_interval

    estimate = 136.5310975507547
    lo, hi = percentile_interval(estimate, torch.full((200,), 136.53109755075468))
    assert lo <= estimate <= hi and hi - lo < 1e-9
    # One outlying replicate moves the bias shift, and 199 of 200 land below the estimate.
    assert percentile_interval(1.0, torch.tensor([1.0] * 199 + [100.0], dtype=torch.float64)) == pytest.approx([0.505, 1.0])
    assert percentile_interval(0.5, torch.linspace(0.4, 0.6, 201), bounds=(0.0, 1.0)) == pytest.approx([0.405, 0.595])
