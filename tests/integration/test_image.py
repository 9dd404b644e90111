"""The image's pip lines, run as the Dockerfile runs them but resolved, not installed (no Docker engine here), and
the manifest kustomize renders, validated strictly. What the image installs is pinned by docker/constraints.txt;
tests/unit/test_image.py checks the files against each other without a registry.

The pip lines need PyPI and take a minute or two: in a fresh venv of the image's Python (3.12) the Dockerfile's
torch line is resolved (`--dry-run --report`), from PyPI instead of TORCH_INDEX_URL, which this machine cannot
reach (PyPI's Linux torch is the CUDA build: its dependencies include the CPU build's). What it would install is
then put into the venv as metadata alone (torch's and CUDA's gigabytes stay out; pip decides from metadata), and the
project's line is run in the files the COPY lines put into /app, `-c docker/constraints.txt` and all, again with
`--dry-run --report`. That proves what pip decides: the line resolves under the constraints for the image's Python
and platform, installs exactly the pinned versions and nothing unpinned, and leaves what the torch line installed
alone. It does not prove the download, DeepSpeed's build from its sdist, or the imports the Dockerfile checks last.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

import disent
from tests.support.k8s import run_validate
from tests.support.train_helpers import ROOT

sys.path.insert(0, str(ROOT / "docker"))

import image_constraints as ic  # noqa: E402


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
        return True
    except OSError:
        return False


def install_metadata(venv: Path, report: dict) -> None:
    """Every distribution of a pip report as an installed one with its metadata and no files: what pip reads."""
    (site,) = venv.glob("lib/python*/site-packages")
    for item in report["install"]:
        meta = item["metadata"]
        folder = site / f"{canonicalize_name(meta['name']).replace('-', '_')}-{meta['version']}.dist-info"
        folder.mkdir()
        fields = [("Metadata-Version", "2.1"), ("Name", meta["name"]), ("Version", meta["version"])]
        fields += [("Requires-Python", meta["requires_python"])] if "requires_python" in meta else []
        fields += [("Provides-Extra", e) for e in meta.get("provides_extra", [])]
        fields += [("Requires-Dist", r) for r in meta.get("requires_dist", [])]
        (folder / "METADATA").write_text("".join(f"{k}: {v}\n" for k, v in fields))
        (folder / "INSTALLER").write_text("pip\n")
        (folder / "RECORD").write_text("")


def versions(report: dict) -> dict[str, str]:
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}


@pytest.mark.skipif(not pypi_reachable(), reason="needs PyPI")
def test_the_dockerfiles_pip_lines_install_exactly_the_constraints_over_the_torch_line(tmp_path):
    python = ic.find_python()
    if python is None:
        pytest.skip(f"needs a Python {ic.IMAGE_PYTHON} (the image's) on PATH or in pyenv")
    venv_python = ic.fresh_venv(python, tmp_path / "venv")  # RUN python3 -m venv /opt/venv
    (torch_dir, *torch_line), (app_dir, *project_line) = ic.pip_lines(TORCH_INDEX_URL=ic.PYPI)

    torch_report = ic.resolve(venv_python, torch_line[2:], tmp_path / "torch.json", tmp_path)
    torch_set = versions(torch_report)
    assert torch_set["torch"] == ic.build_args()["TORCH_SPEC"].split("==")[1]
    install_metadata(tmp_path / "venv", torch_report)

    app = ic.stage(tmp_path / "image", pip_line=1)
    assert app == tmp_path / "image" / app_dir.lstrip("/")
    report = ic.resolve(venv_python, project_line[2:], tmp_path / "project.json", app)
    installs = versions(report)
    assert installs.pop(ic.PROJECT) == disent.__version__
    pins, _ = ic.read_constraints()
    assert not set(installs) & set(torch_set), "the project's line replaces what the torch line installed"
    assert installs == pins, {  # both ways: nothing unpinned, no pin left over (make constraints)
        "unpinned": {n: v for n, v in installs.items() if n not in pins},
        "pinned, not installed": sorted(set(pins) - set(installs))}
    # From wheels for this Python and platform, no compiler needed; DeepSpeed is an sdist only on PyPI.
    sources = {canonicalize_name(i["metadata"]["name"]): i["download_info"]["url"] for i in report["install"]}
    built = {name for name, url in sources.items() if not url.endswith(".whl")}
    assert built == {ic.PROJECT, "deepspeed"}, built


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its built-in kustomize)")
@pytest.mark.parametrize("version", [None, "1.30.0"])
def test_the_manifest_kustomize_renders_validates_strictly(tmp_path, version):
    rendered = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s")], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    (tmp_path / "rendered.yaml").write_text(rendered.stdout)
    result = run_validate(tmp_path / "rendered.yaml", version=version)
    assert result.returncode == 0 and "did not validate" not in result.stdout, result.stdout + result.stderr
    assert rendered.stdout.count("image: ghcr.io/disent/disent:") == 1
