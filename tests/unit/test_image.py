"""The image k8s/job.yaml runs, read without a Docker engine: the Dockerfile's torch agrees with pyproject, its pip
lines install under docker/constraints.txt, the manifest runs what the image holds, the Makefile tags the version
and kustomize sets the image without an edit of the manifest. That the constraints resolve from PyPI as the
Dockerfile's pip lines run them: tests/integration/test_image.py."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import disent
from tests.support.k8s import container, documents
from tests.support.train_helpers import ROOT

sys.path.insert(0, str(ROOT / "docker"))

import image_constraints as ic  # noqa: E402

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
KUSTOMIZATION = ROOT / "k8s" / "kustomization.yaml"


def requirements() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, PROJECT["dependencies"])}


# --------------------------------------------------------------------------- torch and the constraints


def test_the_images_torch_is_one_release_pyproject_admits_and_the_tests_run():
    spec = Requirement(ic.build_args()["TORCH_SPEC"])
    (pin,) = spec.specifier
    assert spec.name == "torch" and pin.operator == "==", "TORCH_SPEC pins one release: the image is reproducible"
    assert pin.version in requirements()["torch"].specifier
    make_spec = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert make_spec == str(spec), "the image's torch is the one `make test` runs"
    assert ic.read_constraints()[1]["torch"] == str(spec), "docker/constraints.txt was resolved with another torch"


def test_the_constraints_pin_every_dependency_inside_pyprojects_ranges_and_leave_torch_to_its_index():
    pins, header = ic.read_constraints()
    left = set(header["left to the torch line"].split())
    assert header["python"] == ic.IMAGE_PYTHON
    assert {"torch", "triton", "sympy", "typing-extensions"} <= left and not left & set(pins)
    assert not {name for name in pins if name.startswith(("nvidia-", "cuda-"))}
    assert ic.PROJECT not in pins
    for name, req in requirements().items():
        if name != "torch":
            assert name in pins, f"{name}: pyproject needs it, the constraints miss it (make constraints)"
            assert pins[name] in req.specifier, f"{name}=={pins[name]} is outside pyproject's {req.specifier}"
    # One pin per line, as pip reads a constraints file.
    lines = [line for line in ic.CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==[\w.!+]+", line) for line in lines), lines
    assert len(lines) == len(pins) == len({line.split("==")[0] for line in lines})


def test_the_torch_closure_follows_markers_and_extras():
    report = {"environment": {"python_version": "3.12", "platform_system": "Linux", "sys_platform": "linux"},
              "install": [
                  {"metadata": {"name": "torch", "requires_dist": [
                      "filelock", "cuda-toolkit[cublas]==13; platform_system == 'Linux'",
                      "pywin; sys_platform == 'win32'", "optree; extra == 'optree'"]}},
                  {"metadata": {"name": "cuda-toolkit", "requires_dist": [
                      "nvidia-cublas; extra == 'cublas'", "nvidia-cufft; extra == 'cufft'"]}},
                  {"metadata": {"name": "filelock"}}, {"metadata": {"name": "nvidia-cublas"}},
                  {"metadata": {"name": "nvidia-cufft"}}, {"metadata": {"name": "optree"}},
                  {"metadata": {"name": "mlflow", "requires_dist": ["filelock"]}}]}
    assert ic.torch_closure(report) == {"torch", "filelock", "cuda-toolkit", "nvidia-cublas"}


# --------------------------------------------------------------------------- the Dockerfile


def test_the_dockerfile_installs_torch_from_its_index_then_the_project_under_the_constraints():
    torch_line, project_line = ic.pip_lines()
    args = ic.build_args()
    assert torch_line[1:] == ["pip", "install", "--index-url", args["TORCH_INDEX_URL"], args["TORCH_SPEC"]]
    workdir, *argv = project_line
    assert workdir == ic.workdir() == "/app"
    assert argv[argv.index("-c") + 1] == "docker/constraints.txt" and ic.unconstrained(argv) == ["."]
    # The file is in the image when the line runs, and in the build context (not excluded by .dockerignore).
    constraints = PurePosixPath(workdir) / "docker/constraints.txt"
    copied = [dest for sources, dest in ic.copies() if "docker/constraints.txt" in sources]
    assert copied == [str(constraints.parent)]
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "!docker/constraints.txt" in ignore and ignore.index("!docker/constraints.txt") > ignore.index("docker/*")
    # Python 3.12, the constraints' Python: Ubuntu 24.04's python3 in the CUDA base, python:3.12 for a CPU build.
    assert args["BASE"].endswith("ubuntu24.04") and ic.read_constraints()[1]["python"] == "3.12"
    for text in ((ROOT / "Dockerfile").read_text(), (ROOT / "docs" / "launch.md").read_text()):
        assert set(re.findall(r"BASE=python:([\d.]+)-", text)) == {"3.12"}


def test_staging_copies_what_the_copy_lines_put_in_the_image_before_a_pip_line(tmp_path):
    app = ic.stage(tmp_path, pip_line=1)
    assert app == tmp_path / "app"
    for path in ("pyproject.toml", "README.md", "disent/__init__.py", "launcher/__main__.py", "docker/constraints.txt"):
        assert (app / path).is_file(), path
    assert not (app / "configs").exists() and not list(app.rglob("__pycache__"))  # copied after that line


# --------------------------------------------------------------------------- the manifest and the image


def test_the_manifest_runs_what_the_image_holds():
    docs = documents()
    c = container(docs["Job"])
    repository, tag = c["image"].rsplit(":", 1)
    assert tag == disent.__version__
    # The command: python -m launcher (a package the image copies and installs) -- disent (a console script).
    command = c["command"]
    assert command[:3] == ["python", "-m", "launcher"]
    copied = {src for sources, _ in ic.copies() for src in sources}
    assert "launcher" in copied and (ROOT / "launcher" / "__main__.py").is_file()
    assert "launcher*" in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
        "find"]["include"]
    train = command[command.index("--") + 1]
    assert train in PROJECT["scripts"] and PROJECT["scripts"][train].split(".")[0] in copied
    # What the ConfigMap's config extends lies where the COPY lines put this checkout's configs/.
    config = yaml.safe_load(next(iter(docs["ConfigMap"]["data"].values())))
    extends = PurePosixPath(config["extends"])
    (dest,) = [dest for sources, dest in ic.copies() if sources == ["configs"]]
    assert extends.is_relative_to(dest) and (ROOT / "configs" / extends.relative_to(dest)).is_file()
    # The mounts hide nothing the image installed: not WORKDIR, a COPY destination or the venv.
    image_paths = [PurePosixPath(ic.workdir()), PurePosixPath("/opt/venv"),
                   *(PurePosixPath(d) for _, d in ic.copies())]
    for mount in c["volumeMounts"]:
        path = PurePosixPath(mount["mountPath"])
        assert not any(path == p or p.is_relative_to(path) or path.is_relative_to(p) for p in image_paths), path
    assert repository == kustomization()["images"][0]["name"]


# --------------------------------------------------------------------------- Makefile and kustomize


def test_make_image_tags_the_package_version_and_help_lists_the_targets():
    def make(*args: str) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "IMAGE")}
        result = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert make("-n", "image").split() == ["docker", "build", "-t", f"ghcr.io/disent/disent:{disent.__version__}", "."]
    assert make("-n", "image-push", "IMAGE=registry.example/disent:dev").splitlines()[-1] == \
        "docker push registry.example/disent:dev"
    assert "--build-arg BASE=x" in make("-n", "image", "IMAGE_BUILD_ARGS=--build-arg BASE=x")
    helped = make("help")
    for target in ("make image ", "make image-push ", "make constraints "):
        assert target in helped


def kustomization() -> dict:
    return yaml.safe_load(KUSTOMIZATION.read_text())


def test_the_kustomization_names_the_manifests_image_at_the_version():
    k = kustomization()
    assert k["kind"] == "Kustomization" and k["resources"] == ["job.yaml"]
    (entry,) = k["images"]
    assert entry == {"name": "ghcr.io/disent/disent", "newTag": disent.__version__}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its built-in kustomize)")
def test_kustomize_sets_the_image_and_leaves_the_rest_of_the_manifest_as_it_is(tmp_path):
    def render(folder: Path) -> dict[str, dict]:
        out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}

    assert render(ROOT / "k8s") == documents()  # the default: the manifest itself
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    k = kustomization()
    k["images"][0].update(newName="registry.example/team/disent", newTag="dev")
    (tmp_path / "k8s" / "kustomization.yaml").write_text(json.dumps(k))
    rendered, expected = render(tmp_path / "k8s"), copy.deepcopy(documents())
    container(expected["Job"])["image"] = "registry.example/team/disent:dev"
    assert rendered == expected
