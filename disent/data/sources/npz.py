"""``npz:FILE``: arrays in a NumPy .npz file (images, labels; optional factors and a test set)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from disent.data.errors import DataError
from disent.data.sources.registry import Part, SourceData, SourceOptions, check_part, limit_part, register_source, resolve_classes

# The array names each part may use: (images, labels, factors).
_TRAIN_KEYS = (("images", "x", "X", "x_train", "train_images"), ("labels", "y", "Y", "y_train", "train_labels"),
               ("factors", "train_factors"))
_TEST_KEYS = (("test_images", "x_test"), ("test_labels", "y_test"), ("test_factors",))


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


def _npz_part(npz, path: Path, img_names, lab_names, fac_names, required=True) -> Part | None:
    """One part (train, or the provided test set) from the arrays named by the first present name."""
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


def _read_npz(path: Path) -> tuple[Part, Part | None, list[str], list[str] | None]:
    """(train, test or None, factor_names as stored, class_names or None). Errors name the file."""
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: .npz file does not exist") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: unreadable .npz file ({exc})") from None
    with npz:
        try:
            train = _npz_part(npz, path, *_TRAIN_KEYS)
            test = _npz_part(npz, path, *_TEST_KEYS, required=False)
            factor_names = [str(n) for n in npz["factor_names"]] if "factor_names" in npz.files else []
            class_names = [str(n) for n in npz["class_names"]] if "class_names" in npz.files else None
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: unreadable .npz content ({exc})") from None
    return train, test, factor_names, class_names


def _check_factors(path: Path, train: Part, test: Part | None, factor_names: list[str]) -> list[str]:
    """The factor names (factor0.. when none are stored), checked against the factor columns and test shapes."""
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
    return factor_names


def _is_npz_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".npz"


@register_source(
    "npz", syntax="npz:FILE",
    help="arrays images (N,H,W | N,H,W,C | N,C,H,W) and labels; optional factors,\n"
    "factor_names, class_names, test_images/test_labels",
    claims=_is_npz_file, claims_help="a .npz file",
)
def load_npz(file: str, opts: SourceOptions) -> SourceData:
    """Arrays: images (or x/X), labels (or y/Y); optional factors + factor_names, class_names,
    and a provided test set as test_images/test_labels (x_test/y_test) [+ test_factors]."""
    path = Path(file)
    train, test, factor_names, class_names = _read_npz(path)
    train, test = limit_part(train, opts.limit), (limit_part(test, opts.limit) if test else None)
    factor_names = _check_factors(path, train, test, factor_names)
    parts = [p for p in (train, test) if p is not None]
    num_classes = resolve_classes(parts, opts.num_classes if opts.num_classes is not None else
                                  (len(class_names) if class_names else None))
    check_part(train, num_classes, "the training arrays")
    if test is not None:
        check_part(test, num_classes, "the test arrays")
    return SourceData(
        kind="npz", train=train, test=test, num_classes=num_classes, factor_names=factor_names,
        class_names=class_names, description={"kind": "npz", "path": str(path.resolve())},
    )
