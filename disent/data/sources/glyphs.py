"""``glyphs``: the 26 capitals rendered from real typefaces by :mod:`disent.data.glyphs`."""
from __future__ import annotations

from disent.data.sources.registry import Part, SourceData, SourceOptions, check_drawn, check_part, register_source


@register_source(
    "glyphs",
    help="the 26 capitals rendered from real typefaces (Debian's fonts-urw-base35, or\n"
    "--fonts DIR|GLOB) with known factors (font, size, rotation, x, y)",
)
def load_glyphs(opts: SourceOptions) -> SourceData:
    from disent.data import glyphs  # lazy: `disent --help` lists every source; the renderer loads PIL and tqdm

    classes = len(glyphs.CHARACTERS)
    check_drawn(opts, "glyphs", classes)
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
