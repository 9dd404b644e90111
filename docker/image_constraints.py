"""docker/constraints.txt, the versions the image installs besides torch: `make constraints` runs this.

It does what the Dockerfile does, resolved but not installed: in a fresh venv of the image's Python (3.12: Ubuntu
24.04's python3 in the CUDA base, python:3.12-slim for a CPU build), `pip install --dry-run --report` of the
Dockerfile's TORCH_SPEC together with the project, from PyPI only (no local find-links, mirrors or pip config: the
build sees none of them). Every distribution in the answer is pinned, except torch and torch's own dependencies:
those come from the Dockerfile's torch line, from TORCH_INDEX_URL (a CUDA or a CPU build, each with its own set),
so pinning them would fight that index. PyPI's Linux torch is the CUDA build, whose dependencies include the CPU
build's, so the set left out covers both. It is written into the file's header, and the tests read it there.

The Dockerfile itself is read here too (ARG defaults, pip lines, COPY lines): tests/unit/test_image.py and
tests/integration/test_image.py check the image against the manifest and the constraints with these readers.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
IMAGE_PYTHON = "3.12"
PYPI = "https://pypi.org/simple"
PROJECT = "disent-adversarial"
# pip settings of this machine that a Docker build does not have and that would change what resolves.
LOCAL_PIP_SETTINGS = ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX",
                      "PIP_REQUIRE_VIRTUALENV", "PIP_USER", "PIP_TARGET", "PIP_PREFIX")


# --------------------------------------------------------------------------- reading the Dockerfile


def instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text() if text is None else text
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), " ".join(rest.split())))
    return found


def build_args(text: str | None = None) -> dict[str, str]:
    """The ARG defaults (`ARG NAME=value`, quotes removed)."""
    args = {}
    for word, rest in instructions(text):
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = shlex.split(value)[0]
    return args


def pip_lines(text: str | None = None, **overrides: str) -> list[list[str]]:
    """The RUN lines' `pip install ...` commands as argv, build args substituted (defaults, or `overrides` as
    `--build-arg` gives them), each with the WORKDIR it runs in as its first element."""
    args = {**build_args(text), **overrides}
    workdir, found = "/", []
    for word, rest in instructions(text):
        if word == "WORKDIR":
            workdir = rest
        if word != "RUN":
            continue
        for part in re.split(r"&&|;", rest):
            part = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], part).strip()
            if part.startswith("pip install"):
                found.append([workdir, *shlex.split(part)])
    return found


def copies(text: str | None = None) -> list[tuple[list[str], str]]:
    """The COPY lines in order: ([sources], destination as written, made absolute with the WORKDIR then)."""
    wd, found = "/", []
    for word, rest in instructions(text):
        if word == "WORKDIR":
            wd = rest
        elif word == "COPY":
            *sources, dest = rest.split()
            found.append((sources, os.path.normpath(os.path.join(wd, dest))))
    return found


def stage(dest: Path, pip_line: int, skip: tuple[Path, ...] = ()) -> Path:
    """What the image holds when its `pip_line`-th pip command runs, copied under `dest` (the image's / there)
    from this checkout by the COPY lines before it, but `skip`; returns that command's WORKDIR under `dest`."""
    wd, seen = "/", 0
    for word, rest in instructions():
        if word == "WORKDIR":
            wd = rest
        elif word == "COPY":
            *sources, target = rest.split()
            to = dest / os.path.join(wd, target).lstrip("/")
            into_dir = target.endswith("/") or len(sources) > 1
            for source in (s for s in sources if ROOT / s not in skip):
                copy_in(ROOT / source, to / Path(source).name if into_dir and (ROOT / source).is_file() else to)
        elif word == "RUN":
            seen += rest.count("pip install")
            if seen > pip_line:
                return dest / wd.lstrip("/")
    raise ValueError(f"the Dockerfile has no pip line {pip_line}")


def copy_in(source: Path, to: Path) -> None:
    if source.is_dir():  # COPY copies a directory's contents, as .dockerignore leaves them
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        shutil.copytree(source, to, dirs_exist_ok=True, ignore=ignore)
    else:
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, to)


def unconstrained(argv: list[str]) -> list[str]:
    """A pip line's `pip install` arguments without its constraints (`-c FILE`): what it asks for."""
    args, rest = [], iter(argv[2:])
    for arg in rest:
        if arg in ("-c", "--constraint"):
            next(rest)
        elif not arg.startswith(("-c", "--constraint=")):
            args.append(arg)
    return args


