"""`disent sweep` in-process: points, names and input checks, and what a Kubernetes sweep refuses. The rendered
manifests validated, and real sweeps (local, a Kubernetes point): tests/integration/test_sweep_runs.py; the
Slurm job array: tests/integration/test_slurm.py."""
from __future__ import annotations

import pytest

from disent.cli import main
from disent.config import ConfigError
from disent.sweep.points import build_sweep, parse_axes, split_values

CONFIG = "configs/base.yaml"


def test_values_split_on_commas_outside_brackets_and_quotes():
    assert split_values("0.01,0.05") == ["0.01", "0.05"]
    assert split_values("[0.5,0.9],[0.5,0.999]") == ["[0.5,0.9]", "[0.5,0.999]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_grid_and_zip_points_are_named_by_the_values_that_differ():
    grid = build_sweep(CONFIG, ["loss.adversarial=0.01,0.05", "model.z_dim=8,16", "train.steps=10"], "grid")
    assert len(grid.points()) == 4
    assert [grid.label(p) for p in grid.points()] == [
        "loss.adversarial=0.01 model.z_dim=8", "loss.adversarial=0.01 model.z_dim=16",
        "loss.adversarial=0.05 model.z_dim=8", "loss.adversarial=0.05 model.z_dim=16"]
    assert "train.steps=10" in grid.overrides(grid.points()[0])  # one value: every point, not in the name
    zipped = build_sweep(CONFIG, ["loss.adversarial=0.01,0.05", "model.z_dim=8,16"], "zip")
    assert [zipped.label(p) for p in zipped.points()] == ["loss.adversarial=0.01 model.z_dim=8",
                                                           "loss.adversarial=0.05 model.z_dim=16"]


@pytest.mark.parametrize("arguments, mode, message", [
    (["model.zdim=8,16"], "grid", "unknown config key 'model.zdim'"),
    (["model.z_dim=8,abc"], "grid", "config key 'model.z_dim' (from the command line) must be int"),
    (["model.z_dim="], "grid", "sweep key 'model.z_dim' has an empty value list"),
    (["model.z_dim=8,,16"], "grid", "sweep key 'model.z_dim' has an empty value list"),
    (["model.z_dim"], "grid", "is not key=v1,v2"),
    (["model.z_dim=8,16", "loss.adversarial=0.1"], "zip", "--zip needs as many values for every key"),
    (["model.z_dim=8", "model.z_dim=16"], "grid", "given twice"),
    ([], "grid", "at least one key"),
    # the sweep gives each point these itself; a second value would be the same override twice
    (["run_dir=/tmp/x", "model.z_dim=8,16"], "grid", "'run_dir' is set by the sweep for each point (from --run-dir)"),
    (["tracking.uri=sqlite:///x.db", "model.z_dim=8,16"], "grid", "(from --tracking-uri)"),
])
def test_bad_input_is_refused_naming_the_key(arguments, mode, message):
    with pytest.raises(ConfigError) as info:
        build_sweep(CONFIG, arguments, mode)
    assert message in str(info.value)


def test_the_cli_refuses_bad_input_before_anything_is_submitted(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr("disent.sweep.summary.start_parent", lambda *a, **k: started.append(a) or "never")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["sweep", CONFIG, "model.z_dim=8,nope", "--backend", "slurm", "--tracking-uri", store]) == 2
    err = capsys.readouterr().err
    assert "model.z_dim" in err and "must be int" in err
    assert not started and not (tmp_path / "mlflow.db").exists()
    assert parse_axes(["a.b=1"]) == {"a.b": ["1"]}


@pytest.mark.parametrize("arguments, message", [
    (["--tracking-uri", "http://mlflow:5000"], "data.url=data/sprites is a path on this machine's disk"),
    (["data.url=s3://b/sprites"], "is local to this machine; a Kubernetes sweep needs an MLflow server"),
    (["data.url=s3://b/sprites", "--tracking-uri", "http://mlflow:5000", "--run-dir", "/scratch/sweep"],
     "--run-dir /scratch/sweep is not on a volume claim the pods of"),
])
def test_a_k8s_sweep_refuses_what_its_pods_cannot_reach(arguments, message, capsys):
    assert main(["sweep", "configs/sprites.yaml", "model.z_dim=8,16", *arguments, "--backend", "k8s", "--dry-run"]) == 2
    assert message in capsys.readouterr().err


