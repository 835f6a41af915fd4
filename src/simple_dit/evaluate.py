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
import math
import os
import sys
import zipfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import default_cache_dir, get_spec, load_dataset, to_model_range
from .errors import UserError
from .runtime import check_seed, is_integer

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
    if cached.is_dir():
        raise UserError(f"{cached} is a directory, where the evaluator's weights are cached; move it away")
    for path in (_bundled_path(dataset), cached):
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata()
                    state = {k: f.get_tensor(k) for k in f.keys()}
                model = Evaluator()
                model.load_state_dict(state)
                digest = meta["sha256"]
            except Exception as e:  # noqa: BLE001 - whatever a damaged file makes safetensors or torch raise
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UserError(f"evaluator weights {path} are damaged ({reason}); delete the file to retrain it") from None
            if _weights_digest(model) != digest:
                raise UserError(f"evaluator weights {path} fail their checksum; delete the file to retrain it")
            return model.eval(), meta
    model, accuracy = train_evaluator(dataset, data_dir, progress=progress)
    try:
        save_evaluator(model, accuracy, dataset, cached)
    except UserError as e:  # the training is not thrown away for a cache that cannot be written
        print(f"simple-dit: warning: the {dataset} evaluator is not cached ({e}); it will be trained again next time", file=sys.stderr)
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


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each of ``points``, whether it lies inside at least one ball (centre, radius)."""
    return torch.cat([(torch.cdist(chunk, centres) <= radii[None]).any(1) for chunk in points.split(1000)])


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius)."""
    return float(_inside(points, centres, radii).double().mean())


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = PR_NEIGHBOURS, real_radii: torch.Tensor | None = None
) -> tuple[float, float]:
    """``real_radii`` may pass in the k-NN radii of ``real``, when the same reals are reused."""
    if real_radii is None:
        real_radii = _kth_neighbour_radius(real, k)
    precision = _coverage(fake, real, real_radii)
    recall = _coverage(real, fake, _kth_neighbour_radius(fake, k))
    return precision, recall


# ---- bootstrap confidence intervals -------------------------------------------------------------
#
# The generated samples are resampled with replacement (the reference set stays fixed), every
# metric is recomputed on each resample, all resamples at once, and the interval is the
# percentile interval of the replicates moved by the bootstrap's estimate of its own bias
# (mean of the replicates - estimate). The move matters for FID, which is biased upwards at small
# n: a resample, holding about 63% distinct images, scores worse than the sample it came from,
# and an unmoved interval can miss the estimate altogether.

CI_METRICS = ("fid", "label_accuracy", "precision", "recall")
BOOTSTRAP_RESAMPLES = 200
MAX_BOOTSTRAP = 10_000  # far past what a 95% interval needs; the resamples are held in memory at once
BOOTSTRAP_LEVEL = 0.95
# A comparison's verdict calls a difference only where a test rejects equal means at this level.
SIGNIFICANCE = 0.05
BOOTSTRAP_SEED = 0
_RECALL_NEIGHBOURS = 16  # nearest other fakes kept per fake: a resample's k-NN radius lies among them
_RECALL_CANDIDATES = 32  # fakes per real that may cover it in some resample (the likeliest first)


def bootstrap_weights(n: int, resamples: int, seed: int = BOOTSTRAP_SEED) -> torch.Tensor:
    """(resamples, n) float64: how often each of n items is drawn into each resample of size n."""
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float64))


