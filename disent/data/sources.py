"""Sources for `disent prepare`: IDX files, an image folder, a .npz file, procedural sprites.

Each loader returns a :class:`SourceData` whose arrays are already checked: every problem is
reported as a DataError naming the file or the sample index, before any shard is written.

SOURCE syntax: ``idx:DIR``, ``folder:DIR``, ``npz:FILE``, ``sprites`` (or ``sprites:``), ``glyphs``.
A plain path is accepted where the kind is clear: a ``.npz`` file, a directory holding IDX
files, or a directory of class sub-directories.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from disent.data.errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


@dataclass
class Part:
    """Arrays of one provided part of a source (its training data, or a provided test set)."""

    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    factors: np.ndarray  # float32 [N, F]
    origin: str  # what to name in messages (a file, a directory)
    ids: np.ndarray | None = None  # int64 [N]: each sample's index in the source part (None: 0..N-1)


@dataclass
class SourceData:
    kind: str
    train: Part
    test: Part | None  # None: carve the test split out of train
    num_classes: int
    factor_names: list[str]
    class_names: list[str] | None
    description: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceOptions:
    num_classes: int | None = None  # None: infer as max label + 1
    num_samples: int = 20000  # sprites, glyphs
    image_size: int = 32  # sprites, glyphs
    fonts: str | None = None  # glyphs: a directory or glob of font files (default: fonts-urw-base35)
    seed: int = 0
    limit: int | None = None  # take at most this many samples from each provided part (quick runs)


# --------------------------------------------------------------------------- checks


def check_part(part: Part, num_classes: int, what: str) -> None:
    """Labels in range and every class with at least two samples (pairs need two)."""
    labels = part.labels
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{part.origin}: label {int(labels[i])} at index {i} is out of range 0..{num_classes - 1} "
            f"({bad.size} labels out of range in {what})"
        )
    counts = np.bincount(labels, minlength=num_classes)
    few = np.flatnonzero(counts < 2)
    if few.size:
        detail = ", ".join(f"class {int(c)}: {int(counts[c])}" for c in few[:10])
        raise DataError(
            f"{part.origin}: every class needs at least 2 samples to form same-class pairs, but {what} has "
            f"{detail} sample(s); remove the class, add samples, or set --num-classes to the classes present"
        )
    if part.factors.shape[0] != labels.shape[0]:
        raise DataError(f"{part.origin}: {part.factors.shape[0]} factor rows for {labels.shape[0]} samples")
    if part.images.shape[0] != labels.shape[0]:
        raise DataError(f"{part.origin}: {part.images.shape[0]} images but {labels.shape[0]} labels")


def _resolve_classes(parts: list[Part], given: int | None) -> int:
    for part in parts:
        neg = np.flatnonzero(part.labels < 0)
        if neg.size:
            i = int(neg[0])
            raise DataError(f"{part.origin}: label {int(part.labels[i])} at index {i} is out of range (negative)")
    if given is not None:
        if given < 1:
            raise DataError(f"--num-classes must be >= 1, got {given}")
        return given
    return int(max(int(p.labels.max()) for p in parts if p.labels.size) + 1)


def _limit(part: Part, limit: int | None) -> Part:
    if limit is None or limit >= len(part.labels):
        return part
    return Part(part.images[:limit], part.labels[:limit], part.factors[:limit], part.origin)


# --------------------------------------------------------------------------- IDX


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


def load_idx(directory: str, opts: SourceOptions) -> SourceData:
    d = Path(directory)
    if not d.is_dir():
        hint = (" (Fashion-MNIST: apt-get install -y dataset-fashion-mnist)" if "fashion" in str(d).lower() else "")
        raise DataError(f"{d}: IDX source directory does not exist{hint}")
    train = _idx_part(d, "train")
    test = _idx_part(d, "t10k") or _idx_part(d, "test")
    if train is None:
        raise DataError(f"{d}: no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz] files found")
    train, test = _limit(train, opts.limit), (_limit(test, opts.limit) if test else None)
    parts = [p for p in (train, test) if p is not None]
    num_classes = _resolve_classes(parts, opts.num_classes)
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


# --------------------------------------------------------------------------- folder


def load_folder(directory: str, opts: SourceOptions) -> SourceData:
    """One sub-directory per class (sorted names -> class ids 0..K-1), image files inside."""
    from PIL import Image, UnidentifiedImageError

    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: expected one sub-directory per class, found none")
    files: list[tuple[Path, int]] = []
    for cls, cdir in enumerate(class_dirs):
        found = sorted(p for p in cdir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith("."))
        if len(found) < 2:
            raise DataError(
                f"{cdir}: class {cls} ('{cdir.name}') has {len(found)} image(s); every class needs at least 2 "
                "to form same-class pairs"
            )
        files.extend((p, cls) for p in found)
    if opts.limit is not None:
        files = files[: opts.limit] if opts.limit < len(files) else files

    decoded: list[Any] = []
    size: tuple[int, int] | None = None
    first: Path | None = None
    colour = False
    for path, _ in files:
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("L", "1", "I;16", "I", "F") or (im.mode == "P" and _palette_is_grey(im)):
                    im = im.convert("L")
                else:
                    im = im.convert("RGB")
                    colour = colour or not _is_grey_rgb(im)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
        if size is None:
            size, first = im.size, path
        elif im.size != size:
            raise DataError(
                f"{path}: image is {im.size[0]}x{im.size[1]} but {first} is {size[0]}x{size[1]}; "
                "all images must have the same size"
            )
        decoded.append(im)
    channels = 3 if colour else 1
    h, w = size[1], size[0]  # type: ignore[index]
    images = np.empty((len(decoded), channels, h, w), np.uint8)
    for i, im in enumerate(decoded):
        arr = np.asarray(im.convert("RGB" if colour else "L"), dtype=np.uint8)
        images[i] = arr.transpose(2, 0, 1) if colour else arr[None]
    labels = np.array([c for _, c in files], np.int64)
    part = Part(images, labels, np.zeros((len(labels), 0), np.float32), str(root))
    num_classes = len(class_dirs)
    check_part(part, num_classes, "the folder")
    return SourceData(
        kind="folder", train=part, test=None, num_classes=num_classes, factor_names=[],
        class_names=[p.name for p in class_dirs],
        description={"kind": "folder", "path": str(root.resolve()), "files": len(files)},
    )


def _palette_is_grey(im) -> bool:
    rgb = im.convert("RGB")
    return _is_grey_rgb(rgb)


def _is_grey_rgb(im) -> bool:
    arr = np.asarray(im)
    return bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())


# --------------------------------------------------------------------------- npz


def _pick(npz, names: tuple[str, ...], path: Path, required: bool = True):
    for name in names:
        if name in npz.files:
            return name
    if required:
        raise DataError(f"{path}: no array named {' or '.join(repr(n) for n in names)} (found {npz.files})")
    return None


def _to_nchw(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            return images.transpose(0, 3, 1, 2)
        if images.shape[1] in (1, 3):
            return images
    raise DataError(f"{where}: images must be N x H x W, N x H x W x C or N x C x H x W with C in (1, 3); "
                    f"got shape {images.shape}")


def _to_uint8(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        lo, hi = float(np.nanmin(images)), float(np.nanmax(images))
        if np.isnan(images).any() or lo < 0.0 or hi > 1.0:
            raise DataError(f"{where}: float images must lie in [0, 1] (found {lo} .. {hi})")
        return np.round(images * 255).astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer):
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: integer images must lie in 0..255 (found {lo} .. {hi})")
        return images.astype(np.uint8)
    raise DataError(f"{where}: unsupported image dtype {images.dtype}")


def load_npz(file: str, opts: SourceOptions) -> SourceData:
    """Arrays: images (or x/X), labels (or y/Y); optional factors + factor_names, class_names,
    and a provided test set as test_images/test_labels (x_test/y_test) [+ test_factors]."""
    path = Path(file)
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: .npz file does not exist") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: unreadable .npz file ({exc})") from None
    with npz:
        try:
            def part(img_names, lab_names, fac_names, required=True):
                img_key = _pick(npz, img_names, path, required)
                if img_key is None:
                    return None
                lab_key = _pick(npz, lab_names, path)
                where = f"{path}[{img_key}]"
                images = _to_uint8(_to_nchw(np.asarray(npz[img_key]), where), where)
                labels = np.asarray(npz[lab_key])
                if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
                    raise DataError(f"{path}[{lab_key}]: labels must be a 1-d integer array, "
                                    f"got {labels.dtype} {labels.shape}")
                if len(labels) != len(images):
                    raise DataError(f"{path}: {img_key} holds {len(images)} images but {lab_key} holds "
                                    f"{len(labels)} labels")
                fac_key = _pick(npz, fac_names, path, required=False)
                if fac_key is not None:
                    factors = np.asarray(npz[fac_key], dtype=np.float32)
                    if factors.ndim == 1:
                        factors = factors[:, None]
                    if factors.shape[0] != len(labels):
                        raise DataError(f"{path}[{fac_key}]: {factors.shape[0]} rows for {len(labels)} samples")
                else:
                    factors = np.zeros((len(labels), 0), np.float32)
                return Part(np.ascontiguousarray(images), labels.astype(np.int64), factors, f"{path}[{lab_key}]")

            train = part(("images", "x", "X", "x_train", "train_images"), ("labels", "y", "Y", "y_train", "train_labels"),
                         ("factors", "train_factors"))
            test = part(("test_images", "x_test"), ("test_labels", "y_test"), ("test_factors",), required=False)
            factor_names = [str(n) for n in npz["factor_names"]] if "factor_names" in npz.files else []
            class_names = [str(n) for n in npz["class_names"]] if "class_names" in npz.files else None
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: unreadable .npz content ({exc})") from None
    train, test = _limit(train, opts.limit), (_limit(test, opts.limit) if test else None)
    nf = train.factors.shape[1]
    if not factor_names:
        factor_names = [f"factor{i}" for i in range(nf)]
    if len(factor_names) != nf:
        raise DataError(f"{path}: factor_names lists {len(factor_names)} names but factors have {nf} columns")
    if test is not None:
        if test.images.shape[1:] != train.images.shape[1:]:
            raise DataError(f"{path}: test images are {test.images.shape[1:]} but train images are "
                            f"{train.images.shape[1:]}")
        if test.factors.shape[1] != nf:
            raise DataError(f"{path}: test_factors have {test.factors.shape[1]} columns, factors have {nf}")
    parts = [p for p in (train, test) if p is not None]
    num_classes = _resolve_classes(parts, opts.num_classes if opts.num_classes is not None else
                                   (len(class_names) if class_names else None))
    check_part(train, num_classes, "the training arrays")
    if test is not None:
        check_part(test, num_classes, "the test arrays")
    return SourceData(
        kind="npz", train=train, test=test, num_classes=num_classes, factor_names=factor_names,
        class_names=class_names, description={"kind": "npz", "path": str(path.resolve())},
    )


# --------------------------------------------------------------------------- sprites


def _check_drawn(opts: SourceOptions, kind: str, classes: int) -> None:
    """A drawn source (sprites, glyphs) needs two samples per class for pairs, and a supported size."""
    if opts.num_samples < 2 * classes:
        raise DataError(f"--num-samples must be at least {2 * classes} for {kind}, got {opts.num_samples}")
    if opts.image_size not in (32, 64):
        raise DataError(f"--image-size for {kind} must be 32 or 64, got {opts.image_size}")


def load_sprites(opts: SourceOptions) -> SourceData:
    from disent.data import sprites

    _check_drawn(opts, "sprites", len(sprites.CLASS_NAMES))
    images, labels, factors = sprites.generate(opts.num_samples, opts.seed, opts.image_size)
    part = Part(images, labels, factors, f"sprites(seed={opts.seed})")
    check_part(part, len(sprites.CLASS_NAMES), "the generated sprites (use more --num-samples)")
    return SourceData(
        kind="sprites", train=part, test=None, num_classes=len(sprites.CLASS_NAMES),
        factor_names=list(sprites.FACTOR_NAMES), class_names=list(sprites.CLASS_NAMES),
        description={"kind": "sprites", "num_samples": opts.num_samples, "image_size": opts.image_size,
                     "seed": opts.seed, "factor_ranges": {k: list(v) for k, v in sprites.FACTOR_RANGES.items()}},
    )


# --------------------------------------------------------------------------- glyphs


def load_glyphs(opts: SourceOptions) -> SourceData:
    from disent.data import glyphs

    classes = len(glyphs.CHARACTERS)
    _check_drawn(opts, "glyphs", classes)
    faces = glyphs.load_faces(opts.fonts)
    images, labels, factors = glyphs.generate(opts.num_samples, faces, opts.seed, opts.image_size, progress=True)
    part = Part(images, labels, factors, f"glyphs(seed={opts.seed})")
    check_part(part, classes, "the rendered glyphs (use more --num-samples)")
    return SourceData(
        kind="glyphs", train=part, test=None, num_classes=classes,
        factor_names=list(glyphs.FACTOR_NAMES), class_names=list(glyphs.CHARACTERS),
        description={"kind": "glyphs", "num_samples": opts.num_samples, "image_size": opts.image_size,
                     "seed": opts.seed, "fonts_spec": opts.fonts or glyphs.DEFAULT_FONTS,
                     "fonts": [{"index": i, "file": f.path, "package": f.package} for i, f in enumerate(faces)],
                     "categorical_factors": list(glyphs.CATEGORICAL_FACTORS),
                     "factor_ranges": {k: list(v) for k, v in glyphs.FACTOR_RANGES.items()}},
    )


# --------------------------------------------------------------------------- dispatch


def parse_source(spec: str) -> tuple[str, str]:
    """``kind:path`` -> (kind, path); a plain path is auto-detected where unambiguous."""
    kinds = ("idx", "folder", "npz", "sprites", "glyphs")
    head, sep, rest = spec.partition(":")
    if sep and head in kinds:
        if head not in ("sprites", "glyphs") and not rest:
            raise DataError(f"source {spec!r}: give a path after '{head}:'")
        return head, rest
    if spec in ("sprites", "glyphs"):
        return spec, ""
    path = Path(spec)
    if path.is_file() and path.suffix == ".npz":
        return "npz", spec
    if path.is_dir():
        names = [p.name for p in path.iterdir()]
        if any("idx" in n and ("images" in n or "labels" in n) for n in names):
            return "idx", spec
        if any((path / n).is_dir() for n in names):
            return "folder", spec
    if not path.exists():
        raise DataError(f"source {spec!r} does not exist; use idx:DIR, folder:DIR, npz:FILE, sprites or glyphs")
    raise DataError(f"cannot tell what kind of source {spec!r} is; write idx:DIR, folder:DIR, npz:FILE, sprites or glyphs")


def load_source(spec: str, opts: SourceOptions) -> SourceData:
    kind, path = parse_source(spec)
    if kind == "idx":
        return load_idx(path, opts)
    if kind == "folder":
        return load_folder(path, opts)
    if kind == "npz":
        return load_npz(path, opts)
    if kind == "glyphs":
        return load_glyphs(opts)
    return load_sprites(opts)


def default_fashion_mnist_dir() -> str:
    return os.environ.get("DISENT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


def ensure_fashion_mnist(install: bool = True, echo=print) -> Path:
    """The Fashion-MNIST IDX directory (Debian package dataset-fashion-mnist).

    When it is missing and ``install`` is true and we are root with apt-get available, installs
    the package (``apt-get update`` + ``apt-get install -y dataset-fashion-mnist``). Otherwise
    raises DataError saying how to get it.
    """
    import shutil
    import subprocess

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
