"""What an installed package offers and that its version has one source."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import disent
from tests.support.train_helpers import ROOT


def test_python_m_disent_is_the_disent_command():
    result = subprocess.run([sys.executable, "-m", "disent", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "prepare" in result.stdout and "train" in result.stdout


def test_the_version_has_one_source_and_the_image_and_docs_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "disent.__version__"}
    tags = set(re.findall(r"ghcr\.io/disent/disent:([\w.]+)", (ROOT / "k8s" / "job.yaml").read_text()
                          + (ROOT / "docs" / "launch.md").read_text()))
    assert tags == {disent.__version__}


def test_the_package_is_marked_typed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert (ROOT / "disent" / "py.typed").is_file() and "py.typed" in project["tool"]["setuptools"]["package-data"]["disent"]
