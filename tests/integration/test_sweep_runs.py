"""`disent sweep` for real: the Kubernetes manifests it renders validated strictly; a 2-point local sweep against a
real `mlflow server` (parent run, two children, summary CSV and plot); a Kubernetes sweep's point trained in its
pod's command. Points, names and input checks in-process: tests/unit/test_sweep.py. The Slurm job array is in
test_slurm.py."""
from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import yaml

from disent.cli import main
from tests.support.k8s import run_validate
from tests.support.train_helpers import ROOT, make_tiny_data, tiny_overrides

CONFIG = "configs/base.yaml"


def test_k8s_sweep_renders_one_valid_indexed_job_per_point(tmp_path, capsys):
    assert main(["sweep", "configs/sprites.yaml", "loss.adversarial=0.01,0.05", "model.z_dim=8,16",
                 "data.url=s3://disent-data/sprites", "--tracking-uri", "http://mlflow.mlflow.svc:5000",
                 "--backend", "k8s", "--dry-run"]) == 0
    manifests = capsys.readouterr().out  # the manifests alone: `... --dry-run > sweep.yaml` is valid YAML
    docs = [d for d in yaml.safe_load_all(manifests) if d]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    jobs = [d for d in docs if d["kind"] == "Job"]
    services = [d for d in docs if d["kind"] == "Service"]
    assert len(jobs) == len(services) == 4 and {d["kind"] for d in docs} >= {"ConfigMap", "PersistentVolumeClaim"}
    for job, service in zip(jobs, services):
        name = job["metadata"]["name"]
        spec = job["spec"]["template"]["spec"]
        assert service["metadata"]["name"] == spec["subdomain"] == name
        assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
        command = spec["containers"][0]["command"]
        assert "tracking.parent_run_id=PARENT_RUN_ID" in command and any(c.startswith("model.z_dim=") for c in command)
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["DISENT_SERVICE"] == name
        assert any(c.startswith("run_dir=/checkpoints/sweep-sprites-") for c in command)  # on the shared claim
        (config_volume,) = [v for v in spec["volumes"] if "configMap" in v]
        assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]
    # The pods train the sprites config as resolved here, not the template's own ConfigMap (Fashion-MNIST).
    shipped = yaml.safe_load(config_map["data"]["train.yaml"])
    assert shipped["name"] == "sprites" and shipped["data"]["channels"] == 3 and "extends" not in shipped
    assert json.loads(config_map["data"]["sweep.json"])["sweep"]["axes"]["model.z_dim"] == ["8", "16"]
    path = tmp_path / "sweep.yaml"
    path.write_text(manifests)
    result = run_validate(path)
    assert result.returncode == 0 and "did not validate" not in result.stdout, result.stdout + result.stderr


