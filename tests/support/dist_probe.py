"""A tiny real torch.distributed (gloo) program that keeps the trainer's launch contract.

The launch tests run the real trainer (tests/support/launch_helpers.py); this stand-in is left for launcher
behaviour the trainer cannot show on demand (a rank that exits before the rendezvous):

    python tests/support/dist_probe.py train CONFIG [section.key=value ...]

* reads the config (and overrides) with disent.config: run_dir, train.steps,
  train.checkpoint_every, train.keep_checkpoints, name, tracking.*;
* init_process_group("gloo") from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, then one
  all_reduce per step, checked against the world size;
* checkpoints under run_dir/checkpoints/step_XXXXXXXX/ (one file per rank, then COMPLETE written by
  rank 0 after a barrier) and resumes from the latest complete one;
* on SIGTERM or SIGUSR1 all ranks agree to stop after the current step, checkpoint, and exit 75;
* with tracking.uri (or $MLFLOW_TRACKING_URI) and PROBE_MLFLOW=1, rank 0 logs one MLflow run that a
  resumed attempt continues;
* writes run_dir/starts.jsonl (one line per rank per start) and run_dir/done.json at the end.

Knobs (environment, so they pass through srun and pods): PROBE_STEP_TIME seconds per step
(default 0.05); PROBE_CRASH="RANK:STEP" makes that rank die with code 1 at that step once per run_dir;
PROBE_CRASH="RANK:init" makes it exit 1 before init_process_group (its peers wait in the rendezvous).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

from disent.errors import ExitCode

ROOT = Path(__file__).resolve().parents[2]

# The stand-in's command (the real one: launch_helpers.TRAIN_CMD).
TRAIN_CMD = [sys.executable, str(Path(__file__).resolve()), "train"]
# The config the tests pass (first argument after TRAIN_CMD); overrides make it tiny.
TEST_CONFIG = str(ROOT / "configs" / "fashion_mnist.yaml")
EX_TEMPFAIL = int(ExitCode.PREEMPTED)


def train_args(run_dir: str | os.PathLike, steps: int, checkpoint_every: int = 5, *extra: str) -> list[str]:
    """CONFIG and overrides for a tiny run: the arguments after TRAIN_CMD."""
    return [TEST_CONFIG, f"run_dir={run_dir}", f"train.steps={steps}",
            f"train.checkpoint_every={checkpoint_every}", "train.progress=false", *extra]


# --------------------------------------------------------------------------- its own checkpoints


def complete_checkpoints(run_dir: str | os.PathLike) -> list[int]:
    """The steps of its complete checkpoints (run_dir/checkpoints/step_XXXXXXXX/COMPLETE), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(d.name.split("_")[1]) for d in root.glob("step_*") if (d / "COMPLETE").exists())


