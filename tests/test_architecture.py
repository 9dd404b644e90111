"""The dependency direction of docs/architecture.md, checked on every import in the product code
(module level and inside functions):

    errors, host, io -> models -> config -> data -> checkpoint, tracking -> eval -> train -> cli, demo

A module may import its own layer and the layers to its left. `launcher/` imports only
`disent.errors` and `disent.host` (so it starts without torch), and nothing in `disent/` imports
`launcher`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    {"errors", "host", "io"},
    {"models"},
    {"config"},
    {"data"},
    {"checkpoint", "tracking"},
    {"eval"},
    {"train"},
    {"cli", "demo"},
]
LAUNCHER_MAY_IMPORT = {"disent", "disent.errors", "disent.host"}


def layer_of(module: str) -> int:
    """disent.data.stream -> the index of the layer holding `data`."""
    part = module.split(".")[1]
    for index, names in enumerate(LAYERS):
        if part in names:
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py; add `{part}` to one")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(base: str, name: str) -> str:
    """`from disent.data import stream` imports the module disent.data.stream; `from disent.config
    import Config` imports disent.config."""
    candidate = ROOT / base.replace(".", "/") / name
    return f"{base}.{name}" if candidate.with_suffix(".py").is_file() or candidate.is_dir() else base


def imports(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import of disent or launcher in `source`, a module of `package`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, resolve(base, alias.name)) for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] in ("disent", "launcher")]


def upward_imports(module: str, source: str, is_package: bool = False) -> list[str]:
    """The imports in `source` (module `module`; a package's __init__ when is_package) that break the order."""
    package = module if is_package else module.rpartition(".")[0]
    wrong = []
    for line, target in imports(source, package):
        if target.split(".")[0] == "launcher":
            wrong.append(f"{module}:{line} imports {target}: disent never imports the launcher")
        elif target != "disent" and layer_of(target) > layer_of(module):
            wrong.append(f"{module}:{line} imports {target}, a layer above it")
    return wrong


PRODUCT = sorted((ROOT / "disent").rglob("*.py"))
LAUNCHER = sorted((ROOT / "launcher").rglob("*.py"))


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: str(p.relative_to(ROOT)))
def test_disent_imports_only_its_own_layer_and_those_below(path):
    module = module_name(path)
    if module == "disent":
        return
    wrong = upward_imports(module, path.read_text(), is_package=path.name == "__init__.py")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: str(p.relative_to(ROOT)))
def test_launcher_imports_only_the_torch_free_base_of_disent(path):
    wrong = [f"{path.name}:{line} imports {target}" for line, target in imports(path.read_text(), "launcher")
             if target.startswith("disent") and target not in LAUNCHER_MAY_IMPORT]
    assert not wrong, "\n".join(wrong)


def test_the_check_catches_an_upward_import_and_a_launcher_import():
    assert upward_imports("disent.models.objective", "def f():\n    from disent.train.trainer import Trainer\n")
    assert upward_imports("disent.data.stream", "from launcher.topology import Topology\n")
    assert upward_imports("disent.checkpoint", "from .eval import evaluate\n")
    assert not upward_imports("disent.checkpoint", "from disent.io.storage import write_bytes_atomic\n")
