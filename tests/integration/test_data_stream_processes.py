"""The pair stream across processes: 2 data-parallel ranks (spawned, gloo) draw the same number of batches from
uneven shards, and a process whose loader workers still run exits. The stream in one process:
tests/unit/test_data_stream.py."""
from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys

import pytest
import torch

from disent.data.manifest import read_manifest
from disent.data.stream import PairLoader
from disent.host import free_port
from tests.support.sources import cfg_for, prepare_shards


# --------------------------------------------------------------------------- equal batch counts across ranks


def _rank_main(rank, world, port, url, workers, steps, queue):
    """One simulated data-parallel rank: a PairLoader plus a gloo all_reduce per step, as DDP does."""
    import datetime

    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        loader = PairLoader(cfg_for(url, num_workers=workers), "train", batch_size=4, rank=rank, world_size=world,
                            seed=3, with_ids=True)
        per_epoch: dict[int, int] = {}
        ids: dict[int, set] = {}
        it = iter(loader)
        for _ in range(steps):
            epoch = loader.state_dict()["epoch"]
            batch = next(it)
            per_epoch[epoch] = per_epoch.get(epoch, 0) + 1
            ids.setdefault(epoch, set()).update(batch["id1"].tolist())
            dist.all_reduce(torch.ones(1))  # a rank without a batch here would hang the others
        dist.barrier()
        loader.close()
        queue.put((rank, loader.batches_per_epoch, per_epoch, {e: sorted(v) for e, v in ids.items()}, None))
    except Exception as exc:  # noqa: BLE001
        queue.put((rank, None, None, None, repr(exc)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("shards_wanted, groups_per_shard", [(3, 12), (5, 8)])
def test_every_rank_yields_the_same_number_of_batches_with_uneven_shards(tmp_path, shards_wanted, groups_per_shard):
    # 2 ranks x 2 workers = 4 slots; 3 shards (fewer than slots) or 5 (not a multiple), of unequal sizes.
    url = prepare_shards(tmp_path, 150, groups_per_shard=groups_per_shard)
    m = read_manifest(str(url), "train")
    assert len(m.shards) == shards_wanted and len({s.samples for s in m.shards}) > 1
    world, workers = 2, 2
    P = max(1, (m.num_samples // 2) // (4 * world))
    steps = 2 * P + 1  # two whole epochs and into the third
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(url), workers, steps, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(r[4] is None for r in results), results
    by_rank = {r[0]: r for r in results}
    for rank in range(world):
        _, bpe, per_epoch, _, _ = by_rank[rank]
        assert bpe == P
        assert per_epoch == {0: P, 1: P, 2: 1}
    # The ranks read different data (shards are split between them).
    assert by_rank[0][3][0] != by_rank[1][3][0]


_EXIT_WITH_LIVE_WORKERS = """
import sys
from disent.config import DataConfig
from disent.data.stream import PairLoader
cfg = DataConfig(url=sys.argv[1], image_size=8, channels=1, num_classes=4, shuffle_buffer=64, num_workers=2)
loader = PairLoader(cfg, "train", batch_size=4)
it = iter(loader)
next(it)
keep = [loader]
keep.append(keep)  # still alive when the interpreter's exit hooks run
print("leaving", flush=True)
"""


def test_a_process_exits_while_its_loader_workers_still_run(tmp_path):
    dataset = prepare_shards(tmp_path, 480, 10)
    # Workers ignore SIGTERM; multiprocessing's exit hook would terminate-then-join them forever.
    proc = subprocess.run([sys.executable, "-c", _EXIT_WITH_LIVE_WORKERS, str(dataset)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "leaving" in proc.stdout
