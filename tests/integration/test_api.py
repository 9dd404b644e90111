"""The Python API (`disent.load`) and the MLflow model a finished run logs, on a real run and a real
`mlflow server`: the registered model loads in a fresh process and gives the codes `disent eval` uses.
`disent.load` on a wrong path: tests/unit/test_api_load.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import disent
from tests.support.train_helpers import ROOT, tiny_overrides

MODEL_NAME = "tiny-api"


@pytest.fixture(scope="module")
def run(tmp_path_factory, mlflow_server, tiny_data):
    """A finished tiny run tracked on the real server, its model registered as MODEL_NAME."""
    run_dir = tmp_path_factory.mktemp("api") / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    overrides = tiny_overrides(run_dir, tiny_data, **{"tracking.uri": mlflow_server, "tracking.log_model": True,
                                                      "tracking.register_model": MODEL_NAME})
    result = subprocess.run([sys.executable, "-m", "disent.cli", "train", "configs/base.yaml", *overrides],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = json.loads((run_dir / "checkpoints").glob("step-*/meta.json").__next__().read_text())["mlflow_run_id"]
    return {"dir": run_dir, "shards": tiny_data, "uri": mlflow_server, "run_id": run_id}


def images(n=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def test_the_api_takes_every_layout_and_gives_arrays_back_as_it_got_them(run):
    model = disent.load(run["dir"])
    assert model.config.model.z_dim == 4 and model.config.data.num_classes == 4
    x = images()
    s, mu, logvar = model.encode(x)
    assert isinstance(s, np.ndarray) and s.shape == (6, 4) and mu.shape == logvar.shape == (6, 4)
    for same in (x.transpose(0, 2, 3, 1), x[:, 0], x.astype(np.float32) / 255):  # NHWC, N x H x W, floats
        np.testing.assert_allclose(model.encode(same)[0], s, atol=1e-6)
    st, mut, _ = model.encode(torch.from_numpy(x))
    assert isinstance(st, torch.Tensor) and torch.allclose(st, torch.from_numpy(s), atol=1e-6)
    pictures = model.decode(mu, s)
    assert pictures.shape == (6, 1, 28, 28) and 0 <= pictures.min() and pictures.max() <= 1
    analogies = model.swap(x[:3], x[3:])
    assert analogies.shape == (3, 1, 28, 28)
    np.testing.assert_allclose(analogies, model.decode(mu[3:], s[:3]), atol=1e-6)
    # The exported folder (run_dir/final) and a checkpoint directory give the same model.
    np.testing.assert_allclose(disent.load(run["dir"] / "final").encode(x)[0], s, atol=1e-6)
    step = sorted((run["dir"] / "checkpoints").glob("step-*"))[-1]
    np.testing.assert_allclose(disent.load(step).encode(x)[0], s, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 1, 32, 32), np.uint8), "takes 1 x 28 x 28"),
    (np.zeros((2, 3, 28, 28), np.uint8), "takes 1 x 28 x 28"),
    (np.full((2, 1, 28, 28), 255.0, np.float32), "must lie in [0, 1]"),
    (np.zeros((28, 28), np.uint8), "N x C x H x W"),
    (np.zeros((2, 1, 28, 28), np.int32), "uint8 (0-255) or floats"),
])
def test_the_api_refuses_images_the_model_does_not_take(run, bad, message):
    model = disent.load(run["dir"])
    with pytest.raises(ValueError) as info:
        model.encode(bad)
    assert message in str(info.value)


_FRESH_PROCESS = """
import json, sys
import numpy as np
import mlflow
import disent
from disent.eval.evaluate import encode_all

x = np.load(sys.argv[1])
registered = mlflow.pyfunc.load_model("models:/{name}/latest")
codes = registered.predict(x)
swapped = registered.predict(np.concatenate([x[:3], x[3:]]), params={{"mode": "swap"}})["images"]
by_run = disent.load("runs:/" + sys.argv[2] + "/model")
local = disent.load(sys.argv[3])
import torch
evaluated = encode_all(local.vae, x, torch.device("cpu"))  # what `disent eval` computes its probes on
np.savez(sys.argv[4], s=codes["s"], mu=codes["mu"], logvar=codes["logvar"], swapped=swapped,
         by_run_s=by_run.encode(x)[0], eval_s=evaluated["s"], eval_mu=evaluated["mu"])
print(json.dumps({{"signature": str(registered.metadata.signature), "modules": sorted(m for m in sys.modules if m == "disent")}}))
"""


def test_the_registered_model_loads_in_a_fresh_process_and_gives_the_codes_eval_uses(run, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=run["uri"])
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert [v.run_id for v in versions] == [run["run_id"]]
    artifacts = {a.path for a in client.list_artifacts(run["run_id"], "model")}
    assert {"model/MLmodel", "model/artifacts", "model/code", "model/input_example.json"} <= artifacts

    x = images()
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "codes.npz"
    env = {**os.environ, "MLFLOW_TRACKING_URI": run["uri"], "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS.format(name=MODEL_NAME), str(tmp_path / "x.npy"),
                             run["run_id"], str(run["dir"]), str(out)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "'s'" in report["signature"] and "mode" in report["signature"]
    got = np.load(out)
    s, mu, logvar = disent.load(run["dir"]).encode(x)
    for key, want in (("s", s), ("mu", mu), ("logvar", logvar), ("by_run_s", s), ("eval_s", s), ("eval_mu", mu)):
        np.testing.assert_allclose(got[key], want, atol=1e-5, err_msg=key)
    assert got["swapped"].shape == (3, 1, 28, 28)
