"""The dependency direction of docs/architecture.md, checked on every import in the product code
(module level and inside functions), the length of every function and of every module:

    errors, host, io, signals, process_group, logs -> models -> config -> data -> checkpoint, tracking, api -> eval -> train
    -> cli, demo, sweep, __main__

A module may import its own layer and the layers to its left, and no modules import each other in a circle
(within a layer too). Imports count wherever they are (module level or inside a function), dynamic ones
(`importlib.import_module`) where their names can be read from the source (a literal, a module-level tuple
of literals looped over, an f-string of those and `__name__`); imports under `if TYPE_CHECKING:` never run
and do not count. `launcher/` imports only `disent.errors` and `disent.host` (so it starts without torch),
and nothing in `disent/` imports `launcher`. No function in either is longer than 60 lines unless its
docstring says why ("long because ...").
Imports go at the top of a module: inside a function only in a command module (cli.py, commands.py, __main__.py)
or with `# lazy: <reason>` on the import's line or the line above.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = [
    {"errors", "host", "io", "signals", "process_group", "logs"},
    {"models"},
    {"config"},
    {"data"},
    {"checkpoint", "tracking", "api"},
    {"eval"},
    {"train"},
    {"cli", "demo", "sweep", "__main__"},
]
LAUNCHER_MAY_IMPORT = {"disent", "disent.errors", "disent.host"}


def layer_of(module: str) -> int:
    """disent.data.stream -> the index of the layer holding `data`."""
    part = module.split(".")[1]
    for index, names in enumerate(LAYERS):
        if part in names:
            return index
    raise AssertionError(f"{module} is in no layer of tests/unit/test_architecture.py; add `{part}` to one")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(base: str, name: str) -> str:
    """`from disent.data import stream` imports the module disent.data.stream; `from disent.config
    import Config` imports disent.config."""
    candidate = ROOT / base.replace(".", "/") / name
    return f"{base}.{name}" if candidate.with_suffix(".py").is_file() or candidate.is_dir() else base


def _runs(tree: ast.AST):
    """Every node of the tree except those under `if TYPE_CHECKING:` (type-only imports never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for branch in node.orelse:
                yield branch
                yield from _runs(branch)
            continue
        yield node
        yield from _runs(node)


def _string_tuples(tree: ast.Module) -> dict[str, list[str]]:
    """Module-level NAME = ("a", "b", ...) (annotated or not): what a dynamic import may loop over."""
    found = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, (ast.Tuple, ast.List)) and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts):
            found[target.id] = [e.value for e in value.elts]
    return found


