"""`disent prepare SOURCE OUT`: turn a data source into pre-grouped WebDataset shards."""
from __future__ import annotations

import argparse
import textwrap

from disent.data.sources import SOURCES, SourceOptions, source_syntaxes

_OUT_HELP = """\
OUT is a directory or s3://bucket/prefix; OUT/<split>/manifest.json and
OUT/<split>/shard-NNNNNN.tar are written for the splits train, val and test.
"""


def source_help() -> str:
    """The epilog of `disent prepare --help`: every registered source (disent.data.sources) with its help."""
    width = max([12, *(len(s.syntax) for s in SOURCES.values())])
    lines = ["SOURCE is one of"]
    for source in SOURCES.values():
        first, *more = source.help.splitlines()
        lines.append(f"  {source.syntax:<{width}} {first}")
        lines.extend(" " * (width + 3) + line for line in more)
    plain = [s.claims_help for s in SOURCES.values() if s.claims is not None and s.claims_help]
    if plain:
        listed = plain[0] if len(plain) == 1 else f"{', '.join(plain[:-1])} or {plain[-1]}"
        lines.append(textwrap.fill(f"A plain path is accepted where the kind is clear ({listed}).", width=94))
    return "\n".join(lines) + "\n" + _OUT_HELP


def register(subparsers, add_config_args) -> None:  # noqa: ARG001 - prepare takes no config
    p = subparsers.add_parser(
        "prepare", help="turn a data source into pre-grouped WebDataset shards (local or s3://)",
        description="Write same-class groups of samples into shuffled WebDataset shards plus a manifest per "
        "split. All input checks run before the first shard is written.",
        epilog=source_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help=source_syntaxes())
    p.add_argument("out", metavar="OUT", help="output directory or s3://bucket/prefix")
    p.add_argument("--group-size", type=int, default=256, metavar="K",
                   help="same-class samples per record (default 256: few large tar members read fast)")
    p.add_argument("--groups-per-shard", type=int, default=8, metavar="N", help="records per shard (default 8)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of each class moved from train to val (default 0.1; 0: no val split)")
    p.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of each class moved from train to test when the source has no test set "
                   "(default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seeds splitting, grouping, shuffling and sprites (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace data already prepared in OUT (its manifests are removed first)")
    p.add_argument("--num-classes", type=int, default=None, metavar="K",
                   help="idx/npz: the number of classes (labels must lie in 0..K-1); default: max label + 1")
    p.add_argument("--num-samples", type=int, default=20000, metavar="N",
                   help="sprites, glyphs: samples to draw (default 20000)")
    p.add_argument("--image-size", type=int, default=32, choices=(32, 64), help="sprites, glyphs: image size (default 32)")
    p.add_argument("--fonts", metavar="DIR|GLOB", default=None,
                   help="glyphs: the font files to render (default: Debian's fonts-urw-base35 faces)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use at most N samples of each source part (quick trials)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from disent.data.prepare import PrepareOptions, prepare

    opts = PrepareOptions(
        group_size=args.group_size, groups_per_shard=args.groups_per_shard, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, seed=args.seed, overwrite=args.overwrite, progress=not args.no_progress,
    )
    source_opts = SourceOptions(num_classes=args.num_classes, num_samples=args.num_samples,
                                image_size=args.image_size, seed=args.seed, limit=args.limit, fonts=args.fonts)
    prepare(args.source, args.out, opts, source_opts)
    return 0
