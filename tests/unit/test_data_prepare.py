"""`disent prepare`: the four sources, the shard format, the manifest and every bad-input case."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from disent import cli
from disent.config import DataConfig
from disent.data import sprites
from disent.data.errors import DataError
from disent.data.manifest import read_manifest
from disent.data.prepare import PrepareOptions, prepare
from disent.data.sources import SourceOptions, parse_source, read_idx
from disent.data.reading import load_split_arrays
from disent.io import storage
from tests.support.sources import iter_groups, make_folder, make_idx_dir, make_npz, tiny_arrays

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def quiet(opts=None, **kw) -> PrepareOptions:
    o = opts or PrepareOptions(**kw)
    o.progress = False
    return o


def no_shards_written(out: Path) -> bool:
    return not out.exists() or not any(p.suffix == ".tar" for p in out.rglob("*"))


# --------------------------------------------------------------------------- sources -> shards


@pytest.fixture(params=["idx-gz", "idx-raw", "folder", "npz", "sprites"])
def any_source(request, tmp_path):
    kind = request.param
    if kind.startswith("idx"):
        return f"idx:{make_idx_dir(tmp_path / 'idx', gz=kind == 'idx-gz')}", SourceOptions()
    if kind == "folder":
        return f"folder:{make_folder(tmp_path / 'folder')}", SourceOptions()
    if kind == "npz":
        return f"npz:{make_npz(tmp_path / 'data.npz')}", SourceOptions()
    return "sprites", SourceOptions(num_samples=150, image_size=32)


def test_each_source_prepares_grouped_shuffled_shards(any_source, tmp_path):
    source, sopts = any_source
    out = tmp_path / "out"
    manifests = prepare(source, str(out), quiet(group_size=3, groups_per_shard=4, seed=5), sopts, echo=lambda s: None)
    assert set(manifests) == {"train", "val", "test"}
    for split, written in manifests.items():
        m = read_manifest(str(out), split)
        raw = (out / split / "manifest.json").read_bytes()
        assert m.digest == hashlib.sha256(raw).hexdigest() == written.digest
        assert m.num_samples == sum(s.samples for s in m.shards) == sum(m.class_counts)
        assert all(c >= 2 for c in m.class_counts), m.class_counts  # every class can form pairs
        assert m.group_size == 3 and len(m.image_shape) == 3
        cfg = DataConfig(url=str(out), image_size=m.image_shape[1], channels=m.image_shape[0],
                         num_classes=m.num_classes)
        per_shard_classes = []
        for info in m.shards:
            data = Path(info.url).read_bytes()
            assert len(data) == info.bytes and hashlib.sha256(data).hexdigest() == info.sha256
            assert info.groups <= 4
        groups = list(iter_groups(cfg, split))
        assert len(groups) == m.num_groups
        for g in groups:
            assert 1 <= len(g.ids) <= 3 and g.images.shape[1:] == tuple(m.image_shape)
            assert g.factors.shape == (len(g.ids), len(m.factor_names))
        shard_of = {}
        for g in groups:
            shard_of.setdefault(g.shard, set()).add(g.label)
        per_shard_classes = [len(v) for v in shard_of.values()]
        if split == "train":
            assert max(per_shard_classes) > 1  # groups of all classes are shuffled across shards
        # The shards store raw uint8 pixels (not PNG): each record has an .npy entry.
        with tarfile.open(m.shards[0].url) as tf:
            names = tf.getnames()
        assert any(n.endswith(".images.npy") for n in names) and any(n.endswith(".cls") for n in names)
    ids = [set(load_split_arrays_ids(out, manifests, s)) for s in ("train", "val")]
    assert not ids[0] & ids[1]  # val is carved out of train, disjoint


def load_split_arrays_ids(out, manifests, split):
    m = manifests[split]
    cfg = DataConfig(url=str(out), image_size=m.image_shape[1], channels=m.image_shape[0], num_classes=m.num_classes)
    return [int(i) for g in iter_groups(cfg, split) for i in g.ids]


def test_npz_round_trip_keeps_pixels_labels_and_factors(tmp_path):
    src = make_npz(tmp_path / "d.npz", n=90, classes=3, size=8, channels=3, factors=2)
    out = tmp_path / "out"
    prepare(f"npz:{src}", str(out), quiet(val_fraction=0.0, test_fraction=0.2), echo=lambda s: None)
    raw = np.load(src)
    cfg = DataConfig(url=str(out), image_size=8, channels=3, num_classes=3)
    m = read_manifest(str(out), "train")
    assert m.factor_names == ["f0", "f1"] and m.image_shape == (3, 8, 8)
    images, labels, factors, names = load_split_arrays(cfg, "train")
    ids = [int(i) for g in iter_groups(cfg, "train") for i in g.ids]
    assert names == ["f0", "f1"] and len(ids) == len(labels) == m.num_samples
    np.testing.assert_array_equal(images, raw["images"][ids].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(labels, raw["labels"][ids])
    np.testing.assert_allclose(factors, raw["factors"][ids])
    a, b, _, _ = load_split_arrays(cfg, "test", limit=7)
    assert a.shape == (7, 3, 8, 8) and b.dtype == np.int64


def test_sprites_are_deterministic_and_store_factors(tmp_path):
    a = sprites.generate(40, seed=3, image_size=32)
    b = sprites.generate(40, seed=3, image_size=32)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    images, labels, factors = a
    assert images.shape == (40, 3, 32, 32) and images.dtype == np.uint8
    assert set(labels.tolist()) <= set(range(5)) and factors.shape == (40, 5)
    assert images.reshape(40, -1).max(1).min() > 0  # every sprite is drawn
    # The same seed gives byte-identical shards.
    m1 = prepare("sprites", str(tmp_path / "a"), quiet(seed=3), SourceOptions(num_samples=100, seed=3), echo=lambda s: None)
    m2 = prepare("sprites:", str(tmp_path / "b"), quiet(seed=3), SourceOptions(num_samples=100, seed=3), echo=lambda s: None)
    assert [s.sha256 for s in m1["train"].shards] == [s.sha256 for s in m2["train"].shards]
    assert m1["train"].factor_names == ["x", "y", "scale", "rotation", "hue"]
    big = sprites.generate(3, seed=0, image_size=64)[0]
    assert big.shape == (3, 3, 64, 64)


def test_real_fashion_mnist_files():
    assert FASHION_DIR.is_dir(), "install the data: apt-get install -y dataset-fashion-mnist"
    labels = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10))
    images = read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert parse_source(str(FASHION_DIR)) == ("idx", str(FASHION_DIR))


def test_real_fashion_mnist_prepare_limited(tmp_path):
    out = tmp_path / "fm"
    m = prepare(f"idx:{FASHION_DIR}", str(out), quiet(), SourceOptions(limit=1500), echo=lambda s: None)
    assert m["train"].image_shape == (1, 28, 28) and m["train"].num_classes == 10
    assert m["test"].num_samples == 1500 and m["test"].source["test_from"] == "source"
    assert m["train"].class_names[0] == "T-shirt/top"


# --------------------------------------------------------------------------- bad input: clear errors, nothing written


def _expect_error(source, out, match, sopts=None):
    with pytest.raises(DataError, match=match) as info:
        prepare(source, str(out), quiet(), sopts or SourceOptions(), echo=lambda s: None)
    assert no_shards_written(out), "no shard may be written for bad input"
    return str(info.value)


def test_class_with_fewer_than_two_samples(tmp_path):
    images, labels, _ = tiny_arrays(30, 3)
    labels[labels == 2] = 0
    labels[7] = 2  # class 2 has exactly one sample
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    msg = _expect_error(f"npz:{tmp_path / 'd.npz'}", tmp_path / "out", "at least 2 samples")
    assert "class 2: 1" in msg and "d.npz" in msg
    # In a folder, a class directory with one image:
    folder = make_folder(tmp_path / "f", per_class=(4, 1, 3))
    msg = _expect_error(f"folder:{folder}", tmp_path / "out2", "at least 2")
    assert "class_1" in msg


def test_images_of_mismatched_sizes(tmp_path):
    from PIL import Image

    folder = make_folder(tmp_path / "f", per_class=(3, 3), size=8, colour=False)
    odd = folder / "class_1" / "img001.png"
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(odd)
    msg = _expect_error(f"folder:{folder}", tmp_path / "out", "same size")
    assert str(odd) in msg and "8x9" in msg


def test_a_folder_of_images_the_model_cannot_take_is_refused_naming_the_sizes(tmp_path):
    """A 32x24 folder was prepared, and then train suggested data.image_size=24, which validation refuses."""
    from PIL import Image

    folder = tmp_path / "f"
    for c in range(2):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.zeros((24, 32), np.uint8)).save(folder / f"c{c}" / f"{i}.png")
    msg = _expect_error(f"folder:{folder}", tmp_path / "out", "the images are 32x24")
    assert "square images of 28x28, 32x32, 64x64" in msg and "resize them" in msg


def test_limit_on_a_folder_keeps_every_class(tmp_path):
    """--limit took the first N files, which dropped whole classes; it now takes the classes in turn."""
    from disent.data.errors import DataError
    from disent.data.sources.folder import load_folder

    folder = make_folder(tmp_path / "f", per_class=(12, 10, 9))
    data = load_folder(str(folder), SourceOptions(limit=9))
    assert np.bincount(data.train.labels).tolist() == [3, 3, 3] and data.num_classes == 3
    with pytest.raises(DataError, match="--limit 5 leaves some of its 3 classes fewer than the 2 images .* --limit 6"):
        load_folder(str(folder), SourceOptions(limit=5))


def test_labels_out_of_range(tmp_path):
    images, labels, _ = tiny_arrays(30, 3)
    labels[13] = 7
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    msg = _expect_error(f"npz:{tmp_path / 'd.npz'}", tmp_path / "out", "out of range",
                        SourceOptions(num_classes=3))
    assert "index 13" in msg and "label 7" in msg
    labels[13] = -1
    np.savez(tmp_path / "e.npz", images=images, labels=labels)
    msg = _expect_error(f"npz:{tmp_path / 'e.npz'}", tmp_path / "out", "out of range")
    assert "index 13" in msg


def test_unreadable_files(tmp_path):
    folder = make_folder(tmp_path / "f", per_class=(3, 3))
    bad = folder / "class_0" / "img001.png"
    bad.write_bytes(b"this is not a png")
    msg = _expect_error(f"folder:{folder}", tmp_path / "o1", "unreadable image")
    assert str(bad) in msg
    d = make_idx_dir(tmp_path / "idx", gz=False)
    victim = d / "train-images-idx3-ubyte"
    victim.write_bytes(victim.read_bytes()[:-50])
    msg = _expect_error(f"idx:{d}", tmp_path / "o2", "truncated or corrupt")
    assert str(victim) in msg
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    msg = _expect_error(f"npz:{tmp_path / 'junk.npz'}", tmp_path / "o3", "unreadable")
    assert "junk.npz" in msg
    d2 = make_idx_dir(tmp_path / "idx2", gz=True)
    gzf = d2 / "t10k-labels-idx1-ubyte.gz"
    gzf.write_bytes(gzf.read_bytes()[:20])
    msg = _expect_error(f"idx:{d2}", tmp_path / "o4", "gzip")
    assert str(gzf) in msg


# --------------------------------------------------------------------------- manifest atomicity and re-runs


def test_rerun_refuses_then_overwrite_replaces(tmp_path, capsys):
    out = tmp_path / "out"
    src = make_npz(tmp_path / "d.npz", n=200)
    assert cli.main(["prepare", f"npz:{src}", str(out), "--group-size", "4", "--groups-per-shard", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "class" in printed  # the summary of counts per split and class
    before = read_manifest(str(out), "train")
    assert cli.main(["prepare", f"npz:{src}", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "manifest.json" in err
    assert read_manifest(str(out), "train").digest == before.digest  # untouched
    # Overwrite with bigger shards: fewer shards; stale ones are removed.
    assert cli.main(["prepare", f"npz:{src}", str(out), "--group-size", "4", "--groups-per-shard", "50", "--overwrite",
                     "--seed", "9", "--no-progress"]) == 0
    after = read_manifest(str(out), "train")
    assert after.digest != before.digest and len(after.shards) < len(before.shards)
    on_disk = sorted(p.name for p in (out / "train").glob("shard-*.tar"))
    assert on_disk == [s.name for s in after.shards]
    assert not list(out.rglob("*.tmp*"))


def test_interrupted_prepare_never_leaves_a_manifest_naming_partial_shards(tmp_path, monkeypatch):
    out = tmp_path / "out"
    src = make_npz(tmp_path / "d.npz", n=200)
    prepare(f"npz:{src}", str(out), quiet(groups_per_shard=3), echo=lambda s: None)
    real = storage.write_bytes_atomic
    calls = {"n": 0}

    def crash_after_two(url, data):
        if url.endswith(".tar"):
            calls["n"] += 1
            if calls["n"] > 2:
                raise KeyboardInterrupt("simulated interruption")
        return real(url, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare(f"npz:{src}", str(out), quiet(groups_per_shard=3, overwrite=True, seed=1), echo=lambda s: None)
    for split in ("train", "val", "test"):
        assert not (out / split / "manifest.json").exists()
        with pytest.raises(DataError, match="disent prepare"):
            read_manifest(str(out), split)
    # A fresh prepare (no manifest left) goes ahead without --overwrite and is consistent again.
    monkeypatch.setattr(storage, "write_bytes_atomic", real)
    m = prepare(f"npz:{src}", str(out), quiet(groups_per_shard=3), echo=lambda s: None)["train"]
    for info in m.shards:
        assert hashlib.sha256(Path(info.url).read_bytes()).hexdigest() == info.sha256
    assert json.loads((out / "train" / "manifest.json").read_text())["num_samples"] == m.num_samples


def test_missing_manifest_names_url_and_suggests_prepare(tmp_path):
    with pytest.raises(DataError) as info:
        read_manifest(str(tmp_path / "nowhere"), "train")
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "train" / "manifest.json") in msg and "disent prepare" in msg


def test_cli_lists_prepare_and_rejects_unknown_source(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    assert "sprites" in capsys.readouterr().out
    assert cli.main(["prepare", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
