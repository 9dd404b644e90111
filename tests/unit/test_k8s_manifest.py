"""k8s/job.yaml read as Kubernetes reads it, in-process: its launch contract, its exit-code policy (also in the
Jobs a sweep renders) and its ConfigMap's config. Strict schema validation and the pods run for real:
tests/integration/test_k8s.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from disent.errors import ExitCode
from tests.support.k8s import (
    container,
    documents,
    env_list,
    expected_policy,
    pod_failure_action,
    policy_by_code,
    sweep_jobs,
)
from tests.support.train_helpers import ROOT


# --------------------------------------------------------------------------- contract


def test_job_contract():
    docs = documents()
    job, service, config_map = docs["Job"], docs["Service"], docs["ConfigMap"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    c = container(job)
    env = env_list(c)

    # Indexed Job, one pod per node; the launcher learns the node count from DISENT_NNODES.
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["DISENT_NNODES"]["value"])
    # Headless Service selecting the Job's pods; pods live in its subdomain -> <job>-<i>.<service>.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert pod["subdomain"] == service["metadata"]["name"] == env["DISENT_SERVICE"]["value"]
    assert env["DISENT_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['batch.kubernetes.io/job-name']"
    assert int(env["MASTER_PORT"]["value"]) in [p["port"] for p in service["spec"]["ports"]]
    # Each pod runs the launcher, one rank per GPU requested.
    assert c["command"][:3] == ["python", "-m", "launcher"] and "--" in c["command"]
    # Ranks that outlive SIGTERM are killed by the launcher (a retried 137) before the kubelet kills the pod.
    grace = float(c["command"][c["command"].index("--grace") + 1])
    assert 0 < grace <= pod["terminationGracePeriodSeconds"] - 15
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) == int(env["DISENT_NPROC_PER_NODE"]["value"]) >= 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    # The config comes from the ConfigMap in the same file, mounted where the command reads it.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_path = Path(c["command"][-1])
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_path.parent == Path(mounts["config"]) and config_path.name in config_map["data"]
    # Credentials only by Secret reference: nothing secret-looking has an inline value.
    assert any("secretRef" in e for e in c["envFrom"])
    for name, e in env.items():
        if any(word in name.upper() for word in ("KEY", "SECRET", "TOKEN", "PASSWORD")):
            assert "value" not in e, f"{name} is inline; use the Secret"
    # /dev/shm is memory; checkpoints on a shared volume that holds run_dir.
    assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    claim = volumes["checkpoints"]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert "ReadWriteMany" in docs["PersistentVolumeClaim"]["spec"]["accessModes"]
    train_yaml = yaml.safe_load(config_map["data"][config_path.name])
    assert Path(train_yaml["run_dir"]).is_relative_to(mounts["checkpoints"])
    # Restarts: failed pods are replaced and resume (the exit codes: test_pod_failure_policy_*).
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] >= spec["completions"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    # NCCL: a lost peer raises in Python (the trainer exits 69) instead of a SIGABRT (134).
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "2"


def test_the_configmaps_batch_fits_the_pods_and_gpus_and_a_missed_edit_is_refused(tmp_path):
    """Scaling takes completions, parallelism, DISENT_NNODES and the ConfigMap's global batch together; the config
    pins the per-GPU batch (train.batch_per_rank), so the shipped numbers agree and a missed edit is an input error."""
    from disent.config import ConfigError, load_config, micro_batch_size
    from tests.support.train_helpers import shipped_configs

    job = documents()["Job"]
    env = env_list(container(job))
    ranks = int(env["DISENT_NNODES"]["value"]) * int(env["DISENT_NPROC_PER_NODE"]["value"])
    cfg = load_config(shipped_configs(tmp_path)["k8s:train.yaml"])
    assert cfg.train.batch_per_rank == 256 and micro_batch_size(cfg, ranks) * cfg.train.grad_accum == 256
    with pytest.raises(ConfigError, match="launch 16 ranks .*completions, parallelism and DISENT_NNODES"):
        micro_batch_size(cfg, 2 * ranks)  # completions doubled, the ConfigMap's batch left as it was


# --------------------------------------------------------------------------- exit codes


def test_pod_failure_policy_is_the_one_exit_code_policy(capsys):
    """Every failing exit code of the container, 1 to 255, meets an explicit rule: 2 (input error) FailJob;
    75 (preempted) Ignore; everything else Count against backoffLimit: 69, a crash (1), and the signal
    deaths a lost NCCL peer ends in (134 SIGABRT, 137 SIGKILL, 143 SIGTERM). The same for the Jobs a
    Kubernetes sweep renders from the template."""
    for job in [documents()["Job"], *sweep_jobs(capsys)]:
        name = job["metadata"]["name"]
        actions = policy_by_code(job)
        assert None not in actions.values(), [c for c, a in actions.items() if a is None]  # no code left to a default
        assert actions == {code: expected_policy(code) for code in range(1, 256)}, name
        for code in (ExitCode.RETRYABLE, 1, 128 + 6, 128 + 9, 128 + 15):
            assert actions[code] == "Count", (name, code)
        assert job["spec"]["backoffLimit"] >= 1
        # A pod the cluster disrupted (drain, eviction, preemption) is not counted, even when it was
        # killed after its grace period (137) rather than exiting 75.
        for code in (ExitCode.PREEMPTED, 128 + 9, 128 + 15, ExitCode.RETRYABLE):
            assert pod_failure_action(job, code, ("DisruptionTarget",)) == "Ignore", (name, code)
        assert pod_failure_action(job, ExitCode.INPUT_ERROR, ("DisruptionTarget",)) == "FailJob"


def test_pod_failure_policy_reads_a_changed_manifest_correctly():
    """The policy reader itself: a manifest whose catch-all rule is gone leaves codes to the default."""
    job = documents()["Job"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    job["spec"]["podFailurePolicy"]["rules"] = [r for r in rules if r["action"] != "Count"]
    actions = policy_by_code(job)
    assert actions[ExitCode.INPUT_ERROR] == "FailJob" and actions[ExitCode.PREEMPTED] == "Ignore"
    assert actions[ExitCode.RETRYABLE] is None and actions[134] is None


# --------------------------------------------------------------------------- the ConfigMap


def test_configmap_config_is_valid_against_the_image_layout(tmp_path):
    """The ConfigMap's config loads with disent's validator once /app (the image's WORKDIR) is this repo."""
    from disent.config import load_config

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY configs ./configs" in dockerfile
    for needed in ("disent", "launcher", "pyproject.toml"):
        assert needed in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"disent", "launcher", "configs", "pyproject.toml"} & set(ignored)
    docs = documents()
    image = container(docs["Job"])["image"]
    assert image.split("/")[-1].startswith("disent:")
    text = next(iter(docs["ConfigMap"]["data"].values()))
    assert "/app/configs/" in text
    local = tmp_path / "train.yaml"
    local.write_text(text.replace("/app/configs/", f"{ROOT}/configs/"))
    cfg = load_config(local)
    assert cfg.run_dir.startswith("/checkpoints/")
