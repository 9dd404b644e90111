"""S3 faults: a server that is down, slow, answers 403/404/500 for a shard, or holds a truncated or
corrupted shard. Loader level (PairLoader on a fake S3 holding real shards) and through `disent train`.

tests/integration/test_data_s3.py already covers throttling retries, a broken stream resumed with a Range GET,
a 403 not being retried, a missing object on a real server and wrong credentials; this file adds the
rest. Every case asserts the outcome: the exact batches, the shard named, the request count, the
exit code and message.
"""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from disent.config import DataConfig
from disent.data.errors import DataUnavailable, ShardError
from disent.errors import ExitCode
from disent.data.manifest import read_manifest
from disent.data.stream import PairLoader
from tests.support.faultkit import BASE, base_env
from tests.support.s3server import FlakyS3, clear_aws_env
from tests.support.train_helpers import ROOT, metric_lines, tiny_overrides

PREFIX = "bkt/d"
URL = f"s3://{PREFIX}"


def _load_objects(server: FlakyS3, data: Path) -> None:
    for split_dir in Path(data).iterdir():
        if split_dir.is_dir():
            for f in split_dir.iterdir():
                server.objects[f"{PREFIX}/{split_dir.name}/{f.name}"] = f.read_bytes()


@pytest.fixture
def flaky(tiny_data, monkeypatch):
    clear_aws_env(monkeypatch)
    with FlakyS3() as server:
        _load_objects(server, tiny_data)
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("DISENT_S3_RETRIES", "2")
        yield server


def cfg(url=URL, **kw) -> DataConfig:
    return DataConfig(url=str(url), image_size=28, channels=1, num_classes=4, shuffle_buffer=64, num_workers=0, **kw)


def shard_key(index: int, split: str = "train") -> str:
    return f"{PREFIX}/{split}/shard-{index:06d}.tar"


def ids(batches) -> list[list[int]]:
    return [b["id1"].tolist() + b["id2"].tolist() for b in batches]