def _named_strings(expr: ast.AST, names: dict[str, list[str]]) -> list[str]:
    """The strings `expr` can be, when the source says: a literal, a name bound to known strings, an f-string of
    those; [] when it cannot be read from the source."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return [expr.value]
    if isinstance(expr, ast.Name):
        return names.get(expr.id, [])
    if isinstance(expr, ast.JoinedStr):
        results = [""]
        for part in expr.values:
            options = _named_strings(part.value if isinstance(part, ast.FormattedValue) else part, names)
            if not options:
                return []
            results = [r + o for r in results for o in options]
        return results
    return []


def dynamic_imports(tree: ast.Module, module: str) -> list[tuple[int, str]]:
    """(line, module name) of each `importlib.import_module(...)` whose argument can be named from the source."""
    names = {"__name__": [module]}
    tuples = _string_tuples(tree)
    for node in _runs(tree):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Name):
            names[node.target.id] = tuples.get(node.iter.id, [])
    found = []
    for node in _runs(tree):
        if isinstance(node, ast.Call) and node.args and ast.unparse(node.func).split(".")[-1] == "import_module":
            found += [(node.lineno, name) for name in _named_strings(node.args[0], names)]
    return found


def imports(source: str, package: str, module: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import of disent or launcher in `source`, a module of `package`
    (named `module`: the package itself for an __init__), dynamic ones included where they can be named."""
    tree = ast.parse(source)
    found = dynamic_imports(tree, module or package)
    for node in _runs(tree):
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
    for line, target in imports(source, package, module):
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
    dynamic = 'import importlib\nMODS = ("disent.train.trainer",)\nfor m in MODS:\n    importlib.import_module(m)\n'
    assert upward_imports("disent.models.objective", dynamic)
    assert upward_imports("disent.models", 'import importlib\nfor n in ("a",):\n    pass\n'
                          'NAMES = ("trainer",)\nfor n in NAMES:\n    importlib.import_module(f"disent.train.{n}")\n',
                          is_package=True)
    assert not upward_imports("disent.models.objective",
                              "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from disent.train import trainer\n")


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """Module -> the product modules it imports (a name that is not a module counts as its nearest package)."""
    modules = {module_name(p): p for p in paths}
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for _, target in imports(path.read_text(), package, module):
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other in a circle (strongly connected, more than one module)."""
    order, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in order:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return found


def test_no_modules_import_each_other_in_a_circle():
    found = circles(import_graph(PRODUCT + LAUNCHER))
    assert not found, "modules that import each other (move what both need into a module of its own):\n" + "\n".join(
        " <-> ".join(group) for group in found)


def test_the_circle_check_finds_a_circle_inside_a_layer():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


MAX_FUNCTION_LINES = 60
LONG_REASON = "long because"  # a longer function says why in its docstring, in these words


def long_functions(source: str, where: str) -> list[str]:
    """Functions (and methods) of more than MAX_FUNCTION_LINES lines whose docstring gives no reason."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            reason = LONG_REASON in (ast.get_docstring(node) or "").lower()
            if lines > MAX_FUNCTION_LINES and not reason:
                found.append(f"{where}:{node.lineno} {node.name} is {lines} lines (over {MAX_FUNCTION_LINES}; split "
                             f"it, or say why it is not in its docstring: '{LONG_REASON} ...')")
    return found


@pytest.mark.parametrize("path", PRODUCT + LAUNCHER, ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_are_short_or_say_why_not(path):
    found = long_functions(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "\n".join(found)


def test_the_length_check_catches_a_long_function_and_accepts_a_reason():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}", "m.py")
    assert not long_functions(f'def f():\n    """Long because it is a table."""\n{body}', "m.py")


MAX_MODULE_LINES = 400


@pytest.mark.parametrize("path", PRODUCT + LAUNCHER, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_do_one_job_within_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by job (docs/architecture.md)"


COMMAND_MODULES = {"cli.py", "commands.py", "__main__.py"}
LAZY = "# lazy:"


def unexplained_function_imports(source: str, where: str) -> list[str]:
    """The imports inside functions of a module that is no command module, and that carry no `# lazy:` reason."""
    if Path(where).name in COMMAND_MODULES:
        return []
    lines = ["", *source.splitlines()]
    found = set()
    for function in ast.walk(ast.parse(source)):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                line = getattr(node, "lineno", 0)
                if isinstance(node, (ast.Import, ast.ImportFrom)) and LAZY not in lines[line] and not (
                        lines[line - 1].strip().startswith(LAZY)):
                    found.add(f"{where}:{line} imports inside {function.name}(): move `{lines[line].strip()}` to the "
                              f"top of the module, or say why it cannot be there ({LAZY} <reason>)")
    return sorted(found)


@pytest.mark.parametrize("path", PRODUCT + LAUNCHER, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_are_at_the_top_unless_a_command_runs_them_or_a_reason_is_given(path):
    found = unexplained_function_imports(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "\n".join(found)


def test_the_import_check_catches_an_unexplained_import_in_a_function():
    assert unexplained_function_imports("def f():\n    import torch\n", "disent/data/stream.py")
    assert unexplained_function_imports("class A:\n    def f(self):\n        from x import y\n", "disent/m.py")
    assert not unexplained_function_imports("import torch\n\ndef f():\n    pass\n", "disent/data/stream.py")
    assert not unexplained_function_imports("def f():\n    import torch  # lazy: why\n", "disent/data/stream.py")
    assert not unexplained_function_imports("def f():\n    # lazy: why\n    import torch\n", "disent/data/stream.py")
    assert not unexplained_function_imports("def f():\n    import torch\n", "disent/train/commands.py")
