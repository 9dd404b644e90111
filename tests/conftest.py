"""Fixtures of the whole suite (tests/unit, tests/integration, tests/faults, tests/gpu): tiny real shards,
a real SeaweedFS S3 server and a real `mlflow server` on 127.0.0.1, each started once for the session
(tests/support/s3server.py, tests/support/mlflowserver.py); the checks every test gets (CPU ranks unless
marked gpu, no rendezvous settings left behind)."""
from __future__ import annotations

import faulthandler
import multiprocessing
import os
import sys
import threading

import pytest

from tests.support.mlflowserver import MLflowServer
from tests.support.s3server import WeedServer, clear_aws_env
from tests.support.train_helpers import make_tiny_data


RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR",
                   "TORCH_NCCL_ASYNC_ERROR_HANDLING", "CUBLAS_WORKSPACE_CONFIG")
_ENV_BEFORE = pytest.StashKey[dict]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    # after the fixtures' set-up: what a module's own process group sets stays out of the comparison
    item.stash[_ENV_BEFORE] = {name: os.environ.get(name) for name in RENDEZVOUS_VARS}
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    """A test that joins a process group in the suite's own process must put the environment back (checked once
    its fixtures are torn down, monkeypatch's undo included): every process the suite starts later inherits it (a leaked
    MASTER_PORT made later runs fail with EADDRINUSE)."""
    yield
    before = item.stash.get(_ENV_BEFORE, {})
    # set or changed, not removed: a module's fixture restoring its own settings removes them
    leaked = {name: os.environ[name] for name in before if os.environ.get(name) not in (None, before[name])}
    if leaked:
        for name, value in before.items():  # put it back so the rest of the suite runs as it should
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        raise AssertionError(f"{item.nodeid} left these in the environment: {leaked}")


@pytest.fixture(autouse=True)
def cpu_ranks_unless_marked_gpu(request, monkeypatch):
    """The suite trains on CPU ranks wherever it runs, a GPU host included (two ranks cannot share one GPU under
    NCCL): the processes a test starts see no GPU. tests/gpu/ (marker `gpu`) is where GPUs are used."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Tiny real shards (`disent prepare npz:`; 28x28x1, 4 classes, 600 samples), made once
    for the session: tests read them and never change them (a test that does, copies them first)."""
    return make_tiny_data(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running `weed mini` (S3 on 127.0.0.1). Yields an object with .endpoint_url, .access_key,
    .secret_key, .region, .create_bucket(name) -> 's3://name', .client() and .env(); sets nothing
    globally. A server that fails to start fails the test with its log."""
    server = WeedServer(tmp_path_factory.mktemp("weed"))
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point this test's process (and the processes it starts) at the session's S3 server."""
    clear_aws_env(monkeypatch)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with its own sqlite store and artifact directory; yields its URI."""
    server = MLflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server.uri
    server.stop()


def pytest_terminal_summary(terminalreporter):
    """Name what is still running in this process once the tests are done: any of it can keep the
    interpreter from exiting."""
    children = multiprocessing.active_children()
    threads = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if children or threads:
        terminalreporter.section("still running after the tests", yellow=True)
        for child in children:
            terminalreporter.line(f"child process {child.name} pid {child.pid} (daemon={child.daemon})")
        for thread in threads:
            terminalreporter.line(f"non-daemon thread {thread.name}")


def pytest_unconfigure(config):
    """A process that cannot exit after its summary would hold CI until its time limit: after 120 s
    print every thread's stack and exit with status 1 instead."""
    faulthandler.dump_traceback_later(120, exit=True, file=sys.__stderr__)
