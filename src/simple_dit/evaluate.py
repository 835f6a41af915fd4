"""Sample quality, measured in the feature space of a small classifier trained on the dataset.

Inception-based FID means nothing on 28x28 digits (and its weights cannot be downloaded here), so
we follow the "Fréchet LeNet Distance" practice: a small CNN trained on the training split, whose
penultimate layer is the feature space. On generated images with their requested labels we report

- ``fid``: Fréchet distance between generated and test-split features;
- ``label_accuracy``: how often the classifier sees the class that was asked for (GAN-test);
- ``precision`` / ``recall``: k-NN manifold estimates (Kynkäänniemi et al. 2019, k=3);
- ``class_balance_tv``: total-variation distance between predicted and requested class histograms;

each next to its real-data floor: a random subset of the training split of the same size, scored
the same way (FID is biased upwards for small n, so only same-n numbers compare).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import default_cache_dir, load_dataset, to_model_range
from .errors import UserError

EVALUATOR_EPOCHS = 6
EVALUATOR_SEED = 0
PR_NEIGHBOURS = 3


class Evaluator(nn.Module):
    """A small CNN classifier; ``features`` is its 96-d penultimate layer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 24):
        super().__init__()

        def conv(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        # Most of the work happens at 14x14 and 7x7: a second full-resolution conv would double
        # the cost without helping accuracy on digits.
        self.body = nn.Sequential(
            conv(in_channels, width), nn.MaxPool2d(2),
            conv(width, 2 * width), conv(2 * width, 2 * width), nn.MaxPool2d(2),
            conv(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background fills in)."""
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    n, _, h, w = x.shape
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def train_evaluator(dataset: str = "mnist", data_dir=None, epochs: int = EVALUATOR_EPOCHS, progress: bool = True):
    """Train the evaluator deterministically; returns (model, test accuracy)."""
    from tqdm import tqdm

    train_set = load_dataset(dataset, "train", data_dir)
    test_set = load_dataset(dataset, "test", data_dir)
    torch.manual_seed(EVALUATOR_SEED)
    generator = torch.Generator().manual_seed(EVALUATOR_SEED)
    model = Evaluator(num_classes=train_set.num_classes)
    batch_size = 128
    steps = epochs * (len(train_set) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    bar = tqdm(total=steps, desc=f"training the {dataset} evaluator", disable=not progress)
    for epoch in range(epochs):
        perm = torch.randperm(len(train_set), generator=generator)
        for i in range(len(train_set) // batch_size):
            x, y = train_set.batch(perm[i * batch_size : (i + 1) * batch_size])
            loss = F.cross_entropy(model(_random_shift(x, generator)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
    bar.close()
    model.eval()
    accuracy = float((classify(model, test_set.images) == test_set.labels).float().mean())
    return model, accuracy


@torch.no_grad()
def _run(model: Evaluator, images_uint8: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    feats, logits = [], []
    for chunk in images_uint8.split(batch_size):
        f = model.features(to_model_range(chunk))
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(feats).double(), torch.cat(logits)


def classify(model: Evaluator, images_uint8: torch.Tensor) -> torch.Tensor:
    return _run(model, images_uint8)[1].argmax(1)


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _bundled_path(dataset: str) -> Path:
    return Path(str(resources.files("simple_dit") / "assets" / f"evaluator-{dataset}.safetensors"))


def save_evaluator(model: Evaluator, accuracy: float, dataset: str, path: Path) -> None:
    from safetensors.torch import save_file

    from .io import atomic_write

    meta = {"dataset": dataset, "test_accuracy": f"{accuracy:.4f}", "sha256": _weights_digest(model),
            "epochs": str(EVALUATOR_EPOCHS), "seed": str(EVALUATOR_SEED)}  # fmt: skip
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_evaluator(dataset: str = "mnist", data_dir=None, progress: bool = True) -> tuple[Evaluator, dict]:
    """The bundled evaluator, else the cached one, else one trained now (and cached)."""
    from safetensors import safe_open

    cached = default_cache_dir().parent / "evaluators" / f"evaluator-{dataset}.safetensors"
    for path in (_bundled_path(dataset), cached):
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                state = {k: f.get_tensor(k) for k in f.keys()}
            model = Evaluator()
            model.load_state_dict(state)
            if _weights_digest(model) != meta["sha256"]:
                raise UserError(f"evaluator weights {path} fail their checksum; delete the file to retrain it")
            return model.eval(), meta
    model, accuracy = train_evaluator(dataset, data_dir, progress=progress)
    save_evaluator(model, accuracy, dataset, cached)
    return model.eval(), {"dataset": dataset, "test_accuracy": f"{accuracy:.4f}", "sha256": _weights_digest(model)}


# ---- metrics ------------------------------------------------------------------------------------


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), in float64.

    Tr((S_a S_b)^1/2) is the sum of square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2, which
    is symmetric, so only symmetric eigendecompositions are needed (no scipy)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt)


def _kth_neighbour_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    radii = []
    for chunk in x.split(1000):
        d = torch.cdist(chunk, x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k+1: the nearest is the point itself
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius)."""
    inside = [(torch.cdist(chunk, centres) <= radii[None]).any(1) for chunk in points.split(1000)]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = PR_NEIGHBOURS, real_radii: torch.Tensor | None = None
) -> tuple[float, float]:
    """``real_radii`` may pass in the k-NN radii of ``real``, when the same reals are reused."""
    if real_radii is None:
        real_radii = _kth_neighbour_radius(real, k)
    precision = _coverage(fake, real, real_radii)
    recall = _coverage(real, fake, _kth_neighbour_radius(fake, k))
    return precision, recall


@dataclass
class Scores:
    n: int
    fid: float
    precision: float
    recall: float
    label_accuracy: float | None = None
    class_balance_tv: float | None = None


def score_features(
    features: torch.Tensor,
    predicted: torch.Tensor,
    labels: torch.Tensor | None,
    reference: torch.Tensor,
    num_classes: int,
    reference_radii: torch.Tensor | None = None,
) -> Scores:
    precision, recall = precision_recall(reference, features, real_radii=reference_radii)
    scores = Scores(n=features.shape[0], fid=frechet_distance(features, reference), precision=precision, recall=recall)
    if labels is not None:
        scores.label_accuracy = float((predicted == labels).double().mean())
        hist_pred = torch.bincount(predicted, minlength=num_classes).double() / len(predicted)
        hist_req = torch.bincount(labels, minlength=num_classes).double() / len(labels)
        scores.class_balance_tv = float(0.5 * (hist_pred - hist_req).abs().sum())
    return scores


class QualityMeter:
    """Scores generated images against a dataset's test split, with the real-data floor."""

    def __init__(self, dataset: str = "mnist", data_dir=None, progress: bool = True):
        self.model, self.meta = load_evaluator(dataset, data_dir, progress)
        self.train_set = load_dataset(dataset, "train", data_dir)
        test_set = load_dataset(dataset, "test", data_dir)
        self.num_classes = test_set.num_classes
        self.test_features, _ = _run(self.model, test_set.images)
        # The k-NN radii of the 10,000 test features: a 10k x 10k distance matrix, the same for
        # every score, so computed once.
        self.test_radii = _kth_neighbour_radius(self.test_features, PR_NEIGHBOURS)

    def score(self, images_uint8: torch.Tensor, labels: torch.Tensor | None = None) -> Scores:
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1:] != (1, 28, 28):
            raise UserError(f"expected uint8 images of shape (N, 1, 28, 28), got {tuple(images_uint8.shape)} {images_uint8.dtype}")
        if images_uint8.shape[0] < 2 * PR_NEIGHBOURS:
            raise UserError(f"need at least {2 * PR_NEIGHBOURS} images to score, got {images_uint8.shape[0]}")
        if labels is not None and ((labels < 0) | (labels >= self.num_classes)).any():
            raise UserError(f"labels fall outside the dataset's classes 0..{self.num_classes - 1}")
        features, logits = _run(self.model, images_uint8)
        return score_features(features, logits.argmax(1), labels, self.test_features, self.num_classes, self.test_radii)

    def floor(self, n: int, seed: int = 0) -> Scores:
        """The same scores for ``n`` real training images with their true labels."""
        idx = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(seed))[:n]
        return self.score(self.train_set.images[idx], self.train_set.labels[idx])


def load_npz(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (N, C, H, W) uint8 and labels (or None) from an ADM-style npz."""
    try:
        with np.load(path) as f:
            arr = f["arr_0"]
            labels = f["labels"] if "labels" in f.files else None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read {path} as an ADM-style npz with arr_0: {e}") from None
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise UserError(f"{path}: arr_0 must be uint8 of shape (N, H, W, C), got {arr.dtype} {arr.shape}")
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    return images, (torch.from_numpy(labels.astype(np.int64)) if labels is not None else None)


def report(scores: Scores, floor: Scores) -> dict:
    out = {k: v for k, v in asdict(scores).items() if v is not None}
    out.update({f"floor_{k}": v for k, v in asdict(floor).items() if v is not None and k != "n"})
    return out


def format_report(result: dict) -> str:
    lines = [f"n = {result['n']}", f"{'metric':<18}{'samples':>10}{'real floor':>12}"]
    for key in ("fid", "label_accuracy", "precision", "recall", "class_balance_tv"):
        if key in result:
            lines.append(f"{key:<18}{result[key]:>10.4f}{result.get('floor_' + key, float('nan')):>12.4f}")
    return "\n".join(lines)


def dumps(result: dict) -> str:
    return json.dumps(result, sort_keys=True)
