"""k8s/job.yaml as the tests read it: its documents by kind, the Job's container and env, strict schema
validation (kubernetes-validate), the pod failure policy as the Job controller applies it, and the Jobs a
Kubernetes sweep renders from it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from disent.errors import ExitCode
from tests.support.train_helpers import ROOT

MANIFEST = ROOT / "k8s" / "job.yaml"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"



def documents() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {d["kind"]: d for d in docs}


def container(job: dict) -> dict:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def env_list(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def run_validate(*paths: Path, version: str | None = None) -> subprocess.CompletedProcess:
    if not VALIDATE.exists():
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]')")
    cmd = [str(VALIDATE), "--strict", *(["-k", version] if version else []), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def pod_failure_action(job: dict, exit_code: int, conditions: tuple[str, ...] = ()) -> str | None:
    """What the Job controller does with a pod whose container `train` ended with `exit_code` and that has
    the pod conditions `conditions` (status True): the action of the first podFailurePolicy rule that
    matches, as Kubernetes evaluates them (an exit code of 0 matches no onExitCodes rule), or None when no
    rule matches (Kubernetes then counts the failure: the policy leaves it to a default)."""
    (c,) = job["spec"]["template"]["spec"]["containers"]
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            req = rule["onExitCodes"]
            if req.get("containerName", c["name"]) != c["name"] or exit_code == 0:
                continue
            assert req["values"] == sorted(set(req["values"])), "Kubernetes wants the values sorted and unique"
            assert req["operator"] in ("In", "NotIn"), req
            if (exit_code in req["values"]) == (req["operator"] == "In"):
                return rule["action"]
        else:
            if any(p["type"] in conditions and p.get("status", "True") == "True" for p in rule["onPodConditions"]):
                return rule["action"]
    return None


def policy_by_code(job: dict) -> dict[int, str | None]:
    return {code: pod_failure_action(job, code) for code in range(1, 256)}


def expected_policy(code: int) -> str:
    """The one policy (docs/faults.md): 2 fails at once; 75 is not counted; any other failure is counted."""
    return {ExitCode.INPUT_ERROR: "FailJob", ExitCode.PREEMPTED: "Ignore"}.get(code, "Count")


def sweep_jobs(capsys) -> list[dict]:
    """The Jobs `disent sweep --backend k8s --dry-run` renders from k8s/job.yaml, one per point."""
    from disent.cli import main

    assert main(["sweep", str(ROOT / "configs" / "sprites.yaml"), "model.z_dim=8,16",
                 "data.url=s3://disent-data/sprites", "--tracking-uri", "http://mlflow.mlflow.svc:5000",
                 "--backend", "k8s", "--dry-run"]) == 0
    return [d for d in yaml.safe_load_all(capsys.readouterr().out) if d and d["kind"] == "Job"]