# --------------------------------------------------------------------------- the program


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _append_line(path: Path, record: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "train":
        print("usage: dist_probe.py train CONFIG [section.key=value ...]", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from disent.config import ConfigError, load_config

    try:
        cfg = load_config(argv[1], argv[2:])
    except ConfigError as exc:
        print(f"disent: config error: {exc}", file=sys.stderr)
        return 2

    stop_requested: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda s, _f: stop_requested.append(s))

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    crash = os.environ.get("PROBE_CRASH", "")
    crash_rank, _, crash_at = crash.partition(":")
    crash_rank = int(crash_rank) if crash else -1
    if rank == crash_rank and crash_at == "init":
        print(f"probe: rank {rank} dying before init_process_group (PROBE_CRASH)", flush=True)
        return 1
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("PROBE_TIMEOUT", "120"))))
    assert dist.get_rank() == rank and dist.get_world_size() == world

    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / "checkpoints"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    done = complete_checkpoints(run_dir)
    start = done[-1] if done else 0
    state = {}
    if done:
        state = json.loads((ckpt_root / f"step_{start:08d}" / f"rank_{rank}.json").read_text())
        if state["world_size"] != world:
            print(f"probe: checkpoint at step {start} was written by {state['world_size']} ranks, "
                  f"this run has {world}", file=sys.stderr)
    total = state.get("total", 0.0)
    mlflow_run_id = state.get("mlflow_run_id")

    _append_line(run_dir / "starts.jsonl", {
        "rank": rank, "world_size": world, "local_rank": int(os.environ.get("LOCAL_RANK", -1)),
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", -1)),
        "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", "hostname": socket.gethostname(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"), "ds_accelerator": os.environ.get("DS_ACCELERATOR"),
        "mode": os.environ.get("DISENT_LAUNCHER_MODE"), "resumed_from": start, "pid": os.getpid(),
        "config": {"name": cfg.name, "data.url": cfg.data.url, "tracking.uri": cfg.tracking.uri},
        "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT"),
        "time": time.time(),
    })
    print(f"probe: rank {rank}/{world} on {socket.gethostname()} starts at step {start} "
          f"(threads={torch.get_num_threads()})", flush=True)

    mlflow = None
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if rank == 0 and uri and os.environ.get("PROBE_MLFLOW") == "1":
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(cfg.tracking.experiment)
        run = mlflow.start_run(run_id=mlflow_run_id, run_name=None if mlflow_run_id else cfg.name)
        mlflow_run_id = run.info.run_id
        mlflow.set_tag("probe.world_size", world)
    mlflow_box = [mlflow_run_id]
    dist.broadcast_object_list(mlflow_box, src=0)
    mlflow_run_id = mlflow_box[0]

    crash_step = int(crash_at) if crash and crash_at != "init" else -1
    step_time = float(os.environ.get("PROBE_STEP_TIME", "0.05"))

    def checkpoint(step: int) -> None:
        d = ckpt_root / f"step_{step:08d}"
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(d / f"rank_{rank}.json", json.dumps(
            {"step": step, "world_size": world, "total": total, "mlflow_run_id": mlflow_run_id}))
        dist.barrier()
        if rank == 0:
            _atomic_write(d / "COMPLETE", str(step))
            for old in complete_checkpoints(run_dir)[: -cfg.train.keep_checkpoints]:
                for f in (ckpt_root / f"step_{old:08d}").iterdir():
                    f.unlink()
                (ckpt_root / f"step_{old:08d}").rmdir()
        dist.barrier()

    step = start
    while step < cfg.train.steps:
        if rank == crash_rank and step == crash_step and not (run_dir / "crashed").exists():
            (run_dir / "crashed").write_text(f"rank {rank} step {step}")
            print(f"probe: rank {rank} crashing at step {step} (PROBE_CRASH)", flush=True)
            os._exit(1)
        t = torch.ones(1)
        dist.all_reduce(t)
        if int(t.item()) != world:
            raise RuntimeError(f"all_reduce gave {t.item()}, expected {world}")
        total += t.item()
        time.sleep(step_time)
        step += 1
        if rank == 0:
            _atomic_write(run_dir / "step", str(step))  # progress, for tests that interrupt mid-run
        if mlflow is not None:
            mlflow.log_metric("probe_total", total, step=step)
        flag = torch.tensor([1.0 if stop_requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or flag.item():
            checkpoint(step)
        if flag.item() and step < cfg.train.steps:
            # The stop checkpoint is complete: from here on a signal must not turn exit 75 into "killed".
            # (srun --kill-on-bad-exit SIGTERMs the other ranks as soon as the first one exits 75.)
            _ignore_stop_signals()
            print(f"probe: rank {rank} stopping at step {step} on request; checkpoint written, exit 75", flush=True)
            if mlflow is not None:
                mlflow.end_run(status="KILLED")
            dist.destroy_process_group()
            return EX_TEMPFAIL

    _ignore_stop_signals()  # finished: a late preemption signal must not fail a completed run
    if rank == 0:
        _atomic_write(run_dir / "done.json", json.dumps(
            {"steps": step, "world_size": world, "total": total, "mlflow_run_id": mlflow_run_id,
             "tracking_uri": uri if mlflow is not None else None}))
        if mlflow is not None:
            mlflow.log_metric("probe_final_total", total, step=step)
            mlflow.end_run()
    dist.barrier()
    dist.destroy_process_group()
    print(f"probe: rank {rank} finished {step} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
