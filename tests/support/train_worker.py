"""Entry point for training tests under torchrun: `disent train` plus test-only hooks.

    python -m torch.distributed.run --nproc_per_node 2 tests/support/train_worker.py [--resume P] [--no-hooks]
        [--dump-params] [--case "k=v k=v" ...] overrides...

--dump-params: every rank saves its copy of both models at each eval (ranks must agree).
--case: run several trainings one after another in one process group (saves start-up time);
        each case adds its overrides and trains in run_dir/case<i>; a `config=PATH` word in a case
        trains that config file instead of --config.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for disent

from disent.config import ConfigError, load_config  # noqa: E402
from disent.logs import setup_logging  # noqa: E402
from disent.train.commands import preflight, train_in_group  # noqa: E402


def dump_params(request):
    """Every rank's view of both models: ranks must agree (gradients were reduced)."""
    import torch

    state = {f"{name}.{k}": v.detach().clone() for name, model in request.models.items()
             for k, v in model.state_dict().items()}
    run_dir = request.out_dir.parents[1]
    torch.save(state, run_dir / f"params-rank{request.rank}-step{request.step}.pt")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resume")
    parser.add_argument("--no-hooks", action="store_true")
    parser.add_argument("--dump-params", action="store_true")
    parser.add_argument("--config", default=None)
    parser.add_argument("--case", action="append", default=[])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cases = args.case or [""]
    configs = []
    try:
        for i, case in enumerate(cases):
            extra = shlex.split(case)
            config = next((w.split("=", 1)[1] for w in extra if w.startswith("config=")), args.config)
            extra = [w for w in extra if not w.startswith("config=")]
            mine = {w.split("=", 1)[0] for w in extra}  # a case's keys replace the common ones (given once each)
            cfg = load_config(config, [*(o for o in args.overrides if o.split("=", 1)[0] not in mine), *extra])
            if args.case:
                cfg.run_dir = str(Path(cfg.run_dir) / f"case{i}")
            configs.append((cfg, preflight(cfg, args.resume, auto_resume=False, device_type="cpu")))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    hooks = None
    if args.no_hooks or args.dump_params:
        hooks = [dump_params] if args.dump_params else []

    from disent.train.distributed import init_distributed, shutdown_distributed

    env = configs[0][1].env  # the same for every case: one process group trains them all
    setup_logging(env.rank)
    init_distributed(env)
    try:
        codes = [
            train_in_group(cfg, plan, resume=args.resume, eval_hooks=hooks)
            for cfg, plan in configs
        ]
    finally:
        shutdown_distributed()
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