def take(loader: PairLoader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def requests_for(server: FlakyS3, key: str) -> int:
    return sum(1 for r in server.requests if r[1] == key and r[0] == "GET")


def test_5xx_on_a_shard_is_retried_with_backoff_and_the_stream_is_unchanged(flaky, tiny_data, caplog):
    local = PairLoader(cfg(tiny_data), "train", 4, with_ids=True)
    expected = ids(take(local, local.batches_per_epoch))
    flaky.fail[shard_key(1)] = [500, 503]
    caplog.set_level(logging.WARNING, logger="disent.io.s3")
    loader = PairLoader(cfg(), "train", 4, with_ids=True)
    assert ids(take(loader, loader.batches_per_epoch)) == expected
    assert requests_for(flaky, shard_key(1)) == 3  # two failures, then the object
    assert "retry 1/2" in caplog.text and "retry 2/2" in caplog.text and shard_key(1) in caplog.text
    assert loader.skipped_shards == 0


@pytest.mark.parametrize("status, cause, tries", [
    (403, "access denied", 1),  # a client error: not retried
    (404, "missing", 1),
    (500, "InternalError (HTTP 500)", 3),  # retried DISENT_S3_RETRIES=2 times, then given up
])
def test_a_failing_shard_raises_naming_it_or_is_skipped_and_counted(flaky, status, cause, tries):
    flaky.fail[shard_key(2)] = [status] * 1000
    loader = PairLoader(cfg(on_error="raise"), "train", 4)
    with pytest.raises(ShardError) as info:
        take(loader, 2 * loader.batches_per_epoch)
    assert f"s3://{shard_key(2)}" in str(info.value) and cause in str(info.value)
    assert info.value.shard == f"s3://{shard_key(2)}"
    assert requests_for(flaky, shard_key(2)) == tries

    loader = PairLoader(cfg(on_error="skip"), "train", 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = take(loader, 2 * loader.batches_per_epoch)
    assert len(batches) == 2 * loader.batches_per_epoch  # training goes on with the other shards
    assert loader.skipped_shards >= 1
    skipped = [w for w in caught if "skipped a bad shard" in str(w.message)]
    assert len(skipped) == 1 and f"s3://{shard_key(2)}" in str(skipped[0].message) and cause in str(skipped[0].message)


@pytest.mark.parametrize("damage, cause", [
    ("truncated", "unreadable or truncated"),
    ("corrupted", "unreadable or truncated"),
    ("bitflip", "fails its checksum"),  # a flipped pixel byte: only the checksum can tell (verify_checksums)
])
def test_a_truncated_or_corrupted_shard_on_s3_raises_or_is_skipped(flaky, damage, cause):
    key = shard_key(0)
    data = bytearray(flaky.objects[key])
    if damage == "truncated":
        data = data[: len(data) // 3]
    elif damage == "corrupted":
        data[:512] = b"\x5a" * 512  # the first tar header is garbage
    else:
        at = data.index(b"NUMPY", data.index(b".images.npy")) + 200
        data[at] ^= 0xFF
    flaky.objects[key] = bytes(data)
    verify = damage == "bitflip"
    loader = PairLoader(cfg(on_error="raise", verify_checksums=verify), "train", 4)
    with pytest.raises(ShardError, match=cause) as info:
        take(loader, 2 * loader.batches_per_epoch)
    assert f"s3://{key}" in str(info.value)

    loader = PairLoader(cfg(on_error="skip", verify_checksums=verify), "train", 4)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert len(take(loader, 2 * loader.batches_per_epoch)) == 2 * loader.batches_per_epoch
    assert loader.skipped_shards >= 1


def test_a_slow_server_is_waited_for_and_the_stream_is_unchanged(flaky, tiny_data):
    local = PairLoader(cfg(tiny_data), "train", 4, with_ids=True)
    expected = ids(take(local, local.batches_per_epoch))
    for i in range(3):
        flaky.delay[shard_key(i)] = 0.3
    loader = PairLoader(cfg(), "train", 4, with_ids=True)
    assert ids(take(loader, loader.batches_per_epoch)) == expected
    assert loader.wait_seconds >= 0.3  # the wait is measured (the trainer logs it as data_wait_s)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_down_is_retried_then_fails_clearly(monkeypatch, caplog):
    clear_aws_env(monkeypatch)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                 "AWS_DEFAULT_REGION": "us-east-1", "DISENT_S3_RETRIES": "2", "DISENT_S3_BACKOFF": "0.05"}.items():
        monkeypatch.setenv(k, v)
    caplog.set_level(logging.WARNING, logger="disent.io.s3")
    start = time.monotonic()
    with pytest.raises(DataUnavailable) as info:  # retryable (exit 69), not an input error
        read_manifest(URL, "train")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert f"{URL}/train/manifest.json" in message and endpoint in message and "EndpointConnectionError" in message
    assert caplog.text.count("retry") == 2


# --------------------------------------------------------------------------- through `disent train`


def disent_train(run_dir: Path, extra: dict, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "disent.cli", "train", BASE,
           *tiny_overrides(run_dir, URL, **{"train.steps": 6, "train.checkpoint_every": 6, **extra})]
    return subprocess.run(cmd, cwd=ROOT, env=base_env(OMP_NUM_THREADS="1", **env), capture_output=True, text=True,
                          timeout=timeout)


def assert_one_paragraph_error(result, *needles, code=ExitCode.RETRYABLE):
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    prefix = "disent: config error:" if code == ExitCode.INPUT_ERROR else "disent: retryable failure"
    errors = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.mark.slow
def test_train_with_the_s3_server_down_exits_69_naming_the_data(tmp_path):
    """An endpoint that does not answer may be an outage: retryable, so a scheduler tries again."""
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "secret-down-9c1", "AWS_DEFAULT_REGION": "us-east-1",
           "DISENT_S3_RETRIES": "1", "DISENT_S3_BACKOFF": "0.05"}
    result = disent_train(tmp_path / "run", {}, env)
    assert_one_paragraph_error(result, f"{URL}/train/manifest.json", "EndpointConnectionError", "127.0.0.1")
    assert "secret-down-9c1" not in result.stderr + result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_train_with_a_corrupted_shard_raises_or_skips(tmp_path, tiny_data):
    with FlakyS3() as server:
        _load_objects(server, tiny_data)
        key = shard_key(1)
        server.objects[key] = server.objects[key][: len(server.objects[key]) // 2]  # truncated object
        env = {**server.env(), "DISENT_S3_RETRIES": "1"}
        raised = disent_train(tmp_path / "raise", {"data.on_error": "raise"}, env)
        skipped = disent_train(tmp_path / "skip", {"data.on_error": "skip"}, env)
    assert_one_paragraph_error(raised, f"s3://{key}", "unreadable or truncated")
    assert not list((tmp_path / "raise" / "checkpoints").glob("step-*/COMPLETE"))

    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "skipped a bad shard" in skipped.stderr and f"s3://{key}" in skipped.stderr
    logged = metric_lines(tmp_path / "skip")
    assert logged[-1]["step"] == 6 and logged[-1]["data_skipped_shards"] >= 1
