"""Sources for `disent prepare`: a registry of source kinds, one module per kind.

SOURCE is ``KIND:PATH`` (``idx:DIR``, ``folder:DIR``, ``npz:FILE``) or, for a kind that takes no
path, just ``KIND`` (``sprites``, ``glyphs``; ``sprites:`` also works). A plain path is accepted
where a kind claims it (a ``.npz`` file, a directory holding IDX files, a directory of class
sub-directories); the first kind in registration order that claims it wins.

Each loader returns a :class:`SourceData` whose arrays are already checked: every problem is
reported as a DataError naming the file or the sample index, before any shard is written.

Adding a source
---------------
1. Write one module here, say ``disent/data/sources/mykind.py``, whose loader is registered::

       from disent.data.sources.registry import Part, SourceData, SourceOptions, check_part, register_source

       @register_source("mykind", syntax="mykind:DIR", help="what it reads, one line for --help",
                        claims=_looks_like_mine, claims_help="a directory of my files")  # both optional
       def load_mykind(path: str, opts: SourceOptions) -> SourceData:
           ...  # build Part(s), check_part(...) them, return SourceData(kind="mykind", ...)

   A kind whose ``syntax`` has no ``:PATH`` (like ``sprites``) takes no path: its loader is
   ``load(opts)``. ``claims(path)`` lets a plain path on the command line mean this kind.
2. Add the module's name to ``SOURCE_MODULES`` at the bottom of this file (its position is the
   kind's place in ``disent prepare --help``, in error messages and in plain-path inference).

Nothing else changes: `disent prepare KIND:...`, its help text and the error messages all come
from the registry.
"""
from __future__ import annotations

import importlib

from disent.data.sources.registry import (SOURCES, Part, SourceData, SourceKind, SourceOptions, check_drawn, check_part,
                                          limit_part, load_source, parse_source, register_source, resolve_classes,
                                          source_syntaxes)

# --------------------------------------------------------------------------- the sources

# Importing a module registers its kind. This order (not an import statement a formatter may sort)
# is the order of --help, of the kinds listed in error messages, and of plain-path inference.
SOURCE_MODULES = ("idx", "folder", "npz", "sprites", "glyphs")
for _name in SOURCE_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
del _name

from disent.data.sources.folder import IMAGE_EXTENSIONS, load_folder  # noqa: E402
from disent.data.sources.glyphs import load_glyphs  # noqa: E402
from disent.data.sources.idx import (  # noqa: E402
    FASHION_MNIST_CLASSES,
    default_fashion_mnist_dir,
    ensure_fashion_mnist,
    load_idx,
    read_idx,
)
from disent.data.sources.npz import load_npz  # noqa: E402
from disent.data.sources.sprites import load_sprites  # noqa: E402

__all__ = [
    "FASHION_MNIST_CLASSES", "IMAGE_EXTENSIONS", "SOURCES", "SOURCE_MODULES", "Part", "SourceData", "SourceKind",
    "SourceOptions", "check_drawn", "check_part", "default_fashion_mnist_dir", "ensure_fashion_mnist", "limit_part",
    "load_folder", "load_glyphs", "load_idx", "load_npz", "load_source", "load_sprites", "parse_source", "read_idx",
    "register_source", "resolve_classes", "source_syntaxes",
]
