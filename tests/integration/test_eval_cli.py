"""`disent eval` and `disent swap` on a real (tiny) trained run."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.support.train_helpers import ROOT, step_dir, tiny_overrides


def disent(*args, env=None):
    import os

    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "disent.cli", *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    run = tmp_path_factory.mktemp("eval") / "run"
    result = disent("train", "configs/base.yaml", *tiny_overrides(run, tiny_data, **{"train.steps": 4}))
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def test_eval_writes_json_grids_and_logs_to_the_training_run(trained):
    result = disent("eval", trained, "eval.max_test_samples=50")
    assert result.returncode == 0, result.stderr
    ckpt, evaluated = step_dir(trained, 4), trained / "eval" / "step-00000004"  # one place per step
    report = json.loads((evaluated / "eval.json").read_text())
    for key in ("chance", "class_from_s_linear", "class_from_s_mlp", "class_from_z_mean_linear",
                "class_from_z_sample_mlp", "reconstruction_mse", "swap_mse"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["num_test"] == 50 and report["step"] == 4
    for png in ("swap_grid.png", "prior_samples.png", "interpolation.png"):
        assert Image.open(evaluated / png).format == "PNG"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{trained}/mlflow.db")
    meta = json.loads((ckpt / "meta.json").read_text())
    assert report["mlflow_run_id"] == meta["mlflow_run_id"]
    history = client.get_metric_history(meta["mlflow_run_id"], "eval/class_from_s_mlp")
    assert 4 in [m.step for m in history]
    artifacts = {f.path for f in client.list_artifacts(meta["mlflow_run_id"], "eval/step-00000004")}
    assert "eval/step-00000004/swap_grid.png" in artifacts


def test_eval_of_a_step_the_training_evaluated_reuses_it_unless_asked_to_redo(trained):
    """The training evaluates its last step; `disent eval` of it says so and reuses the results (no second MLflow
    point at the same step, no second folder) unless --redo."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{trained}/mlflow.db")
    run_id = json.loads((step_dir(trained, 4) / "meta.json").read_text())["mlflow_run_id"]
    points = len(client.get_metric_history(run_id, "eval/z_gain"))
    result = disent("eval", trained)
    assert result.returncode == 0, result.stderr
    assert "step 4 of" in result.stderr and "is evaluated already" in result.stderr and "--redo" in result.stderr
    assert len(client.get_metric_history(run_id, "eval/z_gain")) == points
    assert json.loads((trained / "eval" / "step-00000004" / "eval.json").read_text())["mlflow_run_id"] == run_id
    assert not (step_dir(trained, 4) / "eval").exists()
    redone = disent("eval", trained, "--redo", "--no-mlflow")
    assert redone.returncode == 0 and "evaluated already" not in redone.stderr, redone.stderr


def test_eval_child_run(trained):
    result = disent("eval", trained, "--child-run", "--output", trained / "child-eval", "eval.max_test_samples=40")
    assert result.returncode == 0, result.stderr
    report = json.loads((trained / "child-eval" / "eval.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{trained}/mlflow.db")
    child = client.get_run(report["mlflow_run_id"])
    parent = json.loads((step_dir(trained, 4) / "meta.json").read_text())["mlflow_run_id"]
    assert child.data.tags["mlflow.parentRunId"] == parent and child.info.run_id != parent


def test_eval_errors_are_clear(trained, tmp_path):
    result = disent("eval", tmp_path)
    assert result.returncode == 2 and "no complete checkpoint" in result.stderr
    result = disent("eval", trained, "eval.max_test_sample=3")
    assert result.returncode == 2 and "did you mean 'eval.max_test_samples'" in result.stderr


def test_swap_file_and_folder(trained, tmp_path):
    rng = np.random.default_rng(0)
    content, style = tmp_path / "content", tmp_path / "style"
    content.mkdir(), style.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(content / f"c{i}.png")
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(style / f"s{i}.png")
    out = tmp_path / "one.png"
    result = disent("swap", "--checkpoint", trained, "--content", content / "c0.png", "--style", style / "s1.png", "-o", out)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (28, 28)
    result = disent("swap", "--checkpoint", trained, "--content", content, "--style", style, "-o", tmp_path / "all")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "all").glob("c*__s*.png"))) == 6 and (tmp_path / "all" / "grid.png").exists()


def test_swap_refuses_wrong_size_and_channels(trained, tmp_path):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "ok.png")
    result = disent("swap", "--checkpoint", trained, "--content", tmp_path / "big.png", "--style", tmp_path / "ok.png",
                    "-o", tmp_path / "o.png")
    assert result.returncode == 2 and "big.png is 32x32, but the model takes 28x28" in result.stderr
    result = disent("swap", "--checkpoint", trained, "--content", tmp_path / "ok.png", "--style", tmp_path / "rgb.png",
                    "-o", tmp_path / "o.png")
    assert result.returncode == 2 and "rgb.png has mode RGB" in result.stderr
    assert "Traceback" not in result.stderr
    # -o without an extension: one line, before the model is loaded (a checkpoint that does not exist is not read)
    result = disent("swap", "--checkpoint", tmp_path / "nowhere", "--content", tmp_path / "ok.png", "--style",
                    tmp_path / "ok.png", "-o", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"-o {tmp_path / 'out'}: the image's format comes from its extension" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_a_folder_of_three_classes_of_thirty_images_goes_from_prepare_to_an_evaluation(tmp_path):
    """The walkthrough of docs/data.md: your own folder (3 classes x 30 images), prepared, trained a few steps and
    evaluated, every command exiting 0 and the evaluation written (its test split holds 9 images: fewer than two rows
    of the default grid)."""
    from tests.support.sources import make_folder

    folder = make_folder(tmp_path / "images", per_class=(30, 30, 30), size=28, colour=False)
    shards, run = tmp_path / "shards", tmp_path / "run"
    prepared = disent("prepare", f"folder:{folder}", shards, "--no-progress")
    assert prepared.returncode == 0, prepared.stderr
    trained = disent("train", "configs/base.yaml", "name=mine", f"run_dir={run}", f"data.url={shards}",
                     "data.num_classes=3", "train.steps=4", "train.global_batch_size=8", "model.base_channels=8",
                     "model.disc_channels=8", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "train.progress=false",
                     "tracking.log_model=false")
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = disent("eval", run, "--redo")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((run / "eval" / "step-00000004" / "eval.json").read_text())
    assert report["num_test"] == 9 and "failed_metrics" not in report and report["step"] == 4
