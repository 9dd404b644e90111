"""What an installed disent relies on, in-process: the sweep's job script and manifest template found (the
wheel's copies, else the checkout's; refused naming the flag), and the guard that the `launcher` package Python
would run is disent's. The package's metadata: test_packaging.py; the real wheel in a fresh environment:
tests/integration/test_installed_wheel.py."""
from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pytest

from disent.cli import main as disent_main
from disent.config import ConfigError
from disent.errors import InputError, ExitCode
from disent.host import LAUNCHER_MARKER, check_launcher
from disent.sweep import backends
from launcher.__main__ import foreign_package
from launcher.__main__ import main as launcher_main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "base.yaml")


# --------------------------------------------------------------------------- the sweep's templates


def test_setup_py_copies_every_template_the_sweep_looks_up():
    """setup.py cannot import disent (it builds it), so its list is checked against the backends' here."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    (copied,) = [ast.literal_eval(n.value) for n in tree.body
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "TEMPLATES"]
    assert set(copied) == set(backends.TEMPLATE_FLAGS)
    assert all((ROOT / relative).is_file() for relative in copied)
    assert backends.SHIPPED == ROOT / "disent" / "sweep" / "templates"


def test_a_checkout_uses_its_own_files_and_a_given_path_wins(tmp_path):
    assert backends.template("slurm/train.sh") == ROOT / "slurm" / "train.sh"
    assert backends.template("k8s/job.yaml") == ROOT / "k8s" / "job.yaml"
    mine = tmp_path / "mine.sh"
    mine.write_text("#!/bin/bash\n")
    assert backends.template("slurm/train.sh", str(mine)) == mine
    assert backends.slurm_command(2, [], "c.yaml", str(mine))[-2:] == [str(mine), "c.yaml"]


def test_the_wheel_copy_comes_before_the_checkout(tmp_path, monkeypatch):
    shipped = tmp_path / "templates"
    (shipped / "k8s").mkdir(parents=True)
    (shipped / "k8s" / "job.yaml").write_text("kind: Job\n")
    monkeypatch.setattr(backends, "SHIPPED", shipped)
    assert backends.template("k8s/job.yaml") == shipped / "k8s" / "job.yaml"
    assert backends.template("slurm/train.sh") == ROOT / "slurm" / "train.sh"  # not shipped here: the checkout's


@pytest.mark.parametrize("backend, relative, flag", [("slurm", "slurm/train.sh", "--slurm-script"),
                                                     ("k8s", "k8s/job.yaml", "--k8s-template")])
def test_a_missing_template_is_refused_in_one_line_naming_the_flag(backend, relative, flag, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setattr(backends, "SHIPPED", tmp_path / "templates")
    monkeypatch.setattr(backends, "ROOT", tmp_path / "site")
    with pytest.raises(ConfigError) as info:
        backends.template(relative)
    assert str(tmp_path / "templates" / relative) in str(info.value) and flag in str(info.value)
    extra = ["data.url=s3://b/p", "--tracking-uri", "http://mlflow:5000"] if backend == "k8s" else []
    assert disent_main(["sweep", CONFIG, "model.z_dim=8,16", *extra, "--backend", backend, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and relative in err[0], err
    assert disent_main(["sweep", CONFIG, "model.z_dim=8,16", *extra, "--backend", backend, flag,
                        str(tmp_path / "nope"), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == f"disent: config error: {flag} {tmp_path / 'nope'}: no such file"


# --------------------------------------------------------------------------- the name `launcher`


def test_this_launcher_names_its_distribution():
    import launcher

    assert launcher.DISTRIBUTION == "disent-adversarial"
    assert LAUNCHER_MARKER in Path(launcher.__file__).read_text()
    assert foreign_package() is None


def test_check_launcher_passes_for_this_one_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_launcher()


def _foreign(folder: Path, init: str | None = "WHO = 'someone else'\n") -> Path:
    (folder / "launcher").mkdir(parents=True)
    if init is not None:
        (folder / "launcher" / "__init__.py").write_text(init)
    (folder / "launcher" / "__main__.py").write_text("print('not disent')\n")
    return folder / "launcher"


def test_a_launcher_in_the_working_directory_is_refused(tmp_path, monkeypatch, capsys):
    """`python -m launcher` puts the working directory first: a `launcher/` there is what a local sweep
    would run. Refused before anything starts, in one line naming the file."""
    package = _foreign(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as info:
        check_launcher()
    assert str(package / "__init__.py") in str(info.value) and "not disent's launcher" in str(info.value)
    assert disent_main(["sweep", CONFIG, "model.z_dim=8,16", "--backend", "local", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("disent: input error: `python -m launcher` would run"), err


def test_a_launcher_earlier_on_the_path_is_refused(tmp_path, monkeypatch):
    """What an editable install meets when another distribution's `launcher` is in site-packages: the path
    finder comes before the editable finder."""
    package = _foreign(tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    with pytest.raises(InputError, match="not disent's launcher") as info:
        check_launcher()
    assert str(package / "__init__.py") in str(info.value)


def test_a_launcher_left_without_its_init_is_refused(tmp_path, monkeypatch):
    """Uninstalling another distribution that wrote launcher/__init__.py over ours removes that file."""
    package = _foreign(tmp_path / "site-packages", init=None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site-packages")]
                        + [p for p in sys.path if p and not (Path(p) / "launcher").is_dir()])
    with pytest.raises(InputError, match="lost its __init__.py") as info:
        check_launcher()
    assert str(package) in str(info.value)


def test_python_m_launcher_refuses_a_foreign_package_in_one_line(monkeypatch, capsys):
    """Another distribution's launcher/__init__.py written over ours, whose __main__.py is still ours."""
    foreign = types.ModuleType("launcher")
    foreign.__file__ = "/site-packages/launcher/__init__.py"
    monkeypatch.setitem(sys.modules, "launcher", foreign)
    assert launcher_main(["--", "true"]) == ExitCode.INPUT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"launcher: error: {foreign_package()}"]
    assert "/site-packages/launcher/__init__.py is not disent's" in err[0]
