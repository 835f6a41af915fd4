"""MNIST and Fashion-MNIST from the canonical IDX files, held in memory as uint8 tensors.

Files are looked for in ``data_dir``, else ``$SIMPLE_DIT_DATA``, else a user cache directory,
and downloaded from the public mirrors only when absent there. Every file is checked against the
published MD5 before it is parsed, so a truncated download can never be half-loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError


@dataclass(frozen=True)
class IdxFile:
    name: str  # the canonical file name, with .gz
    gz_md5: str  # the published checksum of the .gz file
    raw_md5: str  # the checksum of its decompressed content, for copies that were re-gzipped


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    mirrors: tuple[str, ...]
    train_images: IdxFile
    train_labels: IdxFile
    test_images: IdxFile
    test_labels: IdxFile
    class_names: tuple[str, ...]
    train_count: int = 60_000  # images in the (checksummed) training files


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        train_images=IdxFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        train_labels=IdxFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
        test_images=IdxFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        test_labels=IdxFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
        class_names=tuple(str(i) for i in range(10)),
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        train_images=IdxFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        train_labels=IdxFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        test_images=IdxFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        test_labels=IdxFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
        class_names=("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"),
    ),
}

# Where Debian's dataset-fashion-mnist package puts its files: used when nothing else has them.
SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "simple-dit" / "data"


def get_spec(dataset: str) -> DatasetSpec:
    if not isinstance(dataset, str) or dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[dataset]


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _candidate_dirs(dataset: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """The directories searched, most specific first (a dataset may sit in a sub-folder)."""
    if data_dir is not None:
        roots = [Path(data_dir)]
    else:
        env = os.environ.get("SIMPLE_DIT_DATA")
        if env and not Path(env).is_dir():  # a typo would otherwise download, or fail naming the cache
            raise UserError(f"SIMPLE_DIT_DATA={env} is {'not a directory' if Path(env).exists() else 'missing'}: "
                            "it names the directory of the dataset's files")  # fmt: skip
        roots = ([Path(env)] if env else []) + [default_cache_dir()]
    dirs = []
    for root in roots:
        dirs += [root / dataset, root]
    if data_dir is None and dataset in SYSTEM_DIRS:
        dirs.append(SYSTEM_DIRS[dataset])
    return dirs


def _read_verified(path: Path, spec: IdxFile) -> bytes:
    """The decompressed bytes of one IDX file, or a one-line error naming what is wrong."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix == ".gz":
        good_gz = _md5(blob) == spec.gz_md5
        try:
            raw = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error):  # a bad header, a cut-off stream, garbled compressed bytes
            raw = None
    else:
        good_gz, raw = False, blob
    if not good_gz and (raw is None or _md5(raw) != spec.raw_md5):
        raise UserError(
            f"{path} is corrupt or truncated (md5 {_md5(blob)}, expected {spec.gz_md5}); "
            f"delete it and put a good copy of {spec.name} in that directory, or let simple-dit download it"
        )
    assert raw is not None
    return raw


def _download(spec: DatasetSpec, file: IdxFile, dest_dir: Path) -> Path:
    dest = dest_dir / file.name
    if dest.exists():  # a file of the same name that is not this one: another dataset's, or damaged
        raise UserError(f"{dest} is not {spec.name}'s {file.name} (md5 {file.gz_md5}), and downloading it would replace that file; "
                        f"give {spec.name} a --data-dir of its own, or remove the file")  # fmt: skip
    created = [d for d in (dest_dir, *dest_dir.parents) if not d.exists()]  # deepest first: removed again if nothing comes
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{file.name} of {spec.name} was not found, and cannot be downloaded into {dest_dir} ({e.strerror}); "
                        f"put the file (md5 {file.gz_md5}) in --data-dir or $SIMPLE_DIT_DATA") from None  # fmt: skip
    try:
        return _fetch(spec, file, dest_dir, dest)
    except UserError:
        for d in created:
            try:
                d.rmdir()
            except OSError:  # not empty: something else was put there meanwhile
                break
        raise


