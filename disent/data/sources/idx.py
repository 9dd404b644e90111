"""``idx:DIR``: MNIST-style IDX files (gzip or raw), and where to find Fashion-MNIST."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from disent.data.errors import DataError
from disent.data.sources.registry import Part, SourceData, SourceOptions, check_part, limit_part, register_source, resolve_classes

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def _open_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DataError(f"{path}: unreadable gzip data ({exc})") from None
    return raw


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzip or raw). Errors name the file."""
    data = _open_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype = np.dtype(_IDX_TYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds "
            f"{len(data) - header} bytes of data (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find_idx(directory: Path, prefix: str, kind: str) -> Path | None:
    """Find e.g. train-images-idx3-ubyte[.gz] or train-images.idx3-ubyte."""
    candidates = sorted(
        p for p in directory.iterdir()
        if p.is_file() and p.name.startswith(prefix) and kind in p.name and "idx" in p.name
    )
    return candidates[0] if candidates else None


def _idx_part(directory: Path, prefix: str) -> Part | None:
    img_path = _find_idx(directory, prefix, "images")
    lab_path = _find_idx(directory, prefix, "labels")
    if img_path is None and lab_path is None:
        return None
    if img_path is None or lab_path is None:
        missing = f"{prefix}-images" if img_path is None else f"{prefix}-labels"
        raise DataError(f"{directory}: found {(lab_path or img_path).name} but no {missing}-idx file beside it")
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim not in (3, 4):
        raise DataError(f"{img_path}: expected images of shape N x H x W (or N x H x W x C), got {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{lab_path}: expected a 1-d label array, got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels")
    if images.dtype != np.uint8:
        raise DataError(f"{img_path}: images must be unsigned bytes (IDX type 0x08), got {images.dtype}")
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    return Part(np.ascontiguousarray(images), labels.astype(np.int64),
                np.zeros((len(labels), 0), np.float32), str(img_path))


def _holds_idx_files(path: Path) -> bool:
    """A plain path means idx when it is a directory with IDX image or label files in it."""
    if not path.is_dir():
        return False
    return any("idx" in p.name and ("images" in p.name or "labels" in p.name) for p in path.iterdir())


@register_source(
    "idx", syntax="idx:DIR",
    help="MNIST-style IDX files (gzip or raw): train-images/labels and, if present,\n"
    "t10k-images/labels (the test split; otherwise test is carved from train).\n"
    "Fashion-MNIST: idx:/usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)",
    claims=_holds_idx_files, claims_help="a directory of IDX files",
)
def load_idx(directory: str, opts: SourceOptions) -> SourceData:
    d = Path(directory)
    if not d.is_dir():
        hint = (" (Fashion-MNIST: apt-get install -y dataset-fashion-mnist)" if "fashion" in str(d).lower() else "")
        raise DataError(f"{d}: IDX source directory does not exist{hint}")
    train = _idx_part(d, "train")
    test = _idx_part(d, "t10k") or _idx_part(d, "test")
    if train is None:
        raise DataError(f"{d}: no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz] files found")
    train, test = limit_part(train, opts.limit), (limit_part(test, opts.limit) if test else None)
    parts = [p for p in (train, test) if p is not None]
    num_classes = resolve_classes(parts, opts.num_classes)
    if test is not None and test.images.shape[1:] != train.images.shape[1:]:
        raise DataError(f"{test.origin}: images are {test.images.shape[1:]} but {train.origin} has "
                        f"{train.images.shape[1:]}")
    check_part(train, num_classes, "the training files")
    if test is not None:
        check_part(test, num_classes, "the test files")
    fashion = "fashion" in str(d.resolve()).lower() and num_classes == 10
    return SourceData(
        kind="idx", train=train, test=test, num_classes=num_classes, factor_names=[],
        class_names=FASHION_MNIST_CLASSES if fashion else None,
        description={"kind": "idx", "path": str(d.resolve()), "train_file": Path(train.origin).name,
                     "test_file": Path(test.origin).name if test else None},
    )


# --------------------------------------------------------------------------- Fashion-MNIST


def default_fashion_mnist_dir() -> str:
    return os.environ.get("DISENT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


def ensure_fashion_mnist(install: bool = True, echo=print) -> Path:
    """The Fashion-MNIST IDX directory (Debian package dataset-fashion-mnist).

    When it is missing and ``install`` is true and we are root with apt-get available, installs
    the package (``apt-get update`` + ``apt-get install -y dataset-fashion-mnist``). Otherwise
    raises DataError saying how to get it.
    """
    d = Path(default_fashion_mnist_dir())
    if d.is_dir() and any(d.glob("train-images*")):
        return d
    can = install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")
    if can:
        echo("installing Fashion-MNIST: apt-get install -y dataset-fashion-mnist")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        result = subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], env=env)
        if result.returncode == 0 and d.is_dir():
            return d
    raise DataError(
        f"Fashion-MNIST is not installed at {d}: run `sudo apt-get install -y dataset-fashion-mnist` "
        "(Debian/Ubuntu), or set DISENT_FASHION_MNIST to a directory holding the IDX files"
    )
