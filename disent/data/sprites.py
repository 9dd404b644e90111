"""Procedural sprites: shape classes drawn with known nuisance factors.

Each sample is one filled shape on a black background. The class is the shape; the factors
(stored per sample, in this order) are

    x, y       centre position as a fraction of the image width/height (0.38 .. 0.62)
    scale      size relative to the largest shape that fits (0.6 .. 1.0)
    rotation   angle in turns (0 .. 0.1, up to 36 degrees)
    hue        colour hue (0 .. 1) at full saturation and value
    
Generation is deterministic in (seed, index): sample i is the same whatever ``num_samples``,
so sets of different sizes share their prefix. Shapes are drawn at 4x and box-filtered down
for anti-aliasing.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ["square", "circle", "triangle", "cross", "star"]
FACTOR_NAMES = ["x", "y", "scale", "rotation", "hue"]
FACTOR_RANGES = {"x": (0.38, 0.62), "y": (0.38, 0.62), "scale": (0.6, 1.0), "rotation": (0.0, 0.1), "hue": (0.0, 1.0)}
_SUPERSAMPLE = 4


def _unit_shape(name: str) -> np.ndarray:
    """Polygon vertices (V, 2) inside the unit circle, centred on 0."""
    if name == "square":
        a = np.arange(4) * (math.pi / 2) + math.pi / 4
        return np.stack([np.cos(a), np.sin(a)], 1) * 0.95
    if name == "circle":
        a = np.arange(32) * (2 * math.pi / 32)
        return np.stack([np.cos(a), np.sin(a)], 1) * 0.8
    if name == "triangle":
        a = np.arange(3) * (2 * math.pi / 3) - math.pi / 2
        return np.stack([np.cos(a), np.sin(a)], 1)
    if name == "cross":
        w = 0.33
        pts = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        return np.array(pts, dtype=np.float64) * 0.85
    if name == "star":
        a = np.arange(10) * (math.pi / 5) - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([np.cos(a) * r, np.sin(a) * r], 1)
    raise ValueError(f"unknown sprite shape {name!r}")


_SHAPES = {name: _unit_shape(name) for name in CLASS_NAMES}


def sample_factors(seed: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels int64 [count] and factors float32 [count, 5] for samples start .. start+count-1."""
    labels = np.empty(count, np.int64)
    factors = np.empty((count, len(FACTOR_NAMES)), np.float32)
    # One generator per block of 1024 indices keeps sample i independent of num_samples.
    block = 1024
    i = 0
    while i < count:
        index = start + i
        b, off = divmod(index, block)
        rng = np.random.default_rng([seed, b])
        lab = rng.integers(0, len(CLASS_NAMES), size=block)
        lows = np.array([FACTOR_RANGES[n][0] for n in FACTOR_NAMES])
        highs = np.array([FACTOR_RANGES[n][1] for n in FACTOR_NAMES])
        fac = rng.uniform(lows, highs, size=(block, len(FACTOR_NAMES)))
        take = min(block - off, count - i)
        labels[i:i + take] = lab[off:off + take]
        factors[i:i + take] = fac[off:off + take]
        i += take
    return labels, factors


def render(label: int, factors: np.ndarray, image_size: int = 32) -> np.ndarray:
    """One sprite as uint8 [3, H, W]."""
    x, y, scale, rotation, hue = (float(v) for v in factors)
    big = image_size * _SUPERSAMPLE
    # The largest shape just fits at the extreme positions; shapes fill much of the frame, so the
    # class (the outline) is worth enough pixels to be learned in minutes on a CPU. Rotation stays
    # within 36 degrees for the same reason: over full turns, a model that has not yet pinned the
    # angle down minimises its loss by drawing the average over angles, a round blob (docs/results/sprites_tuning.md).
    radius = 0.38 * big * scale
    angle = rotation * 2 * math.pi
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = _SHAPES[CLASS_NAMES[label]] @ rot.T * radius + np.array([x * big, y * big])
    colour = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, 1.0, 1.0))
    img = Image.new("RGB", (big, big))
    ImageDraw.Draw(img).polygon([tuple(p) for p in pts.tolist()], fill=colour)
    small = img.reduce(_SUPERSAMPLE)
    return np.asarray(small, dtype=np.uint8).transpose(2, 0, 1).copy()


def generate(num_samples: int, seed: int = 0, image_size: int = 32, start: int = 0):
    """(images uint8 [N,3,H,W], labels int64 [N], factors float32 [N,5])."""
    if image_size not in (32, 64):
        raise ValueError(f"sprites image size must be 32 or 64, got {image_size}")
    labels, factors = sample_factors(seed, start, num_samples)
    images = np.empty((num_samples, 3, image_size, image_size), np.uint8)
    for i in range(num_samples):
        images[i] = render(int(labels[i]), factors[i], image_size)
    return images, labels, factors
