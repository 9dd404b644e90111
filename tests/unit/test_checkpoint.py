"""CheckpointManager without DeepSpeed: layout, the COMPLETE marker, pruning, resolve, upload, RNG state."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from disent.checkpoint import COMPLETE, CheckpointError, CheckpointManager, step_dir_name
from disent.train.rng import isolated_rng, rng_state, set_rng_state
from tests.support.fake_checkpoint import fake_parts, save


def test_layout_and_load_round_trip(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    path = save(mgr, 7)
    assert path == tmp_path / "checkpoints" / "step-00000007"
    assert {p.name for p in path.iterdir()} == {"vae", "disc", "trainer-rank0.pt", "meta.json", "vae_weights.pt", COMPLETE}
    meta = json.loads((path / "meta.json").read_text())
    assert meta == {"step": 7, "world_size": 1, "mlflow_run_id": "abc", "config": {"name": "t"}}
    engines = fake_parts()
    engines["vae"].value = engines["disc"].value = None
    mgr.load(mgr.latest_complete(), engines)
    state = engines["trainer"].loaded
    assert engines["vae"].loaded == 1.0 and engines["disc"].loaded == 2.0
    assert state["step"] == 7 and json.loads(state["loader_json"])["batch"] == 7
    assert not list(path.rglob(".*tmp*"))


def test_incomplete_checkpoint_is_ignored_and_previous_stays_in_force(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    save(mgr, 10)
    with pytest.raises(OSError, match="disk full"):
        save(mgr, 20, fake_parts(fail_disc=True))  # a crash during the save
    assert (tmp_path / "checkpoints" / "step-00000020").is_dir()
    assert mgr.latest_complete().step == 10
    with pytest.raises(CheckpointError, match="incomplete"):
        CheckpointManager.resolve(tmp_path / "checkpoints" / "step-00000020")
    assert CheckpointManager.resolve(tmp_path).step == 10  # a run dir: its latest complete one
    # saving step 20 again replaces the leftovers
    save(mgr, 20)
    assert mgr.latest_complete().step == 20


def test_prune_keeps_last_n_and_drops_older_leftovers(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    root = tmp_path / "checkpoints"
    (root / step_dir_name(1)).mkdir(parents=True)  # an interrupted save, older than what follows
    for step in (2, 4, 6, 8):
        save(mgr, step)
    (root / step_dir_name(9)).mkdir()  # newer than the newest complete one: left alone
    mgr.prune()
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006", "step-00000008", "step-00000009"]


def test_resolve_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointManager.resolve(tmp_path / "step-00000005")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        CheckpointManager.resolve(tmp_path)


def test_a_checkpoint_of_another_world_size_loads_and_one_without_a_world_size_is_refused(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = save(mgr, 3)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "world_size": 4}))
    parts = fake_parts()
    assert mgr.load(mgr.latest_complete(), parts)["world_size"] == 4  # the trainer compares it with its own
    assert parts["vae"].loaded == 1.0 and parts["trainer"].loaded["step"] == 3  # engines as saved; rank 0 % 4's state
    (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "world_size"}))
    with pytest.raises(CheckpointError, match="names no world_size"):
        mgr.load(mgr.latest_complete(), fake_parts())


def test_upload_copies_every_file_and_the_marker_last(tmp_path):
    calls = []
    mgr = CheckpointManager(tmp_path / "myrun", upload_url="s3://bucket/prefix/",
                            uploader=lambda local, url: calls.append((Path(local), url)))
    path = save(mgr, 5)
    mgr.wait_for_uploads()
    assert calls[-1] == (path / COMPLETE, "s3://bucket/prefix/myrun/checkpoints/step-00000005/COMPLETE")
    uploaded = {url.rsplit("step-00000005/", 1)[1] for _, url in calls}
    assert uploaded == {"vae/model.pt", "disc/model.pt", "trainer-rank0.pt", "meta.json", "vae_weights.pt", COMPLETE}


def test_upload_failure_does_not_stop_training(tmp_path):
    def broken(local, url):
        raise OSError("no route to host")

    mgr = CheckpointManager(tmp_path, upload_url="s3://b/p", uploader=broken)
    save(mgr, 1)
    mgr.wait_for_uploads()
    assert mgr.latest_complete().step == 1 and "no route to host" in mgr.upload_errors[0]


def test_upload_to_s3_with_moto(tmp_path, monkeypatch):
    moto = pytest.importorskip("moto")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    with moto.mock_aws():
        import boto3

        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="ckpts")
        mgr = CheckpointManager(tmp_path / "run", upload_url="s3://ckpts/runs")
        save(mgr, 3)
        mgr.wait_for_uploads()
        assert not mgr.upload_errors, mgr.upload_errors
        keys = {o["Key"] for o in boto3.client("s3", region_name="us-east-1").list_objects_v2(Bucket="ckpts")["Contents"]}
        assert "runs/run/checkpoints/step-00000003/COMPLETE" in keys
        assert "runs/run/checkpoints/step-00000003/vae/model.pt" in keys


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.randn(5), np.random.randn(3), random.random()
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.randn(2).tolist(), torch.randn(4))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.randn(2).tolist(), torch.randn(4))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_isolated_rng_undoes_draws():
    torch.manual_seed(0)
    expected = torch.randn(3)
    torch.manual_seed(0)
    with isolated_rng():
        torch.randn(100), np.random.rand(), random.random()
    assert torch.equal(torch.randn(3), expected)
