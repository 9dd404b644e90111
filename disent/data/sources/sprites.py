"""``sprites``: procedural shapes with known factors, drawn by :mod:`disent.data.sprites`."""
from __future__ import annotations

from disent.data.sources.registry import Part, SourceData, SourceOptions, check_drawn, check_part, register_source


@register_source("sprites", help="procedural shapes with known factors (x, y, scale, rotation, hue)")
def load_sprites(opts: SourceOptions) -> SourceData:
    from disent.data import sprites  # lazy: `disent --help` lists every source; the renderer loads PIL

    check_drawn(opts, "sprites", len(sprites.CLASS_NAMES))
    images, labels, factors = sprites.generate(opts.num_samples, opts.seed, opts.image_size)
    part = Part(images, labels, factors, f"sprites(seed={opts.seed})")
    check_part(part, len(sprites.CLASS_NAMES), "the generated sprites (use more --num-samples)")
    return SourceData(
        kind="sprites", train=part, test=None, num_classes=len(sprites.CLASS_NAMES),
        factor_names=list(sprites.FACTOR_NAMES), class_names=list(sprites.CLASS_NAMES),
        description={"kind": "sprites", "num_samples": opts.num_samples, "image_size": opts.image_size,
                     "seed": opts.seed, "factor_ranges": {k: list(v) for k, v in sprites.FACTOR_RANGES.items()}},
    )
