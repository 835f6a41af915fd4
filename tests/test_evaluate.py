"""Quality metrics: closed-form cases, and the evaluator on real, noisy and mislabelled images."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from simple_dit.data import load_dataset
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


def test_training_logs_quality_scores_with_the_loss(tmp_path):
    from simple_dit import get_preset
    from simple_dit.train import train

    config = get_preset("dit-tiny")
    config.train.max_steps, config.train.eval_every, config.train.eval_n = 10, 10, 20
    train(config, tmp_path / "run", progress=False, final_samples=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_fid" in r]
    assert [r["step"] for r in evals] == [10]
    assert evals[0]["eval_n"] == 20 and 0 <= evals[0]["eval_label_accuracy"] <= 1 and evals[0]["eval_fid"] > 0
    assert any("loss" in r and r["step"] == 10 for r in records)
