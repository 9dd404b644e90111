"""The `disent` command. Each subcommand validates its config before any expensive work."""
from __future__ import annotations

import argparse
import importlib
import sys

from disent import __version__
from disent.config import ConfigError, load_config, to_yaml
from disent.errors import InputError, RetryableFailure


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file, e.g. configs/fashion_mnist.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value",
        help="override a config value; the value is parsed as YAML (e.g. model.z_dim=32)",
    )


# Subcommands live beside their implementation. Each module has register(subparsers, add_config_args);
# why its handlers import inside themselves: docs/architecture.md, "Imports".
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "disent.data.commands", "disent.train.commands", "disent.eval.commands", "disent.sweep.commands",
)


def _cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disent",
        description="Adversarial disentangling autoencoders (Mathieu et al., 2016) on DeepSpeed, "
        "WebDataset and MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"disent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser("show", help="print the resolved, validated config as YAML")
    add_config_args(show)
    show.set_defaults(func=_cmd_config_show)

    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(commands, add_config_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting positionals at the first option, so overrides written after
    # options (`disent eval RUN --child-run a.b=1`) arrive here; take them, reject anything else.
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"disent: config error: {exc}", file=sys.stderr)
        return exc.exit_code
    except InputError as exc:
        print(f"disent: input error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RetryableFailure as exc:
        print(f"disent: retryable failure (exit {int(exc.exit_code)}; a restart resumes from the latest "
              f"checkpoint): {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