def _fetch(spec: DatasetSpec, file: IdxFile, dest_dir: Path, dest: Path) -> Path:
    from tqdm import tqdm

    errors = []
    for mirror in spec.mirrors:
        url = mirror + file.name
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                # Download next to the destination and rename, so an interrupted download never
                # leaves a file that looks complete.
                with tempfile.NamedTemporaryFile(dir=dest_dir, delete=False, suffix=".part") as tmp:
                    with tqdm(total=total, unit="B", unit_scale=True, desc=file.name, leave=False) as bar:
                        while chunk := response.read(1 << 16):
                            tmp.write(chunk)
                            bar.update(len(chunk))
            blob = Path(tmp.name).read_bytes()
            if _md5(blob) != file.gz_md5:
                os.unlink(tmp.name)
                errors.append(f"{url}: checksum mismatch")
                continue
            os.replace(tmp.name, dest)
            return dest
        except OSError as e:
            errors.append(f"{url}: {e}")
    raise UserError(
        f"{file.name} of {spec.name} not found locally and could not be downloaded ({'; '.join(errors)}); "
        f"put the file (md5 {file.gz_md5}) in --data-dir or $SIMPLE_DIT_DATA"
    )


def _belongs_to_another_dataset(path: Path, spec: DatasetSpec, file: IdxFile) -> bool:
    """True for a good copy of another dataset's file of the same name (MNIST and Fashion-MNIST
    share file names, so one dataset's folder is often searched for the other's files)."""
    others = [
        f for d in DATASETS.values() if d.name != spec.name
        for f in (d.train_images, d.train_labels, d.test_images, d.test_labels) if f.name == file.name
    ]  # fmt: skip
    if not others:
        return False
    try:
        _read_verified(path, others[0])
        return True
    except UserError:
        return False


def _locate_and_read(spec: DatasetSpec, file: IdxFile, data_dir, download: bool) -> bytes:
    raw_name = file.name.removesuffix(".gz")
    for d in _candidate_dirs(spec.name, data_dir):
        for name in (file.name, raw_name):
            path = d / name
            if path.is_file() and not _belongs_to_another_dataset(path, spec, file):
                return _read_verified(path, file)
    if not download:
        where = data_dir or os.environ.get("SIMPLE_DIT_DATA") or default_cache_dir()
        raise UserError(f"{file.name} (md5 {file.gz_md5}) of {spec.name} is missing; put it in {where}")
    target = Path(data_dir) if data_dir is not None else default_cache_dir() / spec.name
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} is not a directory: --data-dir names the directory of the dataset's files")
    return _read_verified(_download(spec, file, target), file)


def _parse_idx(raw: bytes, name: str, expected_ndim: int) -> torch.Tensor:
    magic, = struct.unpack(">I", raw[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim != expected_ndim:
        raise UserError(f"{name} is not an IDX uint8 file with {expected_ndim} dimensions")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    body = bytearray(raw[4 + 4 * ndim :])
    return torch.frombuffer(body, dtype=torch.uint8).reshape(shape)


@dataclass
class ImageDataset:
    """A whole split in memory: images uint8 (N, C, H, W), labels int64 (N,)."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device: torch.device | str) -> "ImageDataset":
        """The same split on ``device`` (MNIST's training images are 47 MB as uint8: on a GPU,
        keeping them resident saves a host-to-device copy and a host-side gather per step)."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images scaled to [-1, 1] as float32, and their labels."""
        return to_model_range(self.images[index]), self.labels[index]


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_dataset(
    dataset: str = "mnist", split: str = "train", data_dir: str | os.PathLike | None = None, download: bool = True
) -> ImageDataset:
    """A whole split, parsed once per process (the result is shared: treat it as read-only)."""
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise UserError(f"data_dir must be a path, got {type(data_dir).__name__}")
    return _load_dataset(dataset, split, None if data_dir is None else str(data_dir), os.environ.get("SIMPLE_DIT_DATA"), download)


@functools.lru_cache(maxsize=8)
def _load_dataset(dataset: str, split: str, data_dir: str | None, env_data_dir: str | None, download: bool) -> ImageDataset:
    # env_data_dir is only part of the cache key: the lookup reads the environment itself.
    spec = get_spec(dataset)
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; choose train or test")
    image_file, label_file = (
        (spec.train_images, spec.train_labels) if split == "train" else (spec.test_images, spec.test_labels)
    )
    images = _parse_idx(_locate_and_read(spec, image_file, data_dir, download), image_file.name, 3)
    labels = _parse_idx(_locate_and_read(spec, label_file, data_dir, download), label_file.name, 1)
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{image_file.name} has {images.shape[0]} images but {label_file.name} has {labels.shape[0]} labels")
    return ImageDataset(spec.name, split, images.unsqueeze(1).contiguous(), labels.long(), spec.class_names)

