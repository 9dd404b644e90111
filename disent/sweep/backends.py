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

import yaml

from disent.config import ConfigError
from disent.errors import ExitCode
from disent.sweep.points import Sweep

ROOT = Path(__file__).resolve().parents[2]
# A wheel carries copies of the checkout's slurm/train.sh and k8s/job.yaml here (setup.py's build step).
SHIPPED = Path(__file__).resolve().parent / "templates"
SWEEP_ENV = "DISENT_SWEEP"  # slurm/train.sh: the sweep file whose point SLURM_ARRAY_TASK_ID runs
TEMPLATE_FLAGS = {"slurm/train.sh": "--slurm-script", "k8s/job.yaml": "--k8s-template"}


def template(relative: str, given: str | None = None) -> Path:
    """The file a backend is made from: `given` (its flag's value), else the copy an installed wheel ships,
    else the checkout's (a source tree or an editable install). Refused, naming the flag, when missing."""
    flag = TEMPLATE_FLAGS[relative]
    if given is not None:
        if not Path(given).is_file():
            raise ConfigError(f"{flag} {given}: no such file")
        return Path(given)
    for candidate in (SHIPPED / relative, ROOT / relative):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{relative} is not installed with disent (looked for {SHIPPED / relative} and "
                      f"{ROOT / relative}); pass {flag} PATH (the file is in the disent-adversarial repository)")


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


def slurm_command(size: int, sbatch_args: list[str], config: str, script: str | None = None) -> list[str]:
    """The job array's sbatch command (the sweep file goes to the tasks in $DISENT_SWEEP); `script`:
    --slurm-script, else slurm/train.sh as shipped."""
    return ["sbatch", "--parsable", f"--array=0-{size - 1}", *sbatch_args, str(template("slurm/train.sh", script)),
            config]


