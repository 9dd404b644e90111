"""A rank killed mid-training, a crash while a checkpoint is written, SIGTERM/SIGUSR1 preemption:
real 2-rank CPU runs of `disent train` under `python -m launcher`.

Every interrupted run must end with the same final parameters (torch.equal on every tensor) as an
uninterrupted run with the same seed: resuming from a complete checkpoint is exact on CPU.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.support.faultkit import RESTART_RUN, assert_same_weights, final_weights, finish, launch, mlflow_runs
from tests.support.processes import rank_pids, stop, wait_for
from tests.support.train_helpers import complete_checkpoints, resumed_from, step_dir

pytestmark = pytest.mark.slow

GRACE = 15


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    """The uninterrupted run every interrupted one is compared with."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc, log = launch(run, tiny_data, extra=RESTART_RUN)
    rc = finish(proc, 300)
    assert rc == 0, log.read_text()[-4000:]
    return final_weights(run)


def assert_one_finished_run(run):
    _, runs = mlflow_runs(f"sqlite:///{run}/mlflow.db")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in runs]


def test_sigkill_of_a_rank_restarts_the_group_which_resumes_exactly(tmp_path, tiny_data, reference):
    run = tmp_path / "run"
    proc, log = launch(run, tiny_data, extra=RESTART_RUN, max_restarts=1, grace=GRACE)
    try:
        wait_for(lambda: 20 in complete_checkpoints(run), 240, "the first complete checkpoint", proc, log)
        (pid,) = wait_for(lambda: rank_pids(run).get(1), 10, "rank 1's pid", proc, log)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: "restart 1/1" in log.read_text(), GRACE + 30, "the group to be restarted", proc, log)
        stopped_in = time.monotonic() - killed_at
        rc = finish(proc, 300)
    finally:
        stop(proc)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    # the group was taken down in bounded time: no rank hung in a collective until the SIGKILL
    assert stopped_in < GRACE + 10, stopped_in
    assert "rank 1 exited with code 137" in text
    assert "still running" not in text  # the survivor stopped on its own (the collective failed)
    steps = resumed_from(text)
    assert len(steps) == 1 and 20 <= steps[0] < RESTART_RUN["train.steps"], steps
    assert_same_weights(final_weights(run), reference)
    assert_one_finished_run(run)


def test_a_crash_between_ranks_checkpoint_writes_leaves_the_previous_checkpoint_in_force(
        tmp_path, tiny_data, reference):
    """Rank 1 is SIGKILLed after writing its DeepSpeed files for step 60 but before its trainer file and
    the COMPLETE barrier (test-only hook DISENT_FAULT_CHECKPOINT_KILL). Step 60 stays partial, is never
    used, and the restarted group resumes from step 40."""
    run = tmp_path / "run"
    proc, log = launch(run, tiny_data, extra=RESTART_RUN, max_restarts=1, grace=GRACE,
                       env={"DISENT_FAULT_CHECKPOINT_KILL": "1:60"})
    try:
        rc = finish(proc, 400)
    finally:
        stop(proc)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "DISENT_FAULT_CHECKPOINT_KILL=1:60: rank 1 kills itself while checkpoint step 60" in text
    assert "rank 1 exited with code 137" in text and "restart 1/1" in text
    assert resumed_from(text) == [40]  # not the partial step 60
    # the partial step-60 directory was replaced by a complete one when the run got there again
    assert complete_checkpoints(run)[-1] == RESTART_RUN["train.steps"]
    assert all((p / "COMPLETE").is_file() for p in (run / "checkpoints").glob("step-*"))
    assert_same_weights(final_weights(run), reference)
    assert_one_finished_run(run)


def test_sigterm_and_sigusr1_checkpoint_within_the_grace_period_exit_75_and_requeue_resumes(
        tmp_path, tiny_data, reference):
    """SIGTERM to the launcher (Kubernetes, `scontrol requeue`), then SIGUSR1 straight to the ranks (Slurm's
    --signal): each time every rank finishes its step, writes a complete checkpoint and exits 75 well
    within the grace period; the launcher exits 75 without restarting; the requeued job resumes."""
    run = tmp_path / "run"
    stops = []
    for attempt, how in enumerate(("SIGTERM to the launcher", "SIGUSR1 to every rank")):
        proc, log = launch(run, tiny_data, extra=RESTART_RUN, max_restarts=1, grace=GRACE,
                           log_name=f"attempt{attempt}.log")
        try:
            before = max(complete_checkpoints(run), default=0)
            wait_for(lambda: max(complete_checkpoints(run), default=0) > before, 240, "a new checkpoint", proc, log)
            if attempt == 0:
                proc.send_signal(signal.SIGTERM)
            else:
                for (pid,) in wait_for(lambda: rank_pids(run) if len(rank_pids(run)) == 2 else None, 10, "ranks",
                                       proc, log).values():
                    os.kill(pid, signal.SIGUSR1)
            sent = time.monotonic()
            rc = finish(proc, GRACE + 60)
            took = time.monotonic() - sent
        finally:
            stop(proc)
        text = log.read_text()
        assert rc == 75, (how, text[-4000:])
        assert took < GRACE, (how, took)  # checkpointed and exited before the SIGKILL would have come
        assert "still running" not in text and "restart 1/1" not in text
        assert text.count("exiting with 75") == 2, text[-3000:]  # both ranks
        stopped = max(complete_checkpoints(run))
        assert stopped < RESTART_RUN["train.steps"]
        assert f"checkpoint {step_dir(run, stopped)}" in text
        stops.append(stopped)
        if attempt:
            assert resumed_from(text) == [stops[0]]

    proc, log = launch(run, tiny_data, extra=RESTART_RUN, log_name="requeue.log")
    try:
        rc = finish(proc, 300)
    finally:
        stop(proc)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert resumed_from(text) == [stops[1]]
    assert_same_weights(final_weights(run), reference)
    assert_one_finished_run(run)
