"""``folder:DIR``: one sub-directory per class (sorted names -> class ids 0..K-1), image files inside."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from disent.config.schema import IMAGE_SIZES
from disent.data.errors import DataError
from disent.data.sources.registry import Part, SourceData, SourceOptions, check_part, register_source

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}


def _holds_class_folders(path: Path) -> bool:
    """A plain path means folder when it is a directory with a sub-directory in it."""
    return path.is_dir() and any(p.is_dir() for p in path.iterdir())


@register_source("folder", syntax="folder:DIR", help="one sub-directory per class holding image files",
                 claims=_holds_class_folders, claims_help="a directory of class folders")
def load_folder(directory: str, opts: SourceOptions) -> SourceData:
    """One sub-directory per class (sorted names -> class ids 0..K-1), image files inside."""
    root = Path(directory)
    class_dirs, files = _list_images(root, opts.limit)
    images = _decode_images([path for path, _ in files])
    labels = np.array([c for _, c in files], np.int64)
    part = Part(images, labels, np.zeros((len(labels), 0), np.float32), str(root))
    num_classes = len(class_dirs)
    check_part(part, num_classes, "the folder")
    return SourceData(
        kind="folder", train=part, test=None, num_classes=num_classes, factor_names=[],
        class_names=[p.name for p in class_dirs],
        description={"kind": "folder", "path": str(root.resolve()), "files": len(files)},
    )


def _list_images(root: Path, limit: int | None) -> tuple[list[Path], list[tuple[Path, int]]]:
    """The class directories, and (file, class id) for each image (the first ``limit`` of them)."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: expected one sub-directory per class, found none")
    per_class: list[list[tuple[Path, int]]] = []
    for cls, cdir in enumerate(class_dirs):
        found = sorted(p for p in cdir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith("."))
        if len(found) < 2:
            raise DataError(
                f"{cdir}: class {cls} ('{cdir.name}') has {len(found)} image(s); every class needs at least 2 "
                "to form same-class pairs"
            )
        per_class.append([(p, cls) for p in found])
    if limit is None or limit >= sum(map(len, per_class)):
        return class_dirs, [f for files in per_class for f in files]
    if limit < 2 * len(class_dirs):
        raise DataError(f"{root}: --limit {limit} leaves some of its {len(class_dirs)} classes fewer than the 2 images "
                        f"a same-class pair needs; use --limit {2 * len(class_dirs)} or more")
    # Taken class by class in turn, so every class keeps its share: the first `limit` files would drop whole classes.
    taken = [f for round_ in itertools.zip_longest(*per_class) for f in round_ if f is not None][:limit]
    return class_dirs, sorted(taken, key=lambda f: (f[1], f[0]))


def _decode_images(paths: list[Path]) -> np.ndarray:
    """uint8 [N, C, H, W]: grey (C=1) unless some image has colour (C=3); all must have one size."""
    from PIL import Image, UnidentifiedImageError  # lazy: `disent --help` lists every source, this one too

    decoded: list[Any] = []
    size: tuple[int, int] | None = None
    first: Path | None = None
    colour = False
    for path in paths:
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
    if size is not None and (size[0] != size[1] or size[0] not in IMAGE_SIZES):
        sides = ", ".join(f"{s}x{s}" for s in IMAGE_SIZES)
        raise DataError(f"{first}: the images are {size[0]}x{size[1]}, but the model takes square images of {sides}; "
                        f"resize them to one of these before prepare (e.g. ImageMagick: mogrify -resize 32x32! *.png)")
    channels = 3 if colour else 1
    h, w = size[1], size[0]  # type: ignore[index]
    images = np.empty((len(decoded), channels, h, w), np.uint8)
    for i, im in enumerate(decoded):
        arr = np.asarray(im.convert("RGB" if colour else "L"), dtype=np.uint8)
        images[i] = arr.transpose(2, 0, 1) if colour else arr[None]
    return images


def _palette_is_grey(im) -> bool:
    rgb = im.convert("RGB")
    return _is_grey_rgb(rgb)


def _is_grey_rgb(im) -> bool:
    arr = np.asarray(im)
    return bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())