def workdir(text: str | None = None) -> str:
    return [rest for word, rest in instructions(text) if word == "WORKDIR"][-1]


# --------------------------------------------------------------------------- the constraints file


def read_constraints(path: Path = CONSTRAINTS) -> tuple[dict[str, str], dict[str, str]]:
    """(pins {canonical name: version}, header fields {"python": ..., "torch": ..., "left to the torch line": ...})."""
    pins, header = {}, {}
    for line in path.read_text().splitlines():
        if line.startswith("# ") and ": " in line:
            key, value = line[2:].split(": ", 1)
            header[key] = value
        elif line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins, header


def torch_closure(report: dict, root: str = "torch") -> set[str]:
    """The distributions in a pip report that `root` pulls in, itself included: its Requires-Dist followed with the
    markers evaluated for the report's environment, extras included (torch asks for cuda-toolkit[cublas,...])."""
    dists = {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in report["install"]}
    env = report["environment"]
    todo, seen = [(canonicalize_name(root), frozenset())], set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen or name not in dists:
            continue
        seen.add((name, extras))
        for text in dists[name].get("requires_dist", []):
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in {"", *extras}):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return {name for name, _ in seen}


def pip_env() -> dict[str, str]:
    """This process's environment without the local pip settings: what resolves is what a build resolves."""
    env = {k: v for k, v in os.environ.items() if k not in LOCAL_PIP_SETTINGS}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def find_python(version: str = IMAGE_PYTHON) -> str | None:
    """An interpreter of the image's Python version: pythonX.Y on PATH, else one pyenv installed."""
    home = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for candidate in [shutil.which(f"python{version}"), *sorted(glob.glob(f"{home}/versions/{version}*/bin/python3"))]:
        if candidate and python_version(candidate) == version:
            return candidate
    return None


def python_version(python: str) -> str | None:
    result = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def fresh_venv(python: str, where: Path) -> Path:
    subprocess.run([python, "-m", "venv", str(where)], check=True)
    return where / "bin" / "python"


def resolve(venv_python: Path, args: list[str], report: Path, cwd: Path, index_url: str | None = None) -> dict:
    """`pip install --dry-run --report ARGS` in `cwd`, from `index_url` (else the index ARGS name, else PyPI)."""
    cmd = [str(venv_python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
           *(["--index-url", index_url] if index_url else []), *args]
    result = subprocess.run(cmd, cwd=cwd, env=pip_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{result.stdout}{result.stderr}")
    return json.loads(report.read_text())


def render(report: dict, torch_spec: str, index_url: str) -> str:
    left = torch_closure(report)
    pins = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    lines = [
        "# Generated by `make constraints` (docker/image_constraints.py): do not edit by hand.",
        "# The versions the Dockerfile's `pip install -c docker/constraints.txt .` installs, resolved from",
        f"# {index_url} for the image's Python on linux x86_64, with the Dockerfile's torch.",
        f"# python: {report['environment']['python_version']}",
        f"# torch: {torch_spec}",
        f"# left to the torch line: {' '.join(sorted(left))}",
    ]
    lines += [f"{name}=={pins[name]}" for name in sorted(pins) if name not in left and name != PROJECT]
    return "\n".join(lines) + "\n"


def generate(python: str, index_url: str = PYPI) -> str:
    if python_version(python) != IMAGE_PYTHON:
        raise SystemExit(f"{python} is not Python {IMAGE_PYTHON}, the image's")
    torch_spec = build_args()["TORCH_SPEC"]
    with tempfile.TemporaryDirectory() as tmp:
        venv_python = fresh_venv(python, Path(tmp) / "venv")
        # The project's pip line as the image runs it: in the files the COPY lines put there before it.
        *_, (_, *project_line) = pip_lines()
        app = stage(Path(tmp) / "image", pip_line=len(pip_lines()) - 1, skip=(CONSTRAINTS,))  # not written yet
        report = resolve(venv_python, [torch_spec, *unconstrained(project_line)], Path(tmp) / "report.json", app,
                         index_url)
    return render(report, torch_spec, index_url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", help=f"a Python {IMAGE_PYTHON} interpreter (default: found on PATH or in pyenv)")
    parser.add_argument("--index-url", default=PYPI)
    parser.add_argument("--out", type=Path, default=CONSTRAINTS)
    args = parser.parse_args(argv)
    python = args.python or find_python()
    if python is None:
        print(f"no Python {IMAGE_PYTHON} found: give one with --python (make constraints IMAGE_PYTHON=...)",
              file=sys.stderr)
        return 2
    args.out.write_text(generate(python, args.index_url))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
