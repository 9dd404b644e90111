"""What the launch tests (launcher, Slurm, Kubernetes) share: the real training command on tiny
real shards, checks of a run's real outcome (checkpoints, metrics.jsonl, the MLflow run), and the
environments the launcher reads (a Slurm step, a Kubernetes pod).

    TRAIN_CMD + train_args(run_dir, data, steps=...)   ->  disent train configs/base.yaml <tiny overrides>
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.support.train_helpers import ROOT, complete_checkpoints, logged_steps, step_dir, tiny_overrides

# The real trainer, by its console script next to this interpreter (no spaces: slurm/train.sh splits
# TRAIN_CMD on them). Falls back to the module form when the script is not installed.
_SCRIPT = Path(sys.executable).parent / "disent"
TRAIN_CMD = [str(_SCRIPT), "train"] if _SCRIPT.exists() else [sys.executable, "-m", "disent.cli", "train"]
CONFIG = str(ROOT / "configs" / "base.yaml")
EXPERIMENT = "disent"  # tracking.experiment's default


def mlflow_store(tmp_path_factory) -> str:
    """A sqlite tracking store for a module's runs, its schema created once: a fresh store costs every
    first run several seconds of migrations. Each test logs to its own experiment in it."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def train_args(run_dir: Path, data: Path | None, *, steps: int, log_every: int = 2, checkpoint_every: int = 1000,
               tracking_uri: str | None = None, experiment: str | None = None, **extra) -> list[str]:
    """CONFIG and the overrides of a tiny run: the arguments after TRAIN_CMD.

    data=None leaves data.url out (Slurm's DATA_URL adds it). tracking_uri: the store (default: a
    sqlite file in run_dir; "" leaves tracking.uri out, for MLFLOW_TRACKING_URI); experiment: the
    MLflow experiment (default `disent`). Checkpoints only at the end unless checkpoint_every says so.
    """
    values = {"train.steps": steps, "train.log_every": log_every, "train.checkpoint_every": checkpoint_every,
              "train.keep_checkpoints": 10, "eval.max_train_samples": 100, "eval.max_test_samples": 50, **extra}
    if tracking_uri:
        values["tracking.uri"] = tracking_uri
    if experiment:
        values["tracking.experiment"] = experiment
    overrides = tiny_overrides(run_dir, data, **values)
    if data is None:
        overrides = [o for o in overrides if not o.startswith("data.url=")]
    if tracking_uri == "":
        overrides = [o for o in overrides if not o.startswith("tracking.uri=")]
    return [CONFIG, *overrides]


def default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir}/mlflow.db"  # what tiny_overrides sets


# --------------------------------------------------------------------------- the run's outcome


def checkpoint_meta(run_dir: Path, step: int) -> dict:
    return json.loads((step_dir(run_dir, step) / "meta.json").read_text())


def assert_checkpoints(run_dir: Path, steps: int, world_size: int) -> list[int]:
    """The last complete checkpoint is the final step; every complete one has meta.json and each rank's file."""
    done = complete_checkpoints(run_dir)
    assert done and done[-1] == steps, done
    for step in done:
        d = step_dir(run_dir, step)
        meta = checkpoint_meta(run_dir, step)
        assert meta["step"] == step and meta["world_size"] == world_size, meta
        assert meta["mlflow_run_id"], meta
        names = {p.name for p in d.iterdir()}
        assert {f"trainer-rank{r}.pt" for r in range(world_size)} <= names, names
        assert {"vae", "disc", "vae_weights.pt", "meta.json"} <= names, names
    # an interrupted save leaves no step-* directory behind (the next complete one prunes it)
    incomplete = [p.name for p in (Path(run_dir) / "checkpoints").glob("step-*") if not (p / "COMPLETE").exists()]
    assert not incomplete, incomplete
    return done


def assert_finished(run_dir: Path, steps: int, world_size: int, *, log_every: int = 2,
                    tracking_uri: str | None = None, experiment: str = EXPERIMENT, repeats: bool = False) -> dict:
    """A finished run: final weights, complete checkpoints, metrics.jsonl up to `steps`, and exactly one
    MLflow run in the experiment, FINISHED, whose metric history has one entry per log step (for a
    run that was stopped cleanly and resumed, too: no step twice). repeats=True (a crash): the steps
    between the checkpoint resumed from and the crash were trained, and logged, twice.
    Returns the MLflow run's id, params and tags."""
    run_dir = Path(run_dir)
    assert (run_dir / "final" / "vae.pt").is_file() and (run_dir / "final" / "disc.pt").is_file()
    assert_checkpoints(run_dir, steps, world_size)
    expected = list(range(log_every, steps + 1, log_every))
    if steps % log_every:
        expected.append(steps)
    logged = logged_steps(run_dir)
    assert (sorted(set(logged)) if repeats else logged) == expected, logged

    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_tracking_uri(run_dir)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} at {uri}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [(r.info.run_id, r.info.run_name, r.info.status) for r in runs]  # no duplicate run
    run = runs[0]
    assert run.info.status == "FINISHED", run.info.status
    assert checkpoint_meta(run_dir, steps)["mlflow_run_id"] == run.info.run_id
    history = [m.step for m in client.get_metric_history(run.info.run_id, "vae_loss")]
    assert (sorted(set(history)) if repeats else sorted(history)) == expected, sorted(history)
    assert run.data.params["derived.world_size"] == str(world_size)
    assert run.data.tags["world_size"] == str(world_size)
    return {"run_id": run.info.run_id, "params": run.data.params, "tags": run.data.tags}


# --------------------------------------------------------------------------- what the launcher reads


def slurm_step(procid=1, ntasks=4, localid=1, nodeid=0, nodes=2, nodelist="gpu[01-02]", **extra):
    """The environment of one task of a Slurm job step (job 4321, 6 CPUs per task)."""
    env = {
        "SLURM_JOB_ID": "4321", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid),
        "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid), "SLURM_NNODES": str(nodes), "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
        "SLURM_STEP_TASKS_PER_NODE": f"{ntasks // nodes}(x{nodes})", "SLURM_CPUS_PER_TASK": "6",
    }
    env.update(extra)
    return env


def k8s_pod(index=1, nnodes=2, **extra):
    """The environment of pod `index` of k8s/job.yaml's Indexed Job."""
    env = {"JOB_COMPLETION_INDEX": str(index), "DISENT_NNODES": str(nnodes), "DISENT_SERVICE": "disent",
           "DISENT_JOB_NAME": "disent-train", "HOSTNAME": f"disent-train-{index}", "MASTER_PORT": "29500"}
    env.update(extra)
    return env
