"""disent as a user gets it: the wheel built from this tree, installed with `pip install --no-deps` into a
fresh environment and run from an empty directory, so nothing can come from the checkout. Every backend of
`disent sweep` renders its dry run from what the wheel installed (the job script and manifest template
included), `python -m disent --help` and `python -m launcher` work. The third-party dependencies come from
this test's own environment through a .pth line (a plain path: the editable install of disent there, made by
an `import` line in another .pth, is not activated; checked). The lookups in-process:
tests/unit/test_install_layout.py."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.support.train_helpers import ROOT

# What a working tree holds beside the sources (runs, data, environments, build output): not copied.
NOT_SOURCES = {".git", ".venv", ".whl", "build", "dist", "data", "runs", "mlruns", "mlflow.db", "out",
               ".pytest_cache"}
POINTS = ["model.z_dim=8,16"]
BACKEND_FLAGS = {"local": [], "slurm": [],
                 "k8s": ["data.url=s3://disent-data/fashion", "--tracking-uri", "http://mlflow.mlflow.svc:5000"]}


def _source_copy(target: Path) -> Path:
    """The tree without its runs and environments: the wheel is built there, so this test writes no build/
    into the checkout (and a file the build needs but git would not carry still shows up missing)."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == ROOT
        return [n for n in names if (top and n in NOT_SOURCES) or n == "__pycache__" or n.endswith(".egg-info")
                or n.startswith("gpu-check-")]

    shutil.copytree(ROOT, target, ignore=ignore)
    return target


def _run(command: list[str], cwd: Path, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, its site-packages, an empty working directory, the environment to run its commands in)."""
    base = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: this environment's setuptools builds it, so no index is needed.
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(base / "dist"),
                  str(_source_copy(base / "src"))], cwd=base)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (base / "dist").glob("disent_adversarial-*.whl")
    venv = base / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    # This environment's pip installs into the fresh one (--python), before the .pth below exists: it sees no
    # other disent-adversarial, so it never offers to uninstall the editable one.
    put = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)], cwd=base)
    assert put.returncode == 0, put.stdout + put.stderr
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=base).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    cwd = base / "empty"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1")
    return venv, site, cwd, env


def test_the_wheel_holds_the_templates_as_the_checkout_has_them(installed):
    _, site, _, _ = installed
    for relative in ("slurm/train.sh", "k8s/job.yaml"):
        assert (site / "disent" / "sweep" / "templates" / relative).read_bytes() == (ROOT / relative).read_bytes()


def test_disent_and_the_launcher_come_from_the_fresh_environment(installed):
    venv, site, cwd, env = installed
    probe = ("import sys, disent, launcher, yaml; from disent.sweep import backends; "
             "print(disent.__file__); print(launcher.__file__); print(yaml.__file__); "
             "print(backends.template('slurm/train.sh')); print(backends.template('k8s/job.yaml')); "
             "print(any('editable' in type(f).__name__.lower() or 'editable' in getattr(f, '__module__', '') "
             "for f in sys.meta_path) or any('__editable__' in m for m in sys.modules))")
    result = _run([str(venv / "bin" / "python"), "-c", probe], cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    disent_file, launcher_file, yaml_file, script, template, editable = result.stdout.split("\n")[:6]
    assert Path(disent_file).is_relative_to(site) and Path(launcher_file).is_relative_to(site)
    assert not Path(yaml_file).is_relative_to(venv)  # the dependencies: this environment's, through the .pth
    assert editable == "False"
    shipped = site / "disent" / "sweep" / "templates"
    assert (Path(script), Path(template)) == (shipped / "slurm" / "train.sh", shipped / "k8s" / "job.yaml")


def test_python_m_disent_and_the_launcher_run(installed):
    venv, _, cwd, env = installed
    python = str(venv / "bin" / "python")
    usage = _run([python, "-m", "disent", "--help"], cwd=cwd, env=env)
    assert usage.returncode == 0 and "sweep" in usage.stdout, usage.stderr
    for launcher in ([python, "-m", "launcher"], [str(venv / "bin" / "disent-launch")]):
        dry = _run([*launcher, "--dry-run", "--", "true"], cwd=cwd, env=env)
        assert dry.returncode == 0 and '"mode": "local"' in dry.stdout, dry.stderr


def test_every_backend_renders_its_dry_run_from_the_installed_package(installed, tmp_path):
    venv, site, cwd, env = installed
    disent = str(venv / "bin" / "disent")
    offered = re.search(r"--backend \{([\w,]+)\}", _run([disent, "sweep", "--help"], cwd=cwd, env=env).stdout)
    assert offered and set(offered.group(1).split(",")) == set(BACKEND_FLAGS)
    config = tmp_path / "base.yaml"  # an input of the user's, outside the working directory
    shutil.copy(ROOT / "configs" / "base.yaml", config)
    out = {}
    for backend, flags in BACKEND_FLAGS.items():
        result = _run([disent, "sweep", str(config), *POINTS, *flags, "--backend", backend, "--dry-run"],
                      cwd=cwd, env=env)
        assert result.returncode == 0, f"{backend}: {result.stderr}"
        assert "dry run; nothing submitted" in result.stderr or backend == "k8s", result.stderr
        out[backend] = result.stdout
    assert out["local"].count("disent train ") == 2
    (sbatch,) = [line for line in out["slurm"].splitlines() if "sbatch" in line]
    assert f" {site / 'disent' / 'sweep' / 'templates' / 'slurm' / 'train.sh'} {config}" in sbatch
    manifests = [d for d in yaml.safe_load_all(out["k8s"]) if d]
    jobs = [d for d in manifests if d["kind"] == "Job"]
    commands = [j["spec"]["template"]["spec"]["containers"][0]["command"] for j in jobs]
    assert len(jobs) == 2 and all(c[0] == "/bin/sh" and "tracking.parent_run_id=PARENT_RUN_ID" in c for c in commands)
    assert not list(cwd.iterdir())  # a dry run writes nothing


@pytest.mark.parametrize("relative, flag", [("slurm/train.sh", "--slurm-script"), ("k8s/job.yaml", "--k8s-template")])
def test_a_template_missing_from_the_install_is_refused_naming_the_flag(installed, tmp_path, relative, flag):
    venv, site, cwd, env = installed
    shipped = site / "disent" / "sweep" / "templates" / relative
    config = tmp_path / "base.yaml"
    shutil.copy(ROOT / "configs" / "base.yaml", config)
    backend = relative.split("/")[0]
    aside = shipped.rename(shipped.with_suffix(".aside"))
    try:
        result = _run([str(venv / "bin" / "disent"), "sweep", str(config), *POINTS, *BACKEND_FLAGS[backend],
                       "--backend", backend, "--dry-run"], cwd=cwd, env=env)
    finally:
        aside.rename(shipped)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert str(shipped) in line and flag in line, line