def test_a_local_sweep_makes_a_parent_with_two_labelled_children_and_a_summary(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    shards = make_tiny_data(tmp_path / "data")
    fixed = [o for o in tiny_overrides(tmp_path / "unused", shards, **{"tracking.experiment": "sweep-test",
                                                                       "train.steps": 4, "tracking.log_model": True})
             if not o.startswith(("run_dir=", "tracking.uri=", "tracking.run_name="))]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "disent.cli", "sweep", CONFIG, *fixed, "loss.adversarial=0.01,0.05",
           "--tracking-uri", mlflow_server, "--run-dir", str(tmp_path / "sweep"), "--name", "tiny sweep", "--parallel", "2", "--nproc", "1",
           "--register-best", "tiny-sweep-best"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("sweep-test")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`disent.kind` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny sweep"
    assert parent.data.params["sweep.axis.loss.adversarial"] == "0.01,0.05"
    kids = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(k.info.run_name for k in kids) == ["loss.adversarial=0.01", "loss.adversarial=0.05"]
    assert all(k.info.status == "FINISHED" and "eval/class_from_s_mlp" in k.data.metrics for k in kids)
    assert {k.data.params["loss.adversarial"] for k in kids} == {"0.01", "0.05"}
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert names == {"summary/summary.csv", "summary/leakage.png"}
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "summary" / "summary.csv")))
    assert [r["label"] for r in rows] == ["loss.adversarial=0.01", "loss.adversarial=0.05"]
    assert all(0 <= float(r["class_from_s"]) <= 1 and 0 <= float(r["class_from_mu"]) <= 1 for r in rows)
    png = Path(tmp_path / "sweep" / "summary" / "leakage.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # The best child (class from s minus class from mu) is tagged on the parent and registered by name.
    best = max(rows, key=lambda r: float(r["score"]))
    parent = client.get_run(parent.info.run_id)
    assert parent.data.tags["disent.sweep.best_run"] == best["run_id"]
    (version,) = client.search_model_versions("name='tiny-sweep-best'")
    assert version.run_id == best["run_id"]
    assert "load it with disent.load('models:/tiny-sweep-best/latest')" in result.stderr
    # Summarised again (`disent sweep --summarize`): the same best child, no second version of it.
    from disent.sweep.summary import summarize

    assert summarize(mlflow_server, parent.info.run_id)["best"]["version"] == version.version
    assert len(client.search_model_versions("name='tiny-sweep-best'")) == 1


def test_a_k8s_sweep_point_trains_in_its_pod_and_the_last_point_summarises(tmp_path, mlflow_server):
    """A real sweep with --backend k8s: the parent run is created and the manifests go to `kubectl apply`
    (there is no cluster here: the kubectl on PATH keeps them). Then the Job's pod runs its container
    command as written, with the pod's volumes at temporary paths (/etc/disent holds the ConfigMap's
    files, /checkpoints the volume claim). The Kubernetes launch path itself is in test_k8s.py."""
    from mlflow.tracking import MlflowClient

    volume = tmp_path / "checkpoints"
    shards = make_tiny_data(volume / "data")
    fixed = [o for o in tiny_overrides("unused", f"/checkpoints/{shards.relative_to(volume)}", **{"tracking.experiment": "k8s-sweep",
                                                                        "train.steps": 4})
             if not o.startswith(("run_dir=", "tracking.uri=", "tracking.run_name="))]
    bin_dir, applied = tmp_path / "bin", tmp_path / "applied.yaml"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(f'#!/bin/sh\ncat > {applied}\necho "job.batch/sweep created"\n')
    (bin_dir / "kubectl").chmod(stat.S_IRWXU)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "disent.cli", "sweep", CONFIG, *fixed, "loss.adversarial=0.05", "--backend", "k8s",
           "--tracking-uri", mlflow_server, "--run-dir", "/checkpoints/sweep", "--name", "k8s sweep"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    docs = [d for d in yaml.safe_load_all(applied.read_text()) if d]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    etc = tmp_path / "etc-disent"
    etc.mkdir()

    def in_pod(text: str) -> str:
        return text.replace("/etc/disent", str(etc)).replace("/checkpoints", str(volume))

    for key, text in config_map["data"].items():
        (etc / key).write_text(in_pod(text))
    command = [in_pod(part) for part in job["spec"]["template"]["spec"]["containers"][0]["command"]]
    # Without JOB_COMPLETION_INDEX the launcher starts its ranks here (no pod DNS); the command's own
    # check reads it as pod 0, the pod that marks its point as ended.
    pod = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert pod.returncode == 0, pod.stdout[-2000:] + pod.stderr[-3000:]
    assert "disent sweep: summarised" in pod.stderr

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("k8s-sweep")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`disent.kind` = 'sweep'")
    (child,) = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == child.info.status == "FINISHED"
    assert child.data.params["loss.adversarial"] == "0.05" and child.data.params["model.base_channels"] == "8"
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert names == {"summary/summary.csv", "summary/leakage.png"}
    assert (volume / "sweep" / "point-000" / "checkpoints").is_dir() and (volume / "sweep" / "summarised").exists()
