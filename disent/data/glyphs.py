"""Glyphs: characters rendered from real typefaces, a style/content set whose answer people know.

The class is the character (the 26 capitals); the style factors, stored per sample in this order:

    font       index into the manifest's font list (categorical)
    size       font size as a fraction of the image height (0.6 .. 0.9)
    rotation   degrees (-10 .. 10)
    x, y       glyph centre as a fraction of the image width/height (0.42 .. 0.58)

A disentangled model reads the character from s and not from the mean of z, and the font from z
and not from s; its swap grid shows "this letter in that font". The faces default to Debian's
fonts-urw-base35 (the 33 URW text faces: serif, sans, narrow, mono, gothic, Bookman, the Z003
script, each with its bold and italic cuts); `--fonts DIR|GLOB` picks others. A face that lacks
one of the characters (a symbol or dingbat font) is left out, and each kept file is recorded in the
manifest with the Debian package it comes from.

Generation is deterministic in (seed, index), as for sprites; glyphs are drawn at 4x and
box-filtered down for anti-aliasing.
"""
from __future__ import annotations

import glob
import os
import string
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from disent.data.errors import DataError

CHARACTERS = string.ascii_uppercase
FACTOR_NAMES = ["font", "size", "rotation", "x", "y"]
CATEGORICAL_FACTORS = ["font"]
FACTOR_RANGES = {"size": (0.6, 0.9), "rotation": (-10.0, 10.0), "x": (0.42, 0.58), "y": (0.42, 0.58)}
DEFAULT_FONTS = "/usr/share/fonts/opentype/urw-base35"
# The package's two symbol faces map A-Z to Greek letters and dingbats: real glyphs, wrong characters.
DEFAULT_SYMBOL_FACES = ("StandardSymbolsPS", "D050000L")
FONT_SUFFIXES = (".otf", ".ttf", ".ttc")
_SUPERSAMPLE = 4
_MISSING = "\uffff"  # a noncharacter: every face draws its .notdef box for it


@dataclass(frozen=True)
class Face:
    path: str
    package: str | None  # the Debian package that installed the file, if any


def find_fonts(spec: str | None) -> list[Path]:
    """Font files named by a directory (searched recursively) or a glob, sorted by path."""
    spec = spec or DEFAULT_FONTS
    path = Path(spec)
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.suffix.lower() in FONT_SUFFIXES]
    elif any(ch in spec for ch in "*?["):
        found = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).suffix.lower() in FONT_SUFFIXES]
    elif path.is_file():
        found = [path]
    else:
        hint = (" Install Debian's fonts-urw-base35 (apt-get install fonts-urw-base35, or `make demo` as root)"
                if spec == DEFAULT_FONTS else "")
        raise DataError(f"--fonts {spec}: no such directory or file, and not a glob.{hint}")
    if not found:
        raise DataError(f"--fonts {spec}: no font files ({', '.join(FONT_SUFFIXES)}) there")
    return sorted(found)


def _ink(font, text: str) -> bytes:
    img = Image.new("L", (64, 64))
    ImageDraw.Draw(img).text((32, 32), text, fill=255, font=font, anchor="mm")
    return img.tobytes()


def _draws_every_character(font) -> bool:
    """Every character drawn with a glyph of its own, not the face's .notdef box."""
    missing = _ink(font, _MISSING)
    return all(_ink(font, ch) not in (missing, bytes(64 * 64)) for ch in CHARACTERS)


