"""The trainer's signal handling and device choice, in-process (fast; the launch tests run it for real).

* SIGTERM/SIGUSR1 are ignored for good once the last checkpoint is complete (`PreemptionFlag.settle`);
* DataLoader workers started inside `stop_signals_held` survive a SIGTERM/SIGUSR1 sent to them (Slurm
  signals every process of a step), while a worker started without it dies of it;
* the GPU is LOCAL_RANK modulo the GPUs the process sees.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from disent.signals import STOP_SIGNALS, PreemptionFlag, stop_signals_held
from disent.train.distributed import DistEnv


@pytest.fixture
def saved_handlers():
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield before
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_restore_puts_back_the_previous_handlers(saved_handlers):
    flag = PreemptionFlag()
    flag.install()
    flag.install()  # idempotent: the second call must not record our own handler as "previous"
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
    assert flag.raised and flag.signal == signal.SIGUSR1
    flag.restore()
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == saved_handlers


def test_ctrl_c_stops_like_a_preemption_and_a_second_one_interrupts_at_once(saved_handlers):
    flag = PreemptionFlag()
    flag.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert flag.raised and flag.interrupted  # the run checkpoints and exits 130, not 75
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        flag.restore()


def test_settled_flag_ignores_stop_signals_for_good(saved_handlers):
    flag = PreemptionFlag()
    flag.install()
    flag.settle()
    flag.restore()
    assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in STOP_SIGNALS)
    os.kill(os.getpid(), signal.SIGTERM)  # would end pytest if it were not ignored
    time.sleep(0.05)
    assert not flag.raised


def test_a_signal_sent_inside_the_block_is_not_lost(saved_handlers):
    flag = PreemptionFlag()
    flag.install()
    try:
        with stop_signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        time.sleep(0.05)
        assert flag.signal == signal.SIGTERM
    finally:
        flag.restore()


class _Counting(IterableDataset):
    def __iter__(self):
        i = 0
        while True:
            yield torch.tensor(i)
            i += 1


def _start_workers(held: bool):
    loader = DataLoader(_Counting(), batch_size=None, num_workers=1, multiprocessing_context="fork")
    if held:
        with stop_signals_held():
            it = iter(loader)
            first = next(it)
    else:
        it = iter(loader)
        first = next(it)
    assert int(first) == 0
    (worker,) = it._workers
    return it, worker


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_workers_started_inside_the_block_survive_stop_signals(saved_handlers, sig):
    flag = PreemptionFlag()
    flag.install()
    it, worker = _start_workers(held=True)
    try:
        os.kill(worker.pid, sig)
        time.sleep(0.5)
        assert worker.is_alive()
        assert [int(next(it)) for _ in range(3)] == [1, 2, 3]
        assert not flag.raised  # the worker's signal is not the trainer's
    finally:
        it._shutdown_workers()
        flag.restore()


@pytest.mark.timeout(60)
def test_without_the_block_a_worker_dies_of_sigterm(saved_handlers):
    """The control: torch's DataLoader worker turns SIGTERM into death, whatever the parent handles."""
    flag = PreemptionFlag()
    flag.install()
    it, worker = _start_workers(held=False)
    try:
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(10)
        # torch's worker handler: _exit(0) when the parent sent it (as here), else death by SIGTERM
        assert not worker.is_alive() and worker.exitcode in (0, -signal.SIGTERM)
    finally:
        it._shutdown_workers()
        flag.restore()


@pytest.mark.parametrize("local_rank, gpus, index", [(0, 8, 0), (5, 8, 5), (3, 1, 0), (5, 2, 1), (9, 4, 1)])
def test_gpu_is_local_rank_modulo_visible_gpus(monkeypatch, local_rank, gpus, index):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    env = DistEnv(rank=local_rank, world_size=16, local_rank=local_rank, device_type="cuda")
    assert env.device_index == index
    assert env.device == torch.device("cuda", index)
    assert DistEnv(local_rank=3, device_type="cpu").device == torch.device("cpu")
