"""MNIST / Fashion-MNIST loading from the canonical IDX files."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from conftest import FASHION_DIR, MNIST_FILES
from simple_dit.data import DATASETS, load_dataset, to_model_range, to_uint8
from simple_dit.errors import UserError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_train_split(mnist_train):
    ds = mnist_train
    assert ds.name == "mnist" and ds.split == "train"
    assert ds.images.dtype == torch.uint8
    assert tuple(ds.images.shape) == (60000, 1, 28, 28)
    assert len(ds) == 60000 == DATASETS["mnist"].train_count
    assert ds.labels.dtype == torch.int64 and tuple(ds.labels.shape) == (60000,)
    assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
    assert torch.bincount(ds.labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert ds.num_classes == 10 and ds.class_names == tuple(str(i) for i in range(10))
    # Real pixels, not a blank or constant buffer: full 0..255 range, mostly background.
    assert int(ds.images.min()) == 0 and int(ds.images.max()) == 255
    assert 0.1 < (ds.images > 0).float().mean().item() < 0.3
    # The original order: the first training digits of MNIST are 5, 0, 4, 1, 9.
    assert ds.labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_mnist_test_split(mnist_dir):
    ds = load_dataset("mnist", "test", data_dir=mnist_dir, download=False)
    assert tuple(ds.images.shape) == (10000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.bincount(ds.labels, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_env_var_is_used_when_no_data_dir(mnist_dir, monkeypatch):
    monkeypatch.setenv("SIMPLE_DIT_DATA", str(mnist_dir))
    ds = load_dataset("mnist", "test", download=False)
    assert len(ds) == 10000


def test_batch_scales_to_model_range(mnist_train):
    x, y = mnist_train.batch(torch.arange(8))
    assert x.dtype == torch.float32 and tuple(x.shape) == (8, 1, 28, 28)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(y, mnist_train.labels[:8])
    assert torch.equal(to_uint8(x), mnist_train.images[:8])  # exact round trip
    assert torch.equal(to_uint8(to_model_range(torch.arange(256, dtype=torch.uint8))), torch.arange(256, dtype=torch.uint8))


def test_missing_file_without_download_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as info:
        load_dataset("mnist", "train", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and "f68b3c2dcbeaaa9fbdd348bbdeb94873" in message
    assert "\n" not in message


def test_one_missing_file_is_named(mnist_dir, tmp_path):
    for name in MNIST_FILES:
        if name != "t10k-labels-idx1-ubyte.gz":
            shutil.copy(mnist_dir / name, tmp_path / name)
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    assert not (tmp_path / "t10k-labels-idx1-ubyte.gz").exists()


@pytest.mark.parametrize("damage", [
    lambda blob: blob[: len(blob) // 2],  # cut off
    lambda blob: blob[:500] + b"XXXX" + blob[504:],  # garbled compressed bytes: zlib's own error, not an OSError
])  # fmt: skip
def test_corrupt_file_is_rejected_with_its_md5(damage, mnist_dir, tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_dir / name, tmp_path / name)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    damaged = damage(path.read_bytes())
    path.write_bytes(damaged)
    with pytest.raises(UserError) as info:
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert str(path) in message and "9fb629c4189551a2d022fa330f9573f3" in message
    assert path.read_bytes() == damaged  # left alone


def test_a_download_into_a_directory_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(UserError, match="was not found, and cannot be downloaded into"):
        load_dataset("mnist", "test", data_dir=tmp_path / "a_file" / "data")


def test_regzipped_and_uncompressed_copies_are_accepted(mnist_dir, tmp_path):
    """A re-gzipped file (different .gz md5, same content) and an uncompressed one both load."""
    raw_labels = gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(raw_labels)  # no .gz at all
    raw_images = gzip.decompress((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    regz = gzip.compress(raw_images, compresslevel=1, mtime=0)
    assert regz != (mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(regz)
    ds = load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    ref = load_dataset("mnist", "test", data_dir=mnist_dir, download=False)
    assert torch.equal(ds.images, ref.images) and torch.equal(ds.labels, ref.labels)


def test_unknown_dataset_and_split():
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("cifar10", "train")
    with pytest.raises(UserError, match="unknown split"):
        load_dataset("mnist", "validation")


@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_system_dir():
    ds = load_dataset("fashion-mnist", "train", data_dir=FASHION_DIR, download=False)
    assert tuple(ds.images.shape) == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.bincount(ds.labels, minlength=10).tolist() == [6000] * 10
    assert ds.class_names == DATASETS["fashion-mnist"].class_names and len(ds) == DATASETS["fashion-mnist"].train_count
    assert ds.class_names[0] == "T-shirt" and ds.class_names[9] == "Boot" and len(ds.class_names) == 10
    assert ds.num_classes == 10


@pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_found_in_system_dir_without_data_dir(monkeypatch):
    """With nothing configured, the Debian package's directory is the last place looked in."""
    monkeypatch.delenv("SIMPLE_DIT_DATA")
    ds = load_dataset("fashion-mnist", "test", download=False)
    assert len(ds) == 10000 and torch.bincount(ds.labels, minlength=10).tolist() == [1000] * 10


@pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_loads_while_env_points_at_flat_mnist_dir(mnist_dir, monkeypatch):
    monkeypatch.setenv("SIMPLE_DIT_DATA", str(mnist_dir))
    ds = load_dataset("fashion-mnist", "test", download=False)
    assert len(ds) == 10000


@pytest.mark.parametrize("where", ["a file", "missing"])
def test_a_data_variable_that_names_no_directory_is_refused(mnist_dir, tmp_path, monkeypatch, where):
    """It was passed over for the user cache: offline the error named the cache, online the data
    would have been downloaded there without a word."""
    target = mnist_dir / "t10k-images-idx3-ubyte.gz" if where == "a file" else tmp_path / "mnst"
    monkeypatch.setenv("SIMPLE_DIT_DATA", str(target))
    monkeypatch.setattr("simple_dit.data.default_cache_dir", lambda: tmp_path / "cache")
    with pytest.raises(UserError, match=f"SIMPLE_DIT_DATA={target} is {'not a directory' if where == 'a file' else 'missing'}"):
        load_dataset("mnist", "test")
    assert not (tmp_path / "cache").exists()


def _mirrored(monkeypatch, mirror: str) -> None:
    """MNIST's download mirrors replaced by one local URL (no network in the tests)."""
    import dataclasses

    import simple_dit.data as data

    monkeypatch.setitem(data.DATASETS, "mnist", dataclasses.replace(data.DATASETS["mnist"], mirrors=(mirror,)))


def test_a_missing_file_is_downloaded_checked_and_loaded(mnist_dir, tmp_path, monkeypatch):
    _mirrored(monkeypatch, mnist_dir.resolve().as_uri() + "/")
    target = tmp_path / "new" / "data"
    ds = load_dataset("mnist", "test", data_dir=target)
    assert sorted(p.name for p in target.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert torch.bincount(ds.labels, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_a_download_that_fails_leaves_no_directory_behind(tmp_path, monkeypatch):
    _mirrored(monkeypatch, (tmp_path / "no-mirror").as_uri() + "/")
    with pytest.raises(UserError, match="could not be downloaded"):
        load_dataset("mnist", "test", data_dir=tmp_path / "typo" / "dir")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_a_download_never_replaces_another_dataset_s_file_of_the_same_name(mnist_dir, tmp_path, monkeypatch):
    _mirrored(monkeypatch, mnist_dir.resolve().as_uri() + "/")
    shutil.copy(FASHION_DIR / "t10k-images-idx3-ubyte.gz", tmp_path)
    before = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    with pytest.raises(UserError, match="downloading it would replace that file"):
        load_dataset("mnist", "test", data_dir=tmp_path)
    assert (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes() == before