def debian_packages(paths: list[Path]) -> dict[str, str]:
    """path -> the Debian package that installed it (dpkg -S); empty where dpkg does not know it."""
    try:
        out = subprocess.run(["dpkg", "-S", *map(str, paths)], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = {}
    for line in out.splitlines():
        package, sep, path = line.partition(": ")
        if sep:
            found[path.strip()] = package.split(":")[0]
    return found


def load_faces(spec: str | None) -> list[Face]:
    """The usable faces of --fonts: each draws all of CHARACTERS; at least two, so font is a factor."""
    paths = find_fonts(spec)
    if spec in (None, DEFAULT_FONTS):
        paths = [p for p in paths if p.stem not in DEFAULT_SYMBOL_FACES]
    usable, refused = [], []
    for path in paths:
        try:
            font = ImageFont.truetype(str(path), 32)
        except OSError as exc:
            refused.append(f"{path.name} ({exc})")
            continue
        if _draws_every_character(font):
            usable.append(path)
        else:
            refused.append(f"{path.name} (lacks some of {CHARACTERS[0]}-{CHARACTERS[-1]})")
    if len(usable) < 2:
        raise DataError(f"--fonts {spec or DEFAULT_FONTS}: {len(usable)} usable face(s) among {len(paths)} file(s); "
                        f"glyphs needs at least 2 that draw every character {CHARACTERS[0]}-{CHARACTERS[-1]}"
                        + (f"; left out: {', '.join(map(str, refused[:5]))}" if refused else ""))
    packages = debian_packages(usable)
    return [Face(str(p), packages.get(str(p))) for p in usable]


def sample_factors(seed: int, start: int, count: int, num_fonts: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels int64 [count] and factors float32 [count, 5] for samples start .. start+count-1; one
    generator per block of 1024 indices keeps sample i independent of count."""
    labels = np.empty(count, np.int64)
    factors = np.empty((count, len(FACTOR_NAMES)), np.float32)
    block, i = 1024, 0
    continuous = FACTOR_NAMES[1:]
    lows = np.array([FACTOR_RANGES[n][0] for n in continuous])
    highs = np.array([FACTOR_RANGES[n][1] for n in continuous])
    while i < count:
        b, off = divmod(start + i, block)
        rng = np.random.default_rng([seed, b, num_fonts])
        lab = rng.integers(0, len(CHARACTERS), size=block)
        font = rng.integers(0, num_fonts, size=block)
        rest = rng.uniform(lows, highs, size=(block, len(continuous)))
        take = min(block - off, count - i)
        labels[i:i + take] = lab[off:off + take]
        factors[i:i + take, 0] = font[off:off + take]
        factors[i:i + take, 1:] = rest[off:off + take]
        i += take
    return labels, factors


class Renderer:
    """Draws glyphs; keeps one loaded font per (face, pixel size)."""

    def __init__(self, faces: list[Face], image_size: int):
        self.faces, self.image_size = faces, image_size
        self._fonts: dict[tuple[int, int], object] = {}

    def _font(self, face: int, pixels: int):
        key = (face, pixels)
        if key not in self._fonts:
            self._fonts[key] = ImageFont.truetype(self.faces[face].path, pixels)
        return self._fonts[key]

    def render(self, label: int, factors: np.ndarray) -> np.ndarray:
        """One glyph as uint8 [1, H, W], white on black."""
        face, size, rotation, x, y = (float(v) for v in factors)
        big = self.image_size * _SUPERSAMPLE
        img = Image.new("L", (big, big))
        font = self._font(int(face), max(4, int(round(size * big))))
        # anchor "mm": the ink's middle at the centre, whatever the face's metrics
        ImageDraw.Draw(img).text((big / 2, big / 2), CHARACTERS[label], fill=255, font=font, anchor="mm")
        img = img.rotate(rotation, resample=Image.BICUBIC, translate=((x - 0.5) * big, (y - 0.5) * big))
        return np.asarray(img.reduce(_SUPERSAMPLE), dtype=np.uint8)[None].copy()


def generate(num_samples: int, faces: list[Face], seed: int = 0, image_size: int = 32, progress: bool = False):
    """(images uint8 [N,1,H,W], labels int64 [N], factors float32 [N,5])."""
    labels, factors = sample_factors(seed, 0, num_samples, len(faces))
    renderer = Renderer(faces, image_size)
    images = np.empty((num_samples, 1, image_size, image_size), np.uint8)
    indices = range(num_samples)
    if progress:
        indices = tqdm(indices, desc="rendering glyphs", unit="glyph", disable=not os.isatty(2))
    for i in indices:
        images[i] = renderer.render(int(labels[i]), factors[i])
    return images, labels, factors
