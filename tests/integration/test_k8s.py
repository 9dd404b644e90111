"""k8s/job.yaml: strict schema validation offline, a sweep pod's shell, and the Job's pods run for real (its
launch contract and exit-code policy read in-process: tests/unit/test_k8s_manifest.py).

The pods test runs the Job's launch path on this machine: one launcher process per pod index,
each with the environment the Job gives its container (the env list of the manifest, the
DISENT_JOB_NAME the downward API resolves, JOB_COMPLETION_INDEX and HOSTNAME as Kubernetes sets
them). Nothing in the launcher is told it is a test:

* the "cluster network" is a private network namespace (`unshare --net`), so the manifest's
  fixed MASTER_PORT cannot collide with anything else on the machine;
* each pod has its own UTS and mount namespace: its own hostname (`disent-train-<i>`) and its
  own /etc/hosts, bind-mounted, holding what kubelet writes (its own name) and what cluster DNS
  answers for the headless Service (`disent-train-<j>.disent` -> 127.0.0.1). The launcher
  resolves MASTER_ADDR with the ordinary resolver, so the service name really is looked up.

Pod 0's record is published a moment after pod 1 starts, as the Service does once pod 0 exists:
pod 1's launcher must wait for the name rather than fail. After the manifest's `--` the pods run the
real trainer, `disent train configs/base.yaml <tiny overrides>` on tiny real shards, 2 pods x 2 ranks,
and the test checks what the run left behind. Needs root (namespaces); skipped otherwise.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.k8s import MANIFEST, container, documents, env_list, pod_failure_action, run_validate, sweep_jobs
from tests.support.launch_helpers import assert_finished, train_args
from tests.support.processes import wait_for
from tests.support.train_helpers import ROOT, complete_checkpoints


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize("version", [None, "1.30.0"])  # the newest schemas, and an older cluster
def test_every_manifest_validates_strictly(version):
    manifests = sorted((ROOT / "k8s").glob("*.yaml"))
    assert manifests
    result = run_validate(*manifests, version=version)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "did not validate" not in result.stdout


def test_strict_validation_catches_a_misspelt_field(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text(MANIFEST.read_text().replace("completionMode: Indexed", "completionmode: Indexed"))
    result = run_validate(bad)
    assert result.returncode != 0 and "completionmode" in result.stdout + result.stderr


# --------------------------------------------------------------------------- a sweep pod's shell


def test_a_sweep_pods_shell_passes_a_signal_death_on_as_its_exit_code(capsys, tmp_path):
    """A sweep's pod runs the template's command under /bin/sh (to mark the point as ended): a trainer
    that dies of SIGABRT leaves the container with exit code 134, which the Count rule matches."""
    (job, *_) = sweep_jobs(capsys)
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    script, argv0 = command[2], command[3]
    abort = [sys.executable, "-c", "import os, resource, signal; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
             "os.kill(os.getpid(), signal.SIGABRT)"]
    env = dict(os.environ, JOB_COMPLETION_INDEX="1")  # not pod 0: no sweep bookkeeping
    result = subprocess.run(["/bin/sh", "-c", script, argv0, *abort], env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 128 + 6
    assert pod_failure_action(job, result.returncode) == "Count"


# --------------------------------------------------------------------------- pods on one machine


def pod_environment(job: dict, index: int, *, nproc_per_node: int) -> dict[str, str]:
    """What the container of pod `index` sees: the manifest's env (downward API resolved), the
    variables Kubernetes adds, and PATH/HOME (from the image in a real pod; here this process's PATH
    plus the venv's bin for `disent`, appended: the same `ninja` as every other run on this machine,
    or torch would rebuild DeepSpeed's CPU comm op for the pods, and again for the next run)."""
    name = job["metadata"]["name"]
    env = {
        "PATH": f"{os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}:{Path(sys.executable).parent}",
        "HOME": os.environ.get("HOME", "/root"),
        "HOSTNAME": f"{name}-{index}",
        "JOB_COMPLETION_INDEX": str(index),
        "PYTHONPATH": str(ROOT),  # the image installs disent; this checkout is importable instead
    }
    for entry in container(job).get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            field = entry["valueFrom"]["fieldRef"]["fieldPath"]
            assert field == "metadata.labels['batch.kubernetes.io/job-name']", field
            env[entry["name"]] = name
    # No GPUs here: the Job's 8 GPUs per pod become `nproc_per_node` CPU ranks.
    env["DISENT_NPROC_PER_NODE"] = str(nproc_per_node)
    return env


def hosts_file(job: dict, service: str, index: int, publish: list[int]) -> str:
    name = job["metadata"]["name"]
    lines = ["127.0.0.1 localhost", f"127.0.0.1 {name}-{index}.{service}.default.svc.cluster.local {name}-{index}"]
    lines += [f"127.0.0.1 {name}-{j}.{service} {name}-{j}.{service}.default.svc.cluster.local" for j in publish]
    return "\n".join(lines) + "\n"


def namespaces_available() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "--net", "--mount", "--uts", "--fork", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.timeout(200)
@pytest.mark.skipif(not namespaces_available(), reason="needs root, unshare and ip for pod namespaces")
def test_pods_train_together_with_the_jobs_environment(tmp_path, tiny_data):
    docs = documents()
    job, service = docs["Job"], docs["Service"]["metadata"]["name"]
    nnodes = job["spec"]["completions"]
    nproc = 2 if nnodes <= 2 else 1  # 2 pods x 2 ranks: also the multi-GPU-pod path (launcher spawns)
    data = tiny_data
    run_dir, steps = tmp_path / "run", 4
    c = container(job)
    launcher_part = c["command"][: c["command"].index("--") + 1]
    train_part = c["command"][len(launcher_part):]
    assert launcher_part[0] == "python" and train_part[:2] == ["disent", "train"]
    # The manifest's command (`disent` found on the pod's PATH), with the config of a tiny run on
    # local shards instead of the ConfigMap's (multi-node GPU, S3, an MLflow server).
    command = [sys.executable, *launcher_part[1:], *train_part[:2],
               *train_args(run_dir, data, steps=steps, checkpoint_every=2)]

    name = job["metadata"]["name"]
    script = ["ip link set lo up"]  # runs in the private network namespace: the cluster network
    for i in range(nnodes):
        hosts = tmp_path / f"hosts-{i}"
        # Pod 0's DNS record appears only when the "Service" publishes it (below), except to pod 0.
        hosts.write_text(hosts_file(job, service, i, publish=[i] if i == 0 else []))
        env = pod_environment(job, i, nproc_per_node=nproc)
        pod_script = tmp_path / f"pod-{i}.sh"
        pod_script.write_text("\n".join([
            f"hostname {shlex.quote(env['HOSTNAME'])}",
            f"mount --bind {shlex.quote(str(hosts))} /etc/hosts",
            f"cd {shlex.quote(str(ROOT))}",
            "exec env -i " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " "
            + shlex.join(command),
        ]) + "\n")
        script.append(f"unshare --mount --uts sh -e {pod_script} > {tmp_path}/pod-{i}.log 2>&1 &")
        script.append(f"pid{i}=$!")
    script.append("sleep 3")  # then the Service publishes pod 0 to the others
    for i in range(1, nnodes):
        script.append(f"echo '127.0.0.1 {name}-0.{service}' >> {tmp_path}/hosts-{i}")
    script.append("rc=0")
    for i in range(nnodes):
        script.append(f"wait $pid{i}; code=$?; echo pod {i} exited $code; [ $code = 0 ] || rc=$code")
    script.append("exit $rc")
    result = subprocess.run(["unshare", "--net", "--fork", "bash", "-c", "\n".join(script)],
                            capture_output=True, text=True, timeout=180)
    logs = "\n".join(f"--- pod {i}\n" + (tmp_path / f"pod-{i}.log").read_text()[-4000:] for i in range(nnodes))
    assert result.returncode == 0, result.stdout + result.stderr + logs

    world = nnodes * nproc
    port = env_list(c)["MASTER_PORT"]["value"]
    pod0 = (tmp_path / "pod-0.log").read_text()
    assert "launcher: mode=kubernetes" in pod0, logs
    assert f" world={world} nodes={nnodes} ranks/node={nproc} master={name}-0.{service}:{port} " in pod0, logs
    assert "waiting for disent-train-0.disent to resolve" in (tmp_path / "pod-1.log").read_text(), logs
    assert f"disent: trained {steps} steps" in pod0, logs
    # every rank's part in each checkpoint, one FINISHED MLflow run with world_size 4
    assert_finished(run_dir, steps, world_size=world)
    assert complete_checkpoints(run_dir) == [2, 4]


def test_a_sweep_pods_shell_passes_sigterm_on_so_a_preempted_point_checkpoints_and_exits_75(capsys, tmp_path):
    """Kubernetes sends SIGTERM to the container's first process, the shell; a shell does not pass it on by itself,
    so the trainer would be SIGKILLed at the end of the grace period (137) instead of checkpointing (75)."""
    import signal

    (job, *_) = sweep_jobs(capsys)
    script, argv0 = job["spec"]["template"]["spec"]["containers"][0]["command"][2:4]
    ready = tmp_path / "ready"
    trainer = [sys.executable, "-c", "import pathlib, signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
               f"pathlib.Path({str(ready)!r}).write_text('up')\n"
               "time.sleep(60)\nsys.exit(1)\n"]
    env = dict(os.environ, JOB_COMPLETION_INDEX="1")
    shell = subprocess.Popen(["/bin/sh", "-c", script, argv0, *trainer], env=env, cwd=tmp_path)
    wait_for(ready.exists, 30, "the trainer to start", shell, poll=0.05)
    shell.send_signal(signal.SIGTERM)  # to the shell only, as the kubelet does
    assert shell.wait(timeout=30) == 75
    assert pod_failure_action(job, 75) == "Ignore"
