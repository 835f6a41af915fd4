"""`simple-dit bench`: the article's reference path and the JSON it prints."""

from __future__ import annotations

import json

import torch

from simple_dit.bench import article_time_encoding, reference_model
from simple_dit.cli import main
from simple_dit.config import get_preset
from simple_dit.models import build_model
from simple_dit.models.unet import book_time_encoding


def test_the_article_time_encoding_is_the_same_function_one_sample_at_a_time():
    t = torch.tensor([1, 7, 500, 1000])
    assert torch.allclose(article_time_encoding(t, 100), book_time_encoding(t, 100), atol=1e-6)


def test_the_reference_unet_computes_the_same_outputs():
    torch.manual_seed(0)
    model = build_model(get_preset("unet-tiny").model).eval()
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 10, 999]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        ours = model(x, t, y)
        reference = reference_model(model)(x, t, y)
    assert model.time_encoding is article_time_encoding
    assert torch.allclose(ours, reference, atol=1e-5)


def test_bench_prints_one_json_object_last(capsys):
    assert main(["bench", "--preset", "unet-tiny", "--batch-size", "4", "--repeats", "1", "--reference"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["preset"] == "unet-tiny" and result["batch_size"] == 4 and result["reference"] is True
    assert result["precision"] == "fp32"
    for key in ("train_images_per_s", "sample_images_per_s", "peak_rss_mb"):
        assert result[key] > 0


def test_bench_rejects_a_bad_batch_size(capsys):
    assert main(["bench", "--preset", "dit-tiny", "--batch-size", "0"]) != 0
    assert capsys.readouterr().err.strip().startswith("simple-dit: error: --batch-size must be positive")
