"""Secrets never leak; nothing from a config or a checkpoint is executed.

* Marker values are planted in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the real S3 server's
  identity, so they are used), AWS_SESSION_TOKEN, MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME and
  MLFLOW_TRACKING_PASSWORD; a 2-rank training (data on S3, checkpoints uploaded to S3, a real MLflow
  server, evaluation grids) and `disent eval` run; then every file in run_dir, every MLflow param,
  tag, metric key and artifact, and all output are scanned for the markers.
* A secret passed by config (user:password@ in tracking.uri or an s3 URL) is refused before anything
  is written, and the message does not repeat it.
* YAML is loaded safely; our checkpoint files and DeepSpeed's are loaded with weights_only=True; a
  tampered checkpoint named by --resume is refused without running anything.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from tests.support.faultkit import BASE, base_env, finish, launch, mlflow_runs
from tests.support.processes import stop
from tests.support.train_helpers import ROOT, tiny_overrides

from disent.checkpoint import CheckpointError, CheckpointManager, safe_torch_load

MARK = uuid.uuid4().hex[:10]
SESSION_TOKEN = f"SESSIONTOKENMARKER{MARK}"
MLFLOW_TOKEN = f"MLFLOWTOKENMARKER{MARK}"
MLFLOW_USER = f"mlflowuser{MARK}"
MLFLOW_PASSWORD = f"MLFLOWPASSWORDMARKER{MARK}"


def scan(markers: list[str], texts: dict[str, str | bytes]) -> list[str]:
    """'where: marker' for every marker found."""
    found = []
    for where, text in texts.items():
        data = text.encode() if isinstance(text, str) else text
        for marker in markers:
            if marker.encode() in data:
                found.append(f"{where}: {marker}")
    return found


def tree(root: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{p.relative_to(root)}": p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


@pytest.mark.slow
def test_planted_secrets_never_appear_in_logs_mlflow_artifacts_or_files(tmp_path, tiny_data, s3_server, mlflow_server):
    bucket = s3_server.create_bucket("secrets-" + uuid.uuid4().hex[:8])
    s3 = s3_server.client()
    for f in Path(tiny_data).rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), bucket[len("s3://"):], f"data/{f.relative_to(tiny_data).as_posix()}")
    markers = [s3_server.access_key, s3_server.secret_key, SESSION_TOKEN, MLFLOW_TOKEN, MLFLOW_PASSWORD]
    env = {**s3_server.env(), "MLFLOW_TRACKING_TOKEN": MLFLOW_TOKEN, "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
           "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    experiment = "secrets-" + MARK
    extra = {"train.steps": 6, "train.eval_every": 3, "train.checkpoint_every": 3, "tracking.uri": mlflow_server,
             "tracking.experiment": experiment, "train.checkpoint_upload_url": f"{bucket}/ckpt",
             "tracking.run_name": "null"}
    proc, log = launch(run, f"{bucket}/data", extra=extra, env=env)
    try:
        rc = finish(proc, 300)
    finally:
        stop(proc)
    train_log = log.read_text(errors="replace")
    assert rc == 0, train_log[-4000:]
    evaluated = subprocess.run([sys.executable, "-m", "disent.cli", "eval", str(run), "eval.max_test_samples=50"],
                               cwd=ROOT, env=base_env(**env), capture_output=True, text=True, timeout=240)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    # the session token only matters to S3 on an error path: a wrong secret plus a token, refused
    refused = subprocess.run(
        [sys.executable, "-m", "disent.cli", "train", BASE, *tiny_overrides(tmp_path / "refused", f"{bucket}/data")],
        cwd=ROOT, env=base_env(**{**env, "AWS_SECRET_ACCESS_KEY": f"WRONGSECRETMARKER{MARK}",
                                  "AWS_SESSION_TOKEN": SESSION_TOKEN, "DISENT_S3_RETRIES": "0"}),
        capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "access denied" in refused.stderr, refused.stderr[-3000:]
    markers.append(f"WRONGSECRETMARKER{MARK}")

    client, runs = mlflow_runs(mlflow_server, experiment)
    assert len(runs) == 1
    r = runs[0]
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    client.download_artifacts(r.info.run_id, "", str(artifacts))
    assert (artifacts / "config" / "config.yaml").is_file() and list(artifacts.glob("eval/step-*/*.png"))
    uploaded = {o["Key"]: s3.get_object(Bucket=bucket[5:], Key=o["Key"])["Body"].read()
                for o in s3.list_objects_v2(Bucket=bucket[5:], Prefix="ckpt/").get("Contents", [])}
    assert any(k.endswith("/COMPLETE") for k in uploaded)
    texts: dict[str, str | bytes] = {
        "training output": train_log, "eval output": evaluated.stdout + evaluated.stderr,
        "refused output": refused.stdout + refused.stderr,
        "mlflow params": json.dumps(r.data.params), "mlflow tags": json.dumps(r.data.tags),
        "mlflow metric keys": json.dumps(sorted(r.data.metrics)), "mlflow run name": r.info.run_name or "",
        **tree(run, "run_dir"), **tree(artifacts, "mlflow artifacts"),
        **{f"s3 {k}": v for k, v in uploaded.items()},
    }
    assert len(texts) > 30
    assert scan(markers + [MLFLOW_USER], texts) == []
    # the run is complete and evaluated: the scan looked at real output
    assert r.data.params["data.url"] == f"{bucket}/data" and "eval/class_from_s_linear" in r.data.metrics


@pytest.mark.parametrize("override", [
    "tracking.uri=http://user:{secret}@127.0.0.1:5000",
    "data.url=s3://AKIAKEY:{secret}@bucket/data",
    "train.checkpoint_upload_url=s3://key:{secret}@bucket/ckpt",
])
def test_a_secret_in_a_config_url_is_refused_and_not_repeated(tmp_path, tiny_data, override):
    secret = f"CONFIGSECRETMARKER{MARK}"
    result = subprocess.run(
        [sys.executable, "-m", "disent.cli", "train", BASE, *tiny_overrides(tmp_path / "run", tiny_data),
         override.format(secret=secret)],
        cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "holds credentials in its URL" in result.stderr, result.stderr[-2000:]
    assert "***@" in result.stderr and "Traceback" not in result.stderr
    assert secret not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


def test_yaml_with_python_tags_is_refused_without_running_anything(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\ndata: {{url: x}}\n")
    result = subprocess.run([sys.executable, "-m", "disent.cli", "train", str(evil)], cwd=ROOT, env=base_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not valid YAML" in result.stderr
    assert not marker.exists()


def test_no_unsafe_loaders_in_the_code():
    """Every YAML load is safe_load; every torch.load says weights_only=True (or goes through
    safe_torch_load); nothing unpickles directly."""
    bad = []
    for path in [*ROOT.joinpath("disent").rglob("*.py"), *ROOT.joinpath("launcher").rglob("*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"yaml\.(load|unsafe_load|full_load)\(|pickle\.loads?\(|weights_only=False|allow_pickle=True",
                         code):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert bad == []


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_checkpoint_file_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"step": _Evil(marker)}, evil)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        safe_torch_load(evil)
    assert not marker.exists()

    # a complete checkpoint whose trainer file is tampered with
    from tests.support.fake_checkpoint import fake_parts, save

    mgr = CheckpointManager(tmp_path / "run")
    path = save(mgr, 3)
    torch.save({"step": _Evil(marker)}, path / "trainer-rank0.pt")
    with pytest.raises(CheckpointError, match="trainer-rank0.pt cannot be loaded safely"):
        mgr.load(mgr.latest_complete(), fake_parts())
    assert not marker.exists()


@pytest.mark.slow
def test_resume_from_a_tampered_deepspeed_checkpoint_runs_nothing(tmp_path, tiny_data):
    """DeepSpeed 0.19.8 loads its own files with weights_only=False; our loads go through safe_torch_load."""
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    overrides = tiny_overrides(run, tiny_data)
    from disent.config import load_config, to_dict

    ckpt = run / "checkpoints" / "step-00000003"
    for tag in ("vae", "disc"):
        (ckpt / tag).mkdir(parents=True)
        torch.save({"module": _Evil(marker)}, ckpt / tag / "mp_rank_00_model_states.pt")
    torch.save({"step": _Evil(marker)}, ckpt / "trainer-rank0.pt")
    cfg = load_config(ROOT / BASE, overrides)
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "world_size": 1, "mlflow_run_id": None,
                                                "config": to_dict(cfg)}))
    (ckpt / "COMPLETE").write_text("3\n")
    result = subprocess.run([sys.executable, "-m", "disent.cli", "train", BASE, *overrides, "--resume", str(ckpt)],
                            cwd=ROOT, env=base_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "mp_rank_00_model_states.pt cannot be loaded safely" in result.stderr, result.stderr[-3000:]
    assert not marker.exists()


def test_a_resume_path_is_never_executed(tmp_path, tiny_data):
    marker = tmp_path / "pwned"
    result = subprocess.run(
        [sys.executable, "-m", "disent.cli", "train", BASE, *tiny_overrides(tmp_path / "run", tiny_data),
         "--resume", f"{tmp_path}/step-00000001; touch {marker}", "--resume", f"$(touch {marker})"],
        cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--resume" in result.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_credentials_in_the_tracking_uri_environment_variable_do_not_leak(tmp_path, tiny_data, mlflow_server):
    secret = f"ENVURISECRETMARKER{MARK}"
    uri = mlflow_server.replace("http://", f"http://user:{secret}@")
    result = subprocess.run(
        [sys.executable, "-m", "disent.cli", "train", BASE,
         *tiny_overrides(tmp_path / "run", tiny_data, **{"tracking.uri": "null", "tracking.experiment": "envuri"})],
        cwd=ROOT, env=base_env(OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
        timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert scan([secret], {"output": result.stdout + result.stderr, **tree(tmp_path / "run", "run_dir")}) == []
