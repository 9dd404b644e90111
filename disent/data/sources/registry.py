"""The registry of source kinds and the parts every kind builds: what a source module imports (see the package's
docstring, "Adding a source")."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from disent.data.errors import DataError


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


# --------------------------------------------------------------------------- checks shared by the sources


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


def resolve_classes(parts: list[Part], given: int | None) -> int:
    """The number of classes: ``given`` (--num-classes) or max label + 1; negative labels are refused."""
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


def limit_part(part: Part, limit: int | None) -> Part:
    """The first ``limit`` samples of ``part`` (--limit); all of it when limit is None."""
    if limit is None or limit >= len(part.labels):
        return part
    return Part(part.images[:limit], part.labels[:limit], part.factors[:limit], part.origin)


def check_drawn(opts: SourceOptions, kind: str, classes: int) -> None:
    """A drawn source (sprites, glyphs) needs two samples per class for pairs, and a supported size."""
    if opts.num_samples < 2 * classes:
        raise DataError(f"--num-samples must be at least {2 * classes} for {kind}, got {opts.num_samples}")
    if opts.image_size not in (32, 64):
        raise DataError(f"--image-size for {kind} must be 32 or 64, got {opts.image_size}")


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class SourceKind:
    """One registered kind of source."""

    kind: str
    load: Callable[..., SourceData]  # load(path, opts); load(opts) when the kind takes no path
    syntax: str  # how SOURCE names it: "idx:DIR", or just "sprites" for a kind that takes no path
    help: str  # for `disent prepare --help`: one line (or a few, split by newlines)
    claims: Callable[[Path], bool] | None = None  # does a plain path on the command line mean this kind?
    claims_help: str = ""  # what such a path is, for --help ("a .npz file")

    @property
    def takes_path(self) -> bool:
        return ":" in self.syntax


SOURCES: dict[str, SourceKind] = {}  # kind -> SourceKind, in registration order


def register_source(kind: str, *, syntax: str | None = None, help: str,
                    claims: Callable[[Path], bool] | None = None, claims_help: str = ""):
    """Decorator: register the decorated loader as source ``kind`` (see the module docstring)."""
    syntax = syntax or kind
    if ":" in kind or syntax.partition(":")[0] != kind:
        raise ValueError(f"source kind {kind!r}: the syntax must be {kind!r} or '{kind}:PATH', got {syntax!r}")

    def decorate(load: Callable[..., SourceData]) -> Callable[..., SourceData]:
        if kind in SOURCES:
            raise ValueError(f"source kind {kind!r} is registered twice ({SOURCES[kind].load.__module__}, "
                             f"{load.__module__})")
        SOURCES[kind] = SourceKind(kind, load, syntax, help, claims, claims_help)
        return load

    return decorate


def source_syntaxes() -> str:
    """'idx:DIR, folder:DIR, npz:FILE, sprites or glyphs': every kind, for messages and --help."""
    names = [s.syntax for s in SOURCES.values()]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def parse_source(spec: str) -> tuple[str, str]:
    """``kind:path`` -> (kind, path); a plain path is auto-detected where unambiguous."""
    head, sep, rest = spec.partition(":")
    if sep and head in SOURCES:
        if SOURCES[head].takes_path and not rest:
            raise DataError(f"source {spec!r}: give a path after '{head}:'")
        return head, rest
    if spec in SOURCES and not SOURCES[spec].takes_path:
        return spec, ""
    path = Path(spec)
    for source in SOURCES.values():
        if source.claims is not None and source.claims(path):
            return source.kind, spec
    if not path.exists():
        raise DataError(f"source {spec!r} does not exist; use {source_syntaxes()}")
    raise DataError(f"cannot tell what kind of source {spec!r} is; write {source_syntaxes()}")


def load_source(spec: str, opts: SourceOptions) -> SourceData:
    kind, path = parse_source(spec)
    source = SOURCES[kind]
    return source.load(path, opts) if source.takes_path else source.load(opts)
