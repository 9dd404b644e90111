"""Streaming pairs: same class, class mixing, re-pairing, equal batches per rank, resume, errors (ranks and
workers in processes of their own: tests/integration/test_data_stream_processes.py)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from disent.config import ConfigError
from disent.data.errors import ShardError
from disent.data.manifest import read_manifest
from disent.data.prepare import PrepareOptions, prepare
from disent.data.reading import load_split_arrays
from disent.data.stream import PairLoader
from disent.data.workers import resolve_num_workers
from tests.support.sources import iter_groups, N_CLASSES, cfg_for, make_npz, prepare_shards


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """~430 train samples in 11 shards of <= 10 groups (shard count not a multiple of 2 or 4)."""
    return prepare_shards(tmp_path_factory.mktemp("stream"), 480, 10)


def truth(url):
    """id -> (label, factors, group key) from a sequential read of the train split."""
    out = {}
    for g in iter_groups(cfg_for(url), "train"):
        for j, i in enumerate(g.ids):
            out[int(i)] = (g.label, g.factors[j], g.key, g.images[j])
    return out


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def ids_of(batch):
    return tuple(batch[k].tolist() and tuple(batch[k].tolist()) for k in ("id1", "id1p", "id2", "id2p"))


# --------------------------------------------------------------------------- batch contents


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_hold_same_class_pairs_with_their_factors(dataset, workers):
    ref = truth(dataset)
    loader = PairLoader(cfg_for(dataset, num_workers=workers), "train", batch_size=8, rank=0, world_size=1, seed=1,
                        with_ids=True)
    batches = take(loader, 12)
    loader.close()
    for b in batches:
        for key in ("x1", "x1p", "x2", "x2p"):
            assert b[key].dtype == torch.uint8 and tuple(b[key].shape) == (8, 1, 8, 8)
        for key in ("y1", "y2"):
            assert b[key].dtype == torch.int64 and tuple(b[key].shape) == (8,)
        for key in ("f1", "f2"):
            assert b[key].dtype == torch.float32 and tuple(b[key].shape) == (8, 2)
        for pair, (a, ap, y, fa) in {"1": ("id1", "id1p", "y1", "f1"), "2": ("id2", "id2p", "y2", "f2")}.items():
            for row in range(8):
                i, ip = int(b[a][row]), int(b[ap][row])
                assert i != ip
                assert ref[i][0] == ref[ip][0] == int(b[y][row])  # same class, labelled right
                np.testing.assert_array_equal(ref[i][1], b[fa][row].numpy())
                np.testing.assert_array_equal(ref[i][3], b["x" + pair][row].numpy())
    # Batches mix classes.
    assert all(len(set(b["y1"].tolist())) > 1 for b in batches)
    # (x2, x2') is drawn independently of (x1, x1'): its class differs from y1 about (K-1)/K of the time.
    y1 = torch.cat([b["y1"] for b in batches])
    y2 = torch.cat([b["y2"] for b in batches])
    assert 0.4 < (y1 != y2).float().mean().item() < 0.95


def test_pairs_cross_groups_and_change_between_epochs(dataset):
    ref = truth(dataset)
    loader = PairLoader(cfg_for(dataset), "train", batch_size=8, seed=0, with_ids=True)
    P = loader.batches_per_epoch
    batches = take(loader, 2 * P)
    pairs = [set(), set()]
    for k, b in enumerate(batches):
        for i, ip in zip(b["id1"].tolist(), b["id1p"].tolist()):
            pairs[k // P].add(frozenset((i, ip)))
    cross = [sum(ref[min(p)][2] != ref[max(p)][2] for p in ps) / len(ps) for ps in pairs]
    assert min(cross) > 0.5, cross  # most pairs join two different stored groups
    overlap = len(pairs[0] & pairs[1]) / len(pairs[0])
    assert overlap < 0.2, overlap  # the pairing is redrawn each epoch
    # An epoch is about one pass: nearly every sample appears as x1/x1' (a few appear twice where
    # the pool's leftovers make the slot read on past its share).
    used = [i for b in batches[:P] for i in b["id1"].tolist() + b["id1p"].tolist()]
    n = read_manifest(str(dataset), "train").num_samples
    assert len(set(used)) >= 0.85 * n and len(used) - len(set(used)) <= 0.15 * n


def test_seed_controls_the_stream(dataset):
    a = take(PairLoader(cfg_for(dataset), "train", 8, seed=0, with_ids=True), 3)
    b = take(PairLoader(cfg_for(dataset), "train", 8, seed=0, with_ids=True), 3)
    c = take(PairLoader(cfg_for(dataset), "train", 8, seed=1, with_ids=True), 3)
    assert [ids_of(x) for x in a] == [ids_of(x) for x in b] != [ids_of(x) for x in c]


# --------------------------------------------------------------------------- equal batch counts across ranks


@pytest.mark.parametrize("cpus_per_rank, local_ranks, expected", [
    ("1", None, 0), ("2", None, 1), ("3", "8", 2), ("16", None, 4),    # the launcher's share decides
    (None, "2", 0), (None, "1", 1), (None, None, 1),                    # else 2 usable CPUs / local ranks
])
def test_auto_workers_use_the_cores_a_rank_has_beyond_its_own(monkeypatch, cpus_per_rank, local_ranks, expected):
    import disent.host

    monkeypatch.setattr(disent.host, "available_cpus", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a thread limit leaves the other cores to workers
    for name, value in (("DISENT_CPUS_PER_RANK", cpus_per_rank), ("LOCAL_WORLD_SIZE", local_ranks)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert resolve_num_workers("auto") == expected
    assert resolve_num_workers(3) == 3


def test_more_workers_than_a_ranks_spare_cores_is_warned(monkeypatch, caplog):
    """configs/multinode_gpu.yaml once asked for 8 workers under --cpus-per-task=8: the rank had no core of its own."""
    monkeypatch.setenv("DISENT_CPUS_PER_RANK", "8")
    with caplog.at_level("WARNING", logger="disent.data.workers"):
        assert resolve_num_workers(7) == 7 and not caplog.records
        assert resolve_num_workers(8) == 8
    assert "data.num_workers=8 with 8 core(s) for this rank" in caplog.text and "at most 7" in caplog.text


def test_batches_per_epoch_is_the_same_on_every_rank(dataset):
    counts = {PairLoader(cfg_for(dataset), "train", 8, rank=r, world_size=3).batches_per_epoch for r in range(3)}
    assert len(counts) == 1


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_epoch_exactly(dataset, workers):
    cfg = cfg_for(dataset, num_workers=workers)
    full = PairLoader(cfg, "train", 8, seed=4, with_ids=True)
    P = full.batches_per_epoch
    stop = P - 1 if P > 2 else P + 1  # an odd position, just before an epoch boundary
    reference = take(full, stop + 4)
    full.close()

    first = PairLoader(cfg, "train", 8, seed=4, with_ids=True)
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["epoch"] == stop // P and state["batch"] == stop % P and state["seed"] == 4
    first.close()

    resumed = PairLoader(cfg, "train", 8, seed=4, with_ids=True)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["epoch"] == state["epoch"] and resumed.state_dict()["batch"] == state["batch"]
    after = take(resumed, 4)
    resumed.close()
    for want, got in zip(reference[stop:], after):
        for key in ("id1", "id1p", "id2", "id2p", "y1", "y2"):
            assert torch.equal(want[key], got[key])
        assert torch.equal(want["x1"], got["x1"])
    assert resumed.state_dict()["epoch"] == (stop + 4) // P
    assert resumed.wait_seconds > 0


# --------------------------------------------------------------------------- bad shards and config checks


@pytest.fixture
def damaged(tmp_path, dataset):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    return copy


def _shard_path(url, index=0):
    m = read_manifest(str(url), "train")
    return Path(m.shards[index].url)


def test_truncated_shard_raises_naming_it_or_is_skipped(damaged):
    """Local data that is wrong stays wrong: a truncated shard is refused before anything reads (its size against
    the manifest), a corrupt one of the right size when it is read; both are input errors (exit 2), not retried."""
    from disent.data.errors import DataError

    victim = _shard_path(damaged, 2)
    whole = victim.read_bytes()
    victim.write_bytes(whole[:3000])
    with pytest.raises(DataError, match=f"shard {victim} is 3000 bytes where its manifest says {len(whole)}"):
        PairLoader(cfg_for(damaged), "train", 8, with_ids=True)
    victim.write_bytes(whole[:3000] + b"\x00" * (len(whole) - 3000))  # the right size, a corrupt tail
    loader = PairLoader(cfg_for(damaged), "train", 8, with_ids=True)
    with pytest.raises(DataError) as info:
        take(loader, loader.batches_per_epoch)
    assert str(info.value).startswith(f"shard {victim}") and "not retried" in str(info.value)
    # raised in a DataLoader worker: the same one-line message naming the shard, not the worker's traceback
    loader = PairLoader(cfg_for(damaged, num_workers=1), "train", 8, with_ids=True)
    with pytest.raises(DataError) as from_worker:
        take(loader, loader.batches_per_epoch)
    loader.close()
    assert str(from_worker.value).startswith(f"shard {victim}") and "\n" not in str(from_worker.value)
    victim.write_bytes(whole[:3000])

    loader = PairLoader(cfg_for(damaged, on_error="skip", num_workers=2), "train", 8, with_ids=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = take(loader, 2 * loader.batches_per_epoch)
    loader.close()
    assert len(batches) == 2 * loader.batches_per_epoch  # still a full count of batches
    assert loader.skipped_shards >= 1
    skip_warnings = [w for w in caught if "skipped a bad shard" in str(w.message)]
    assert len(skip_warnings) == 1 and str(victim) in str(skip_warnings[0].message)
    # Sequential reading obeys the same policy.
    with pytest.warns(RuntimeWarning, match="skipped"):
        images, *_ = load_split_arrays(cfg_for(damaged, on_error="skip"), "train")
    m = read_manifest(str(damaged), "train")
    assert len(images) == m.num_samples - m.shards[2].samples


def test_checksum_mismatch_is_caught_when_verifying(damaged):
    victim = _shard_path(damaged, 0)
    data = bytearray(victim.read_bytes())
    at = data.index(b"NUMPY", data.index(b".images.npy")) + 200  # inside the first image payload
    data[at] ^= 0xFF
    victim.write_bytes(bytes(data))
    cfg = cfg_for(damaged, verify_checksums=True)
    with pytest.raises(ShardError, match="checksum") as info:
        load_split_arrays(cfg, "train")
    assert str(victim) in str(info.value)
    load_split_arrays(cfg_for(damaged), "train")  # without verification the same size passes
    loader = PairLoader(cfg_for(damaged, verify_checksums=True, on_error="skip"), "train", 8)
    with pytest.warns(RuntimeWarning, match="checksum"):
        take(loader, loader.batches_per_epoch)
    assert loader.skipped_shards >= 1


def test_missing_shard_raises_naming_it(damaged):
    victim = _shard_path(damaged, 1)
    victim.unlink()
    from disent.data.errors import DataError

    with pytest.raises(DataError, match="missing") as info:  # local: found before reading, an input error
        load_split_arrays(cfg_for(damaged), "train")
    assert str(victim) in str(info.value)


def test_config_must_match_the_manifest(dataset):
    with pytest.raises(ConfigError) as info:
        PairLoader(cfg_for(dataset, image_size=28, channels=3), "train", 8)
    msg = str(info.value)
    assert "data.image_size=28" in msg and "8x8" in msg and "data.channels=3" in msg
    assert str(Path(dataset) / "train" / "manifest.json") in msg
    with pytest.raises(ConfigError, match="data.num_classes=10"):
        load_split_arrays(cfg_for(dataset, num_classes=10), "test")


# --------------------------------------------------------------------------- one global order for any world size


def _global_batches(url, world, workers, steps, state=None, seed=5, global_batch=12):
    """`steps` global batches (each rank's rows side by side) from `world` loaders, as ranks would see them;
    and the state rank 0 would checkpoint after them."""
    loaders = [PairLoader(cfg_for(url, num_workers=workers), "train", global_batch // world, rank=r, world_size=world,
                          seed=seed, with_ids=True) for r in range(world)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    its = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in its]
        out.append({k: torch.cat([p[k] for p in parts]) for k in ("id1", "id1p", "id2", "id2p", "y1", "y2")})
    states = [loader.state_dict() for loader in loaders]
    for loader in loaders:
        loader.close()
    assert all(s["epoch"] == states[0]["epoch"] and s["batch"] == states[0]["batch"] for s in states)
    return out, json.loads(json.dumps(states[0]))


@pytest.mark.parametrize("start, world, workers", [((2, 2), 1, 0), ((2, 2), 3, 0), ((2, 2), 4, 1), ((1, 0), 2, 1)])
def test_a_resume_on_another_world_size_continues_the_same_global_order(dataset, start, world, workers):
    # Started on 2 ranks with 2 workers each (4 streams), stopped mid-epoch, resumed on 1 rank (which computes
    # all 4 streams), 3 ranks (streams split at their row boundaries) or 4 (one each); or started on 1 rank
    # (1 stream) and resumed on 2, whose halves of that stream each rank draws.
    P = PairLoader(cfg_for(dataset), "train", 12).batches_per_epoch
    stop, total = P // 2, P + P // 2  # through the end of the first epoch and into the second
    straight, _ = _global_batches(dataset, *start, total)
    before, state = _global_batches(dataset, *start, stop)
    assert state["streams"] == start[0] * max(1, start[1]) and state["world_size"] == start[0]
    assert state["global_batch"] == 12
    after, _ = _global_batches(dataset, world, workers, total - stop, state=state)
    chained = before + after
    for k, (want, got) in enumerate(zip(straight, chained)):
        for key, value in want.items():
            assert torch.equal(value, got[key]), (k, key)  # the same rows, in the same places
    # Counting sample ids over the interrupted epoch: the same uses as without the interruption (none lost,
    # none repeated), and nearly every sample used once. The repeats are the padding of equal batches: 11
    # shards of unequal sizes over 4 streams leave some streams short of their rows' share.
    n = read_manifest(str(dataset), "train").num_samples
    def uses(batches):
        return np.bincount([i for b in batches[:P] for i in b["id1"].tolist() + b["id1p"].tolist()], minlength=n)
    counts = uses(chained)
    np.testing.assert_array_equal(counts, uses(straight))
    assert counts.sum() == 2 * 12 * P and counts.max() <= 2
    assert (counts > 0).sum() >= 0.8 * n and (counts > 1).sum() <= 0.2 * n, ((counts > 0).sum(), (counts > 1).sum())


def test_an_eval_subset_is_uniform_over_the_split_not_its_first_records(tmp_path):
    # 64-sample records: the first 100 samples would be two records, at most two classes.
    src = make_npz(tmp_path / "src.npz", n=960, classes=N_CLASSES, size=8, factors=2, seed=2)
    out = tmp_path / "big-records"
    prepare(f"npz:{src}", str(out), PrepareOptions(group_size=64, groups_per_shard=3, val_fraction=0.0,
                                                   test_fraction=0.1, progress=False), echo=lambda s: None)
    cfg = cfg_for(out)
    full_images, full_labels, _, _ = load_split_arrays(cfg, "train")
    images, labels, factors, _ = load_split_arrays(cfg, "train", limit=100)
    again, *_ = load_split_arrays(cfg, "train", limit=100)
    assert images.shape == (100, 1, 8, 8) and labels.shape == (100,) and factors.shape == (100, 2)
    np.testing.assert_array_equal(images, again)  # the same subset on every call
    counts = np.bincount(labels, minlength=N_CLASSES)
    assert counts.min() >= 10, counts  # every class, near its share of 25
    rows = {row.tobytes() for row in full_images}
    assert all(row.tobytes() in rows for row in images) and len({row.tobytes() for row in images}) == 100