def _sqrtm_psd(cov: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(cov)
    return evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T


def fid_replicates(features: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """FID of each weighted resample of ``features`` against ``reference``; row b of ``weights``
    gives each feature's count in resample b (``bootstrap_weights``). With all weights 1 this is
    ``frechet_distance(features, reference)``. Tr((S_a S_b)^1/2) is taken as the trace of the root
    of S_b^1/2 S_a S_b^1/2, so the reference's root is computed once."""
    features, reference = features.double(), reference.double()
    n = features.shape[0]
    mean, centred = features.mean(0), features - features.mean(0)
    ref_mu, ref_cov = reference.mean(0), torch.cov(reference.T)
    ref_sqrt = _sqrtm_psd(ref_cov)
    out = []
    for w in weights.split(chunk):
        offset = w @ centred / n  # (b, d): resample mean - sample mean
        second = (centred.T[None] * w[:, None, :]) @ centred  # (b, d, d)
        cov = (second - n * offset[:, :, None] * offset[:, None, :]) / (n - 1)
        middle = ref_sqrt @ cov @ ref_sqrt
        tr_sqrt = torch.linalg.eigvalsh((middle + middle.mT) / 2).clamp(min=0).sqrt().sum(-1)
        trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        out.append((mean + offset - ref_mu).square().sum(-1) + trace + ref_cov.trace() - 2 * tr_sqrt)
    return torch.cat(out)


def recall_replicates(real: torch.Tensor, fake: torch.Tensor, weights: torch.Tensor, k: int = PR_NEIGHBOURS, chunk: int = 16) -> torch.Tensor:
    """k-NN recall of each weighted resample of ``fake``: the fraction of ``real`` inside the ball
    of a drawn fake whose radius is its k-th nearest neighbour in the resample, copies counted
    (a fake drawn k+1 times has radius 0). Each fake's radius is looked up among its nearest
    other fakes and each real's covering balls among its likeliest candidates, so that no
    resample needs a distance matrix; with all weights 1 this is ``precision_recall``'s recall."""
    n = fake.shape[0]
    m = min(_RECALL_NEIGHBOURS, n - 1)
    dist, nbr = [], []
    for start, rows in zip(range(0, n, 1000), fake.split(1000)):
        d = torch.cdist(rows, fake)
        d[torch.arange(len(rows)), torch.arange(start, start + len(rows))] = math.inf  # not its own neighbour
        v, i = d.topk(m, dim=1, largest=False)
        dist.append(v)
        nbr.append(i)
    dist, nbr = torch.cat(dist).float(), torch.cat(nbr)  # (n, m), nearest first
    reach = dist[:, -1]  # no resample's radius exceeds this (up to the rare resample that runs out of neighbours)
    cand_d, cand_j = [], []
    for rows in real.split(1000):
        d = torch.cdist(rows, fake)
        ratio = torch.where(d <= reach[None], d / reach.clamp(min=1e-12)[None], math.inf)
        r, j = ratio.topk(min(_RECALL_CANDIDATES, n), dim=1, largest=False)
        cand_j.append(j)
        cand_d.append(torch.where(torch.isfinite(r), d.gather(1, j), math.inf))
    cand_d, cand_j = torch.cat(cand_d).float(), torch.cat(cand_j)  # (n_real, c); inf: no candidate
    out = []
    for w in weights.float().split(chunk):
        need = k - (w - 1)  # (b, n): copies of other fakes a drawn fake needs within its radius
        cum = w[:, nbr].cumsum(-1)  # (b, n, m)
        first = (cum < need[..., None]).sum(-1).clamp(max=m - 1)
        radius = torch.where(need <= 0, 0.0, dist.expand(len(w), n, m).gather(-1, first[..., None]).squeeze(-1))
        radius = torch.where(w > 0, radius, -1.0)  # a fake not drawn covers nothing
        covered = (cand_d[None] <= radius[:, cand_j]).any(-1)  # (b, n_real)
        out.append(covered.double().mean(-1))
    return torch.cat(out)


def percentile_interval(estimate: float, replicates: torch.Tensor, level: float = BOOTSTRAP_LEVEL, bounds=(-math.inf, math.inf)) -> list[float]:
    """The ``level`` percentile interval of ``replicates``, moved by their bias (mean - estimate),
    widened where rounding leaves the estimate outside it (replicates all equal, as of samples that
    collapsed to one image, come back 1e-13 off), and clipped to ``bounds``."""
    shifted = replicates.double() - (replicates.double().mean() - estimate)
    lo, hi = torch.quantile(shifted, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return [float(min(max(v, bounds[0]), bounds[1])) for v in (min(lo, estimate), max(hi, estimate))]


def bootstrap_intervals(
    features: torch.Tensor, correct: torch.Tensor | None, reference: torch.Tensor, reference_radii: torch.Tensor,
    estimates: dict, *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = BOOTSTRAP_LEVEL, seed: int = BOOTSTRAP_SEED,
) -> dict[str, list[float]]:  # fmt: skip
    """``{"fid_ci": [lo, hi], ...}`` for the metrics of ``estimates`` (``CI_METRICS``): every metric
    recomputed on the same ``resamples`` resamples of the generated samples. ``correct`` says, per
    sample, whether the classifier saw the requested class (None without labels)."""
    n = features.shape[0]
    w = bootstrap_weights(n, resamples, seed)
    replicates = {
        "fid": fid_replicates(features, reference, w),
        "precision": w @ _inside(features, reference, reference_radii).double() / n,
        "recall": recall_replicates(reference, features, w),
    }
    if correct is not None:
        replicates["label_accuracy"] = w @ correct.double() / n
    return {
        f"{key}_ci": percentile_interval(estimates[key], reps, level, (0.0, math.inf) if key == "fid" else (0.0, 1.0))
        for key, reps in replicates.items()
    }


@dataclass
class Scores:
    n: int
    fid: float
    precision: float
    recall: float
    label_accuracy: float | None = None
    class_balance_tv: float | None = None
    # Bootstrap confidence intervals [lo, hi] (None when not computed).
    fid_ci: list[float] | None = None
    label_accuracy_ci: list[float] | None = None
    precision_ci: list[float] | None = None
    recall_ci: list[float] | None = None


def score_features(
    features: torch.Tensor,
    predicted: torch.Tensor,
    labels: torch.Tensor | None,
    reference: torch.Tensor,
    num_classes: int,
    reference_radii: torch.Tensor | None = None,
    *,
    bootstrap: int = 0,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> Scores:
    """The scores of generated ``features``; with ``bootstrap`` > 0 resamples, also their
    ``level`` confidence intervals."""
    if reference_radii is None:
        reference_radii = _kth_neighbour_radius(reference, PR_NEIGHBOURS)
    precision, recall = precision_recall(reference, features, real_radii=reference_radii)
    scores = Scores(n=features.shape[0], fid=frechet_distance(features, reference), precision=precision, recall=recall)
    correct = None
    if labels is not None:
        correct = predicted == labels
        scores.label_accuracy = float(correct.double().mean())
        hist_pred = torch.bincount(predicted, minlength=num_classes).double() / len(predicted)
        hist_req = torch.bincount(labels, minlength=num_classes).double() / len(labels)
        scores.class_balance_tv = float(0.5 * (hist_pred - hist_req).abs().sum())
    if bootstrap > 0:
        intervals = bootstrap_intervals(features, correct, reference, reference_radii, asdict(scores),
                                        resamples=bootstrap, level=level, seed=seed)  # fmt: skip
        for key, interval in intervals.items():
            setattr(scores, key, interval)
    return scores


class QualityMeter:
    """Scores generated images against a dataset's test split, with the real-data floor."""

    def __init__(self, dataset: str = "mnist", data_dir=None, progress: bool = True):
        get_spec(dataset)  # an unknown name is one line, before any file is looked for
        self.model, self.meta = load_evaluator(dataset, data_dir, progress)
        self.train_set = load_dataset(dataset, "train", data_dir)
        test_set = load_dataset(dataset, "test", data_dir)
        self.num_classes = test_set.num_classes
        self.test_features, _ = _run(self.model, test_set.images)
        # The k-NN radii of the 10,000 test features: a 10k x 10k distance matrix, the same for
        # every score, so computed once.
        self.test_radii = _kth_neighbour_radius(self.test_features, PR_NEIGHBOURS)
        self.bootstrap = BOOTSTRAP_RESAMPLES  # resamples of every score's confidence intervals (0: none)

    def score(self, images_uint8: torch.Tensor, labels: torch.Tensor | None = None, *, bootstrap: int | None = None,
              level: float = BOOTSTRAP_LEVEL, seed: int = BOOTSTRAP_SEED) -> Scores:  # fmt: skip
        """Scores of ``images_uint8`` (generated for ``labels``), with ``level`` bootstrap
        confidence intervals over ``bootstrap`` resamples (default ``self.bootstrap``; 0: none)."""
        if not isinstance(images_uint8, torch.Tensor):
            raise UserError(f"expected a torch.uint8 tensor of images (N, 1, 28, 28), got {type(images_uint8).__name__}")
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1:] != (1, 28, 28):
            raise UserError(f"expected uint8 images of shape (N, 1, 28, 28), got {tuple(images_uint8.shape)} {images_uint8.dtype}")
        bootstrap = self.bootstrap if bootstrap is None else bootstrap
        if not is_integer(bootstrap) or not 0 <= bootstrap <= MAX_BOOTSTRAP:
            raise UserError(f"bootstrap must be 0 (no intervals) or a number of resamples up to {MAX_BOOTSTRAP:,}, got {bootstrap!r}")
        bootstrap = int(bootstrap)
        level = float(level) if isinstance(level, np.floating) else level
        if not (isinstance(level, float) and 0 < level < 1):
            raise UserError(f"the confidence level must be a number in (0, 1), got {level!r}")
        check_seed(seed, "the bootstrap seed")
        if images_uint8.shape[0] < 2 * PR_NEIGHBOURS:
            raise UserError(f"need at least {2 * PR_NEIGHBOURS} images to score, got {images_uint8.shape[0]}")
        if labels is not None and not (isinstance(labels, torch.Tensor) and labels.shape == images_uint8.shape[:1]
                                       and not labels.is_floating_point() and labels.dtype != torch.bool):  # fmt: skip
            raise UserError(f"labels must be a tensor of {images_uint8.shape[0]} integer class indices, one per image")
        if labels is not None and ((labels < 0) | (labels >= self.num_classes)).any():
            raise UserError(f"labels fall outside the dataset's classes 0..{self.num_classes - 1}")
        features, logits = _run(self.model, images_uint8)
        return score_features(features, logits.argmax(1), labels, self.test_features, self.num_classes, self.test_radii,
                              bootstrap=bootstrap, level=level, seed=seed)  # fmt: skip

    def floor(self, n: int, seed: int = 0, **kwargs) -> Scores:
        """The same scores for ``n`` real training images with their true labels (``kwargs`` as for ``score``)."""
        if not is_integer(n) or not 0 < n <= len(self.train_set):
            raise UserError(f"the real-data floor takes 1 to {len(self.train_set)} images, got {n!r}")
        idx = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(seed))[:n]
        return self.score(self.train_set.images[idx], self.train_set.labels[idx], **kwargs)


def check_floor_count(n: int, dataset: str, subject: str) -> None:
    """Refuse ``n`` samples where the real-data floor, ``n`` training images, cannot be drawn:
    known from the dataset's spec, before anything is loaded, trained or sampled. ``subject``
    names what asked for them, e.g. "--n 70,000 is"."""
    train_count = get_spec(dataset).train_count
    if n > train_count:
        raise UserError(f"{subject} more than the {train_count:,} training images the real-data floor is drawn from")


def load_npz(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (N, C, H, W) uint8 and labels (or None) from an ADM-style npz."""
    try:
        # Opened here, not by np.load, which leaves its file open when the archive is damaged.
        with open(path, "rb") as file:
            # Anything that is neither a zip nor a .npy, np.load takes for a pickle and says so.
            if not zipfile.is_zipfile(file):
                raise ValueError("not an .npz archive (a zip of .npy arrays)")
            file.seek(0)
            _check_array_sizes(file)
            file.seek(0)
            loaded = np.load(file)
            with loaded as f:
                arr = f["arr_0"]
                labels = f["labels"] if "labels" in f.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path} as an ADM-style npz with arr_0: {e}") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (28, 28, 1):
        raise UserError(f"{path}: arr_0 must be 28 x 28 grey images, uint8 of shape (N, 28, 28, 1) (N, H, W, C), got {arr.dtype} {arr.shape}")
    if arr.shape[0] < 2 * PR_NEIGHBOURS:
        raise UserError(f"{path} holds {arr.shape[0]} images; scoring needs at least {2 * PR_NEIGHBOURS}")
    if labels is not None and (labels.shape != arr.shape[:1] or not np.issubdtype(labels.dtype, np.integer)):
        raise UserError(f"{path}: labels must be integers of shape ({arr.shape[0]},), one per image, got {labels.dtype} {labels.shape}")
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    return images, (torch.from_numpy(labels.astype(np.int64)) if labels is not None else None)


def _check_array_sizes(file) -> None:
    """Refuse an archive whose arrays claim more data than they hold: np.load allocates what a
    header claims before reading, so a damaged header would read as running out of memory."""
    with zipfile.ZipFile(file) as archive:
        for info in archive.infolist():
            if info.filename not in ("arr_0.npy", "labels.npy"):
                continue
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(member)
            if math.prod(shape) * dtype.itemsize > info.file_size:
                raise ValueError(f"{info.filename} claims shape {shape} of {dtype} but holds {info.file_size:,} bytes: the file is damaged")


def report(scores: Scores, floor: Scores) -> dict:
    out = {k: v for k, v in asdict(scores).items() if v is not None}
    out.update({f"floor_{k}": v for k, v in asdict(floor).items() if v is not None and k != "n"})
    return out


def _ci_text(interval) -> str:
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""


def format_report(result: dict) -> str:
    keys = [key for key in ("fid", "label_accuracy", "precision", "recall", "class_balance_tv") if key in result]
    width = 24 if any(result.get(key + "_ci") for key in keys) else 0  # no empty column where --bootstrap 0
    head = f"n = {result['n']}" + (f", guidance {result['guidance']:g}" if result.get("guidance") is not None else "")
    lines = [head, f"{'metric':<18}{'samples':>12}  {f'{BOOTSTRAP_LEVEL:.0%} CI' if width else '':<{width}}{'real floor':>12}"]
    for key in keys:
        lines.append(f"{key:<18}{result[key]:>12.4f}  {_ci_text(result.get(key + '_ci')):<{width}}{result.get('floor_' + key, float('nan')):>12.4f}")
    return "\n".join(lines)


# ---- choosing the guidance scale ----------------------------------------------------------------

GUIDANCE_NAME = "guidance.json"
GUIDANCE_TOLERANCE = 0.01
GUIDANCE_RULE = (
    f"the lowest FID among the guidance scales whose label accuracy is within {GUIDANCE_TOLERANCE:g} "
    "of the best label accuracy"
)


def pick_guidance(rows: list[dict]) -> dict:
    """The row (``guidance``, ``fid``, ``label_accuracy``) that ``GUIDANCE_RULE`` picks among the
    rows with a finite FID (all rows if none has one); without label accuracies, the lowest FID.
    Ties: the higher label accuracy, then the lower guidance."""

    def finite(v, default):
        return v if isinstance(v, (int, float)) and math.isfinite(v) else default

    rows = [r for r in rows if finite(r.get("fid"), None) is not None] or rows
    accuracies = [finite(r.get("label_accuracy"), None) for r in rows]
    candidates = rows
    if any(a is not None for a in accuracies):
        best = max(a for a in accuracies if a is not None)
        candidates = [r for r, a in zip(rows, accuracies) if a is not None and a >= best - GUIDANCE_TOLERANCE - 1e-12]
    return min(candidates, key=lambda r: (finite(r.get("fid"), math.inf), -finite(r.get("label_accuracy"), 0.0), r["guidance"]))


def format_guidance_table(rows: list[dict], floor: dict, picked: float) -> str:
    """One line per guidance scale (``*`` marks ``picked``), then the real-data floor."""

    def cell(row, key, spec):
        if row.get(key) is None:
            return ""
        ci = row.get(key + "_ci")
        return format(row[key], spec) + (f" [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else "")

    keys = (("fid", "FID", ".3f"), ("label_accuracy", "label acc.", ".4f"), ("precision", "precision", ".4f"), ("recall", "recall", ".4f"))
    level = f" [{BOOTSTRAP_LEVEL:.0%} CI]" if any(row.get(key + "_ci") for row in rows for key, _, _ in keys) else ""
    head = f"  {'guidance':<10}" + "".join(f"{title + level:>28}" for _, title, _ in keys)
    lines = [head]
    for row in rows:
        mark = "*" if row["guidance"] == picked else " "
        lines.append(f"{mark} {row['guidance']:<10g}" + "".join(f"{cell(row, key, spec):>28}" for key, _, spec in keys))
    lines.append(f"  {'real floor':<10}" + "".join(f"{cell(floor, key, spec):>28}" for key, _, spec in keys))
    lines.append(f"* picked: guidance {picked:g}, {GUIDANCE_RULE}")
    return "\n".join(lines)


def write_guidance(run_dir: str | os.PathLike, rows: list[dict], **context) -> dict:
    """Record in ``run_dir/guidance.json`` the guidance ``pick_guidance`` picks among ``rows``,
    the rule and every row; ``context`` says how the rows were measured. Returns the record."""
    from .io import write_json

    record = {"guidance": pick_guidance(rows)["guidance"], "rule": GUIDANCE_RULE, **context, "scores": rows}
    write_json(Path(run_dir) / GUIDANCE_NAME, record)
    return record


def read_guidance(run_dir: str | os.PathLike) -> tuple[float, int | None] | None:
    """The guidance recorded in ``run_dir/guidance.json`` and the training step of the weights it
    was picked for (None where the record does not say); None when there is no record."""
    path = Path(run_dir) / GUIDANCE_NAME
    if not path.exists():  # a directory there is damage, said below, not the absence of a record
        return None
    try:
        record = json.loads(path.read_text())
        value, step = record["guidance"], record.get("step")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"guidance {value!r} is not a finite scale >= 0")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is damaged ({e}); delete it or rerun simple-dit eval with a --guidance list") from None
    return float(value), (step if is_integer(step) else None)


def dumps(result: dict) -> str:
    return json.dumps(result, sort_keys=True)
