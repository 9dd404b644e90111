"""Where a sweep's points run: one after another here (or N at a time), as one Slurm job array, or as
one Kubernetes Indexed Job each. Every point is a normal training job with its point's overrides, so
checkpoints, preemption and requeueing work per point as they do for a single run."""
from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from disent.config import ConfigError
from disent.sweep.points import Sweep

ROOT = Path(__file__).resolve().parents[2]
SWEEP_ENV = "DISENT_SWEEP"  # slurm/train.sh: the sweep file whose point SLURM_ARRAY_TASK_ID runs


def point_overrides(sweep: Sweep, index: int, parent_id: str, run_dir: str) -> list[str]:
    """Everything a point's training run gets on top of the config."""
    point = sweep.points()[index]
    return [*sweep.overrides(point), f"tracking.parent_run_id={parent_id}",
            f"tracking.run_name={sweep.label(point)}", f"run_dir={run_dir}/point-{index:03d}"]


# --------------------------------------------------------------------------- local


def run_local(sweep: Sweep, parent_id: str, run_dir: str, nproc: int | None, parallel: int,
              echo=print) -> list[int]:
    """Each point through the launcher, `parallel` at a time; their exit codes, in point order."""
    commands = []
    for index in range(len(sweep.points())):
        launcher = [sys.executable, "-m", "launcher", *(["--nproc", str(nproc)] if nproc else []), "--"]
        commands.append([*launcher, sys.executable, "-m", "disent.cli", "train", sweep.config,
                         *point_overrides(sweep, index, parent_id, run_dir)])
    codes: dict[int, int] = {}
    running: dict[int, subprocess.Popen] = {}
    waiting = list(range(len(commands)))
    while waiting or running:
        while waiting and len(running) < max(1, parallel):
            index = waiting.pop(0)
            echo(f"disent sweep: point {index + 1}/{len(commands)}: {sweep.label(sweep.points()[index])}")
            running[index] = subprocess.Popen(commands[index], cwd=os.getcwd())
        for index, proc in list(running.items()):
            if proc.poll() is not None:
                codes[index] = proc.returncode
                del running[index]
                echo(f"disent sweep: point {index + 1} exited {proc.returncode}")
        time.sleep(0.2)
    return [codes[i] for i in range(len(commands))]


# --------------------------------------------------------------------------- Slurm


def slurm_command(size: int, sbatch_args: list[str], config: str) -> list[str]:
    """The job array's sbatch command (the sweep file goes to the tasks in $DISENT_SWEEP)."""
    return ["sbatch", "--parsable", f"--array=0-{size - 1}", *sbatch_args, str(ROOT / "slurm" / "train.sh"), config]


def submit_slurm(sweep: Sweep, sweep_file: Path, sbatch_args: list[str], echo=print) -> str:
    """One job array; task i runs point i (slurm/train.sh reads it from the sweep file). The job id."""
    command = slurm_command(len(sweep.points()), sbatch_args, sweep.config)
    env = {**os.environ, SWEEP_ENV: str(sweep_file)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise ConfigError(f"`{shlex.join(command)}` failed ({result.returncode}): {result.stderr.strip()}")
    job = result.stdout.strip().split(";")[0]
    echo(f"disent sweep: submitted job array {job} ({len(sweep.points())} tasks)")
    return job


# --------------------------------------------------------------------------- Kubernetes


def _slug(text: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].strip("-")


def k8s_manifests(sweep: Sweep, template: Path, parent_id: str, run_dir: str, name: str) -> list[dict]:
    """template's shared objects (ConfigMap, volume claim) once, then per point a headless Service and an
    Indexed Job named <name>-<i>, whose command adds the point's overrides."""
    import yaml

    docs = [d for d in yaml.safe_load_all(template.read_text()) if d]
    job = next((d for d in docs if d.get("kind") == "Job"), None)
    service = next((d for d in docs if d.get("kind") == "Service"), None)
    if job is None or service is None:
        raise ConfigError(f"{template} must hold a Job and its headless Service (as k8s/job.yaml does)")
    shared = [d for d in docs if d is not job and d is not service]
    base = _slug(name, 40) or "disent-sweep"
    out = list(shared)
    for index in range(len(sweep.points())):
        point_name = f"{base}-{index}"
        svc = copy.deepcopy(service)
        svc["metadata"]["name"] = point_name
        svc["spec"]["selector"] = {"batch.kubernetes.io/job-name": point_name}
        pod_job = copy.deepcopy(job)
        pod_job["metadata"]["name"] = point_name
        pod_job["metadata"].setdefault("labels", {})["disent/sweep"] = base
        spec = pod_job["spec"]["template"]["spec"]
        spec["subdomain"] = point_name
        container = spec["containers"][0]
        container["command"] = [*container["command"], *point_overrides(sweep, index, parent_id, run_dir)]
        for env in container.get("env", []):
            if env.get("name") == "DISENT_SERVICE":
                env["value"] = point_name
        out += [svc, pod_job]
    return out


def render_k8s(manifests: list[dict]) -> str:
    import yaml

    return "---\n".join(yaml.safe_dump(m, sort_keys=False) for m in manifests)


def apply_k8s(text: str, echo=print) -> None:
    result = subprocess.run(["kubectl", "apply", "-f", "-"], input=text, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"kubectl apply failed ({result.returncode}): {result.stderr.strip()}")
    echo(result.stdout.strip())
