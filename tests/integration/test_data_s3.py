"""Shards in real object storage (SeaweedFS on 127.0.0.1), the S3 helpers, retries and errors."""
from __future__ import annotations

import hashlib
import logging
import uuid

import numpy as np
import pytest

from disent.config import DataConfig
from disent.io import s3, storage
from disent.data.errors import DataError, ShardError
from disent.data.manifest import read_manifest
from disent.data.prepare import PrepareOptions, prepare
from disent.data.sources import SourceOptions
from disent.data.reading import load_split_arrays
from disent.data.stream import PairLoader
from tests.support.s3server import FlakyS3, clear_aws_env
from tests.support.sources import make_folder, make_idx_dir, make_npz


@pytest.fixture
def bucket(s3_env):
    return s3_env.create_bucket("disent-" + uuid.uuid4().hex[:10])


def cfg_from(m, url, **kw):
    return DataConfig(url=url, image_size=m.image_shape[1], channels=m.image_shape[0], num_classes=m.num_classes,
                      shuffle_buffer=64, **kw)


@pytest.mark.parametrize("kind", ["idx", "folder", "npz", "sprites"])
def test_prepare_and_stream_every_source_through_s3(kind, bucket, tmp_path):
    source = {
        "idx": lambda: f"idx:{make_idx_dir(tmp_path / 'idx')}",
        "folder": lambda: f"folder:{make_folder(tmp_path / 'folder')}",
        "npz": lambda: f"npz:{make_npz(tmp_path / 'd.npz')}",
        "sprites": lambda: "sprites",
    }[kind]()
    sopts = SourceOptions(num_samples=120)
    opts = PrepareOptions(groups_per_shard=5, progress=False)
    url = f"{bucket}/{kind}"
    written = prepare(source, url, opts, sopts, echo=lambda s: None)
    local = prepare(source, str(tmp_path / "local"), opts, sopts, echo=lambda s: None)
    names = {i.key.rsplit("/", 2)[-2] + "/" + i.key.rsplit("/", 1)[-1] for i in s3.list_prefix(url + "/")}
    assert {"train/manifest.json", "val/manifest.json", "test/manifest.json", "train/shard-000000.tar"} <= names
    m = read_manifest(url, "train")
    assert m.digest == hashlib.sha256(s3.read_bytes(f"{url}/train/manifest.json")).hexdigest() == written["train"].digest
    # Same seed, same bytes, wherever they are written.
    assert [s.sha256 for s in m.shards] == [s.sha256 for s in local["train"].shards]
    assert m.shards[0].url == f"{url}/train/shard-000000.tar"

    cfg = cfg_from(m, url, num_workers=1, verify_checksums=True)
    loader = PairLoader(cfg, "train", batch_size=4, seed=0, with_ids=True)
    it = iter(loader)
    batches = [next(it) for _ in range(loader.batches_per_epoch + 1)]
    loader.close()
    assert all((b["y1"] >= 0).all() for b in batches)
    lcfg = cfg_from(m, str(tmp_path / "local"), num_workers=0)
    local_batches = PairLoader(lcfg, "train", batch_size=4, seed=0, with_ids=True)
    for a, b in zip(batches, [next(iter(local_batches)) for _ in range(3)]):
        assert a["id1"].tolist() == b["id1"].tolist()  # S3 and local streams agree exactly
    images, labels, factors, names_ = load_split_arrays(cfg, "test")
    limages, llabels, _, _ = load_split_arrays(lcfg, "test")
    np.testing.assert_array_equal(images, limages)
    np.testing.assert_array_equal(labels, llabels)


def test_s3_rerun_refuses_and_overwrite_replaces(bucket):
    url = f"{bucket}/sp"
    prepare("sprites", url, PrepareOptions(groups_per_shard=3, progress=False), SourceOptions(num_samples=100),
            echo=lambda s: None)
    n_before = len(read_manifest(url, "train").shards)
    with pytest.raises(DataError, match="--overwrite"):
        prepare("sprites", url, PrepareOptions(progress=False), SourceOptions(num_samples=100), echo=lambda s: None)
    prepare("sprites", url, PrepareOptions(groups_per_shard=50, overwrite=True, progress=False),
            SourceOptions(num_samples=100), echo=lambda s: None)
    m = read_manifest(url, "train")
    assert len(m.shards) < n_before
    assert storage.list_names(f"{url}/train") == sorted(["manifest.json", *(s.name for s in m.shards)])


