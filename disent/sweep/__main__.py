"""`python -m disent.sweep SWEEP_FILE INDEX`: the overrides of one point, one per line (slurm/train.sh
reads them for its array task)."""
import sys

from disent.config import ConfigError
from disent.sweep.backends import point_overrides
from disent.sweep.commands import read_sweep_file


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m disent.sweep SWEEP_FILE INDEX", file=sys.stderr)
        return 2
    try:
        sweep, parent_id, run_dir, _ = read_sweep_file(argv[0])
        index = int(argv[1])
        if index >= len(sweep.points()):
            raise ConfigError(f"point {index} is outside the sweep's {len(sweep.points())} points ({argv[0]})")
    except ConfigError as exc:
        print(f"disent sweep: {exc}", file=sys.stderr)
        return 2
    print("\n".join(point_overrides(sweep, index, parent_id, run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