def submit_slurm(sweep: Sweep, sweep_file: Path, sbatch_args: list[str], echo=print, script: str | None = None
                 ) -> str:
    """One job array; task i runs point i (slurm/train.sh reads it from the sweep file). The job id."""
    command = slurm_command(len(sweep.points()), sbatch_args, sweep.config, script)
    env = {**os.environ, SWEEP_ENV: str(sweep_file)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise ConfigError(f"`{shlex.join(command)}` failed ({result.returncode}): {result.stderr.strip()}")
    job = result.stdout.strip().split(";")[0]
    echo(f"disent sweep: submitted job array {job} ({len(sweep.points())} tasks)")
    return job


# --------------------------------------------------------------------------- Kubernetes

SWEEP_FILE_NAME = "sweep.json"  # beside the config in the sweep's ConfigMap


def _slug(text: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].strip("-")


def read_k8s_template(template: Path) -> tuple[list[dict], dict, dict]:
    """(shared objects, headless Service, Job) of a template shaped like k8s/job.yaml."""
    docs = [d for d in yaml.safe_load_all(template.read_text()) if d]
    job = next((d for d in docs if d.get("kind") == "Job"), None)
    service = next((d for d in docs if d.get("kind") == "Service"), None)
    if job is None or service is None:
        raise ConfigError(f"{template} must hold a Job and its headless Service (as k8s/job.yaml does)")
    return [d for d in docs if d is not job and d is not service], service, job


def _config_volume(template: Path, job: dict) -> tuple[dict, str]:
    """The pod's ConfigMap volume, and the path of the config file the container trains."""
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    volumes = {v["name"]: v for v in spec.get("volumes", []) if "configMap" in v}
    for mount in container.get("volumeMounts", []):
        if mount["name"] in volumes:
            prefix = mount["mountPath"].rstrip("/") + "/"
            config = next((a for a in container["command"] if a.startswith(prefix)), None)
            if config:
                return volumes[mount["name"]], config
    raise ConfigError(f"{template}: the Job's container must train a config file from a mounted ConfigMap "
                      f"(as k8s/job.yaml trains /etc/disent/train.yaml); the sweep ships its config there")


def k8s_run_dir(template: Path, requested: str | None, folder: str, uri: str, data_url: str) -> str:
    """The sweep's run_dir (requested, or <the first volume claim's mount>/folder), with what a point's
    pods must reach checked before anything is submitted: that run_dir on a volume claim (checkpoints
    survive a pod, and the points' end markers meet), a tracking server (every pod writes the same MLflow
    store) and data that is not on this machine's disk."""
    _, _, job = read_k8s_template(template)
    spec = job["spec"]["template"]["spec"]
    claims = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
    mounts = [m["mountPath"].rstrip("/") for m in spec["containers"][0].get("volumeMounts", []) if m["name"] in claims]
    if not mounts:
        raise ConfigError(f"{template}: the Job's container mounts no persistent volume claim; a sweep's run_dir "
                          "must be on one that every pod of every point mounts (as k8s/job.yaml mounts /checkpoints)")

    def on_claim(path: str) -> bool:
        return any(path == m or path.startswith(m + "/") for m in mounts)

    run_dir = requested or f"{mounts[0]}/{folder}"
    if not on_claim(run_dir):
        raise ConfigError(f"--run-dir {run_dir} is not on a volume claim the pods of {template} mount "
                          f"({', '.join(mounts)}); give --run-dir under one of them")
    if not uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(f"tracking URI {uri!r} is local to this machine; a Kubernetes sweep needs an MLflow "
                          "server this machine and the pods both reach: --tracking-uri http://HOST:PORT")
    if "://" not in data_url and not on_claim(data_url):
        raise ConfigError(f"data.url={data_url} is a path on this machine's disk, which the pods do not see; "
                          f"give data.url=s3://BUCKET/PREFIX (or a path under {', '.join(mounts)})")
    return run_dir


def _pod_command(command: list[str], overrides: list[str], sweep_file: str, index: int, parent_id: str) -> list[str]:
    """The template's command with the point's overrides, in a shell that marks the point as ended for
    good (exit 0, or an input error, which fails the Job) from pod 0; the last point to end summarises.
    A preempted or retryable exit is not an end: the Job replaces the pod and the point goes on.
    The shell is the container's first process, which gets Kubernetes' SIGTERM: it passes SIGTERM and
    SIGUSR1 on to the command (a shell does not by itself), so a preempted point checkpoints and exits 75."""
    python = command[0] if "python" in command[0] else "python3"
    ended = f'[ "$rc" -eq {int(ExitCode.OK)} ] || [ "$rc" -eq {int(ExitCode.INPUT_ERROR)} ]'
    script = ('"$@" & child=$!\n'
              'trap \'kill -TERM "$child" 2>/dev/null\' TERM\n'
              'trap \'kill -USR1 "$child" 2>/dev/null\' USR1\n'
              # a trapped signal ends `wait` early: wait again until the command itself has exited
              'while :; do wait "$child"; rc=$?; kill -0 "$child" 2>/dev/null || break; done\n'
              f'if [ "${{JOB_COMPLETION_INDEX:-0}}" = 0 ] && {{ {ended}; }}; then\n'
              f'  {python} -m disent.cli sweep --finish-if-complete {sweep_file} --point {index} '
              f'|| echo "the sweep summary failed; run disent sweep --summarize {parent_id}" >/dev/stderr\n'
              f'fi\nexit "$rc"\n')
    return ["/bin/sh", "-c", script, "disent-sweep-point", *command, *overrides]


def k8s_manifests(sweep: Sweep, template: Path, parent_id: str, run_dir: str, name: str, config_yaml: str,
                  sweep_record: str) -> list[dict]:
    """template's shared objects once (its config ConfigMap replaced by one holding the sweep's resolved
    config and sweep file), then per point a headless Service and an Indexed Job named <name>-<i>,
    training that config with the point's overrides."""
    shared, service, job = read_k8s_template(template)
    volume, config_path = _config_volume(template, job)
    base = _slug(name, 40) or "disent-sweep"
    config_map = f"{base}-config"
    replaced = volume["configMap"]["name"]
    out = [d for d in shared if not (d.get("kind") == "ConfigMap" and d["metadata"]["name"] == replaced)]
    config_dir, config_key = config_path.rsplit("/", 1)
    out.insert(0, {"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": config_map, "labels": {"disent/sweep": base}},
                   "data": {config_key: config_yaml, SWEEP_FILE_NAME: sweep_record}})
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
        next(v for v in spec["volumes"] if v["name"] == volume["name"])["configMap"]["name"] = config_map
        container = spec["containers"][0]
        container["command"] = _pod_command(container["command"], point_overrides(sweep, index, parent_id, run_dir),
                                            f"{config_dir}/{SWEEP_FILE_NAME}", index, parent_id)
        for env in container.get("env", []):
            if env.get("name") == "DISENT_SERVICE":
                env["value"] = point_name
        out += [svc, pod_job]
    return out


def render_k8s(manifests: list[dict]) -> str:
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):  # scripts and config files read as written: block literals
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return "---\n".join(yaml.dump(m, Dumper=Dumper, sort_keys=False) for m in manifests)


def apply_k8s(text: str, echo=print) -> None:
    result = subprocess.run(["kubectl", "apply", "-f", "-"], input=text, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"kubectl apply failed ({result.returncode}): {result.stderr.strip()}")
    echo(result.stdout.strip())