def test_missing_object_and_missing_manifest_on_s3(bucket):
    url = f"{bucket}/gone"
    with pytest.raises(DataError, match="disent prepare") as info:
        read_manifest(url, "train")
    assert f"{url}/train/manifest.json" in str(info.value)
    prepare("sprites", url, PrepareOptions(groups_per_shard=4, progress=False), SourceOptions(num_samples=100),
            echo=lambda s: None)
    m = read_manifest(url, "train")
    s3.delete(m.shards[1].url)
    cfg = cfg_from(m, url)
    with pytest.raises(ShardError, match="missing") as info:
        load_split_arrays(cfg, "train")
    assert m.shards[1].url in str(info.value)
    skip = cfg_from(m, url, on_error="skip")
    loader = PairLoader(skip, "train", batch_size=4)
    with pytest.warns(RuntimeWarning, match="missing"):
        it = iter(loader)
        for _ in range(loader.batches_per_epoch):
            next(it)
    assert loader.skipped_shards >= 1


def test_s3_helpers_round_trip(bucket, tmp_path):
    assert s3.parse_s3_url("s3://b/k/x.tar") == ("b", "k/x.tar")
    assert s3.parse_s3_url("s3://b") == ("b", "")
    with pytest.raises(ValueError):
        s3.parse_s3_url("/local/path")
    src = tmp_path / "ckpt.bin"
    payload = np.random.default_rng(0).bytes(300_000)
    src.write_bytes(payload)
    s3.upload_file(src, f"{bucket}/ckpt/a.bin")
    s3.upload_bytes(b"hello", f"{bucket}/ckpt/b.txt")
    listed = {i.key: i.size for i in s3.list_prefix(f"{bucket}/ckpt/")}
    assert listed == {"ckpt/a.bin": len(payload), "ckpt/b.txt": 5}
    assert s3.download(f"{bucket}/ckpt/b.txt") == b"hello"
    assert s3.download(f"{bucket}/ckpt/a.bin", tmp_path / "back.bin").read_bytes() == payload
    assert s3.exists(f"{bucket}/ckpt/b.txt") and not s3.exists(f"{bucket}/ckpt/none")
    s3.delete(f"{bucket}/ckpt/b.txt")
    assert not s3.exists(f"{bucket}/ckpt/b.txt")
    with pytest.raises(s3.S3NotFound):
        s3.read_bytes(f"{bucket}/ckpt/b.txt")
    # A read that loses its connection part-way resumes with a ranged (If-Match) GET on the real server.
    reader = s3.S3Reader(f"{bucket}/ckpt/a.bin")
    head = reader.read(100_000)
    reader._discard_body()  # as if the connection broke
    assert head + reader.read() == payload
    reader.close()
    import webdataset as wds  # the s3:// scheme is registered in webdataset's gopen

    with wds.gopen(f"{bucket}/ckpt/a.bin", "rb") as f:
        assert f.read() == payload


def test_wrong_credentials_fail_clearly_without_leaking_them(s3_env, bucket, monkeypatch, caplog):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(s3.S3Error) as info:
        s3.read_bytes(f"{bucket}/x")
    assert "access denied" in str(info.value) or "credentials" in str(info.value)
    assert "wrong-secret-value-123" not in str(info.value) + caplog.text


# --------------------------------------------------------------------------- injected failures (fake server)


@pytest.fixture
def flaky(monkeypatch):
    clear_aws_env(monkeypatch)
    with FlakyS3() as server:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        yield server


def test_throttling_and_5xx_are_retried_with_backoff(flaky, caplog):
    flaky.objects["bkt/obj"] = b"x" * 5000
    flaky.fail["bkt/obj"] = [503, 500, 429]
    caplog.set_level(logging.WARNING)
    assert s3.read_bytes("s3://bkt/obj") == b"x" * 5000
    gets = [r for r in flaky.requests if r[1] == "bkt/obj"]
    assert len(gets) == 4
    assert "retry" in caplog.text and "fake-secret-never-logged" not in caplog.text


def test_a_broken_stream_resumes_with_a_range_request(flaky):
    data = bytes(range(256)) * 400
    flaky.objects["bkt/big"] = data
    flaky.truncate["bkt/big"] = 30_000
    assert s3.read_bytes("s3://bkt/big") == data
    ranges = [r[2] for r in flaky.requests if r[1] == "bkt/big"]
    assert ranges[0] is None and ranges[1] == "bytes=30000-"


def test_client_errors_are_not_retried_and_retries_are_bounded(flaky, monkeypatch):
    flaky.objects["bkt/obj"] = b"data"
    flaky.fail["bkt/obj"] = [403]
    with pytest.raises(s3.S3Error, match="access denied"):
        s3.read_bytes("s3://bkt/obj")
    assert len([r for r in flaky.requests if r[1] == "bkt/obj"]) == 1
    monkeypatch.setenv("DISENT_S3_RETRIES", "2")
    flaky.fail["bkt/obj"] = [503] * 5
    with pytest.raises(s3.S3Error, match="SlowDown"):
        s3.read_bytes("s3://bkt/obj")
    assert len([r for r in flaky.requests if r[1] == "bkt/obj"]) == 1 + 3
