"""The per-split manifest: ``<url>/<split>/manifest.json``.

It is written last by ``disent prepare`` (after every shard is complete), so a manifest never
names a missing or partial shard. ``Manifest.digest`` (sha256 of the file's bytes) identifies
the exact data a run used; the trainer logs it as an MLflow tag.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from disent.io import storage
from disent.data.errors import DataError, DataUnavailable
from disent.io.s3 import S3Unavailable

FORMAT = "disent-groups/1"
MANIFEST_NAME = "manifest.json"


@dataclass
class ShardInfo:
    name: str  # file name inside the split directory, e.g. shard-000000.tar
    url: str  # full location (local path or s3:// URL), filled in when the manifest is read
    samples: int
    groups: int
    class_counts: list[int]
    bytes: int
    sha256: str


@dataclass
class Manifest:
    split: str
    url: str  # where the manifest itself was read from
    shards: list[ShardInfo]
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    factor_names: list[str]
    source: dict[str, Any]
    group_size: int
    num_samples: int
    num_groups: int
    class_counts: list[int]
    class_names: list[str] | None = None
    seed: int | None = None
    format: str = FORMAT
    digest: str = ""  # sha256 of the manifest file's bytes
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        """What prepare writes (shard URLs are not stored: the manifest stays valid if the data moves)."""
        return {
            "format": self.format,
            "split": self.split,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "factor_names": list(self.factor_names),
            "group_size": self.group_size,
            "num_samples": self.num_samples,
            "num_groups": self.num_groups,
            "class_counts": list(self.class_counts),
            "seed": self.seed,
            "source": self.source,
            "shards": [
                {k: v for k, v in dataclasses.asdict(s).items() if k != "url"} for s in self.shards
            ],
            **self.extra,
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json_dict(), indent=1) + "\n").encode()


def manifest_url(url: str, split: str) -> str:
    return storage.join(url, split, MANIFEST_NAME)


def parse_manifest(data: bytes, where: str, split_url: str) -> Manifest:
    try:
        raw = json.loads(data)
        if raw.get("format") != FORMAT:
            raise DataError(
                f"{where} has format {raw.get('format')!r}, expected {FORMAT!r}; re-run `disent prepare`"
            )
        known = {
            "format", "split", "image_shape", "num_classes", "class_names", "factor_names", "group_size",
            "num_samples", "num_groups", "class_counts", "seed", "source", "shards",
        }
        shards = [
            ShardInfo(
                name=s["name"], url=storage.join(split_url, s["name"]), samples=int(s["samples"]),
                groups=int(s["groups"]), class_counts=[int(c) for c in s["class_counts"]],
                bytes=int(s["bytes"]), sha256=str(s["sha256"]),
            )
            for s in raw["shards"]
        ]
        return Manifest(
            split=raw["split"], url=where, shards=shards,
            image_shape=tuple(int(v) for v in raw["image_shape"]),  # type: ignore[arg-type]
            num_classes=int(raw["num_classes"]), factor_names=list(raw.get("factor_names") or []),
            source=dict(raw.get("source") or {}), group_size=int(raw["group_size"]),
            num_samples=int(raw["num_samples"]), num_groups=int(raw["num_groups"]),
            class_counts=[int(c) for c in raw["class_counts"]], class_names=raw.get("class_names"),
            seed=raw.get("seed"), digest=hashlib.sha256(data).hexdigest(),
            extra={k: v for k, v in raw.items() if k not in known},
        )
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{where} is not a valid disent manifest ({type(exc).__name__}: {exc}); "
                        "re-run `disent prepare`") from None


def read_manifest(url: str, split: str) -> Manifest:
    """Read ``<url>/<split>/manifest.json`` (local directory or s3:// prefix).

    A missing manifest raises DataError (an input error) that names the URL and says how to make it;
    an S3 endpoint that stays down raises DataUnavailable (retryable).
    """
    where = manifest_url(url, split)
    try:
        data = storage.read_bytes(where)
    except FileNotFoundError:
        raise DataError(
            f"no manifest for split '{split}' at {storage.describe(where)}: the data has not been prepared "
            f"there (or a prepare was interrupted); run `disent prepare SOURCE {url}` first "
            f"(for example `disent prepare idx:/usr/share/datasets/fashion-mnist {url}`)"
        ) from None
    except S3Unavailable as exc:
        raise DataUnavailable(f"cannot read the manifest {storage.describe(where)}: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read the manifest {storage.describe(where)}: {exc}") from None
    return parse_manifest(data, storage.describe(where), storage.join(url, split))
