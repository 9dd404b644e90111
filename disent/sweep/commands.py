"""`disent sweep`: many runs of one config, one MLflow parent run with a child per point."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from disent.config import ConfigError, load_config, to_yaml

BACKENDS = ("local", "slurm", "k8s")


def _sweep_file_record(sweep, parent_id: str, run_dir: str, uri: str) -> str:
    return json.dumps({"sweep": json.loads(sweep.to_json()), "parent_run_id": parent_id, "run_dir": run_dir,
                       "tracking_uri": uri}, indent=2)


def read_sweep_file(path: str | Path) -> tuple:
    """(Sweep, parent run id, run_dir, tracking URI) from the file `disent sweep` writes for its tasks."""
    from disent.sweep.points import Sweep

    try:
        raw = json.loads(Path(path).read_text())
        sweep = raw["sweep"]
        return (Sweep(sweep["config"], sweep["axes"], sweep["mode"], sweep.get("base_overrides", [])),
                raw["parent_run_id"], raw["run_dir"], raw["tracking_uri"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"sweep file {path} cannot be read ({exc}); it is written by `disent sweep`") from None


def say(message: str) -> None:
    """Status on stderr; stdout carries what a dry run prints (commands, manifests)."""
    print(message, file=sys.stderr, flush=True)


def _print_rows(rows: list[dict]) -> None:
    for row in rows:
        results = " ".join(f"{k}={row[k]:.3f}" for k in ("class_from_s", "class_from_mu") if row.get(k) is not None)
        say(f"  {row['status']:<9} {row['label']}  {results}  ({row['run_id']})")


def _print_best(best: dict | None) -> None:
    if best is None:
        return
    where = f"models:/{best['name']}/latest" if best.get("name") else f"runs:/{best['run_id']}/model"
    say(f"disent sweep: best point {best['label']} (class from s - class from mu = {best['score']:.3f}); "
        f"load it with disent.load({where!r})")


def _cmd_summarize(args: argparse.Namespace) -> int:
    """--summarize PARENT (by hand), or --finish-if-complete SWEEP_FILE (a point that ended, from its job)."""
    from disent.sweep import summary
    from disent.tracking.run import tracking_uri

    if args.summarize:
        result = summary.summarize(args.tracking_uri or tracking_uri(), args.summarize, finish=True)
        _print_rows(result["rows"])
        _print_best(result["best"])
        return 0
    sweep, parent_id, run_dir, uri = read_sweep_file(args.finish_if_complete)
    if args.point is None:
        raise ConfigError("--finish-if-complete needs --point INDEX, the point that ended")
    done = summary.finish_if_complete(uri, parent_id, run_dir, args.point, len(sweep.points()))
    say("disent sweep: summarised" if done else "disent sweep: not the last point to end; not summarised")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from disent.sweep import backends, summary
    from disent.sweep.points import build_sweep
    from disent.tracking.run import experiment_name, tracking_uri

    if args.summarize or args.finish_if_complete:
        return _cmd_summarize(args)
    if not args.config:
        raise ConfigError("disent sweep needs CONFIG and key=v1,v2 arguments (or --summarize PARENT_RUN_ID)")
    _check_backend(args)
    sweep = build_sweep(args.config, args.values, "zip" if args.zip else "grid")  # every point checked here
    first = load_config(args.config, sweep.overrides(sweep.points()[0]))
    uri = args.tracking_uri or tracking_uri(first)
    sweep.base_overrides.append(f"tracking.uri={uri}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = name_slug(first.name, stamp)
    if args.backend == "k8s":  # the points' pods share only the template's volume claims
        run_dir = backends.k8s_run_dir(Path(args.k8s_template), args.run_dir, folder, uri, first.data.url)
    else:
        run_dir = args.run_dir or str(Path(first.run_dir).parent / folder)
    shown = sweep.varying() or list(sweep.axes)  # one-value keys are shared settings: the parent's params
    name = args.name or f"sweep {first.name}: " + " ".join(f"{k}={','.join(sweep.axes[k])}" for k in shown)
    points = sweep.points()
    say(f"disent sweep: {len(points)} point(s) ({sweep.mode}) of {args.config}, backend {args.backend}:")
    for index, point in enumerate(points):
        say(f"  {index}: {sweep.label(point)}")
    if args.dry_run:
        return _dry_run(args, sweep, run_dir, name, uri, name_slug(first.name, "dry-run"))
    parent_id = summary.start_parent(uri, experiment_name(first), sweep, name, args.register_best)
    say(f"disent sweep: MLflow parent run {parent_id} ({name})")
    if args.backend == "k8s":
        manifests = _k8s_manifests(args, sweep, parent_id, run_dir, uri, folder)
        backends.apply_k8s(backends.render_k8s(manifests), echo=say)
        say(f"disent sweep: the last point to end summarises the sweep; or run `disent sweep --summarize "
            f"{parent_id}`. Follow with: kubectl get jobs -l disent/sweep={manifests[0]['metadata']['labels']['disent/sweep']}")
        return 0
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    sweep_file = Path(run_dir) / "sweep.json"
    sweep_file.write_text(_sweep_file_record(sweep, parent_id, run_dir, uri))
    if args.backend == "local":
        codes = backends.run_local(sweep, parent_id, run_dir, args.nproc, args.parallel, echo=say)
        result = summary.summarize(uri, parent_id, Path(run_dir) / "summary")
        _print_rows(result["rows"])
        _print_best(result["best"])
        say(f"disent sweep: summary in {result['csv']} and {result['png']} (also on the parent run)")
        return next((c for c in codes if c != 0), 0)
    job = backends.submit_slurm(sweep, sweep_file, args.sbatch_arg, echo=say, script=args.slurm_script)
    say(f"disent sweep: the last task to end summarises the sweep; or run `disent sweep --summarize "
        f"{parent_id}`. Follow with: squeue -j {job}")
    return 0


def _check_backend(args: argparse.Namespace) -> None:
    """What the backend starts from, found (or refused) before a run or a job exists: disent's launcher
    (local), the job script (slurm) or the manifest template (k8s)."""
    from disent.host import check_launcher
    from disent.sweep import backends

    if args.backend == "local":
        check_launcher()
    elif args.backend == "slurm":
        args.slurm_script = str(backends.template("slurm/train.sh", args.slurm_script))
    elif args.backend == "k8s":
        args.k8s_template = str(backends.template("k8s/job.yaml", args.k8s_template))


def name_slug(config_name: str, stamp: str) -> str:
    return f"sweep-{config_name}-{stamp}"


def _k8s_manifests(args, sweep, parent_id: str, run_dir: str, uri: str, name: str) -> list[dict]:
    """The pods train the sweep's config as resolved here (its `extends` chain and the sweep's own
    settings merged into one file), so what was validated is what runs."""
    from disent.sweep import backends

    config_yaml = to_yaml(load_config(args.config, sweep.base_overrides))
    return backends.k8s_manifests(sweep, Path(args.k8s_template), parent_id, run_dir, name, config_yaml,
                                  _sweep_file_record(sweep, parent_id, run_dir, uri))


def _dry_run(args, sweep, run_dir: str, name: str, uri: str, k8s_name: str) -> int:
    from disent.sweep import backends

    placeholder = "PARENT_RUN_ID"
    if args.backend == "k8s":
        manifests = _k8s_manifests(args, sweep, placeholder, run_dir, uri, k8s_name)
        sys.stdout.write(backends.render_k8s(manifests))
        return 0
    for index in range(len(sweep.points())):
        overrides = backends.point_overrides(sweep, index, placeholder, run_dir)
        print("  " + shlex.join(["disent", "train", sweep.config, *overrides]))
    if args.backend == "slurm":
        command = backends.slurm_command(len(sweep.points()), args.sbatch_arg, sweep.config, args.slurm_script)
        print(f"  {backends.SWEEP_ENV}={Path(run_dir) / 'sweep.json'} " + shlex.join(command))
    say(f"disent sweep: dry run; nothing submitted (parent run {name!r} not created)")
    return 0


def register(subparsers, add_config_args) -> None:
    sw = subparsers.add_parser(
        "sweep", help="run a config over a grid (or zip) of values: one MLflow parent run, one child per point",
        description="Expands key=v1,v2 arguments into points (every combination with --grid, the default; the "
        "i-th values together with --zip), checks every point's config before anything starts, creates an MLflow "
        "parent run and runs each point as a child run named by the values that differ. At the end the parent "
        "gets summary/summary.csv and summary/leakage.png (class from s against class from mu, one point per child).",
    )
    sw.add_argument("config", nargs="?", help="YAML config file, e.g. configs/sprites.yaml")
    sw.add_argument("values", nargs="*", metavar="key=v1,v2", help="a config key and its values; one value: every point")
    mode = sw.add_mutually_exclusive_group()
    mode.add_argument("--grid", action="store_true", help="every combination of the values (default)")
    mode.add_argument("--zip", action="store_true", help="the i-th value of every key together")
    sw.add_argument("--backend", choices=BACKENDS, default="local")
    sw.add_argument("--parallel", type=int, default=1, metavar="N", help="local: points run at the same time")
    sw.add_argument("--nproc", type=int, default=None, metavar="N", help="local: ranks per point (launcher --nproc)")
    sw.add_argument("--run-dir", help="where the points' run directories go (default: beside the config's run_dir)")
    sw.add_argument("--name", help="the parent run's name")
    sw.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, or $MLFLOW_TRACKING_URI)")
    sw.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                    help="slurm: an extra sbatch argument, e.g. --sbatch-arg=--partition=gpu (repeatable)")
    sw.add_argument("--slurm-script", metavar="PATH",
                    help="slurm: the job script each array task runs (default: slurm/train.sh as installed "
                    "with disent)")
    sw.add_argument("--k8s-template", metavar="PATH",
                    help="k8s: the manifests each point's Indexed Job is made from (default: k8s/job.yaml as "
                    "installed with disent)")
    sw.add_argument("--register-best", metavar="NAME",
                    help="register the best child's model (class from s minus class from mu) as NAME in the "
                    "Model Registry when the sweep is summarised: disent.load('models:/NAME/latest')")
    sw.add_argument("--dry-run", action="store_true", help="print the points and what would run; submit nothing")
    sw.add_argument("--summarize", metavar="PARENT_RUN_ID", help="write the summary of a sweep and finish its parent")
    sw.add_argument("--finish-if-complete", metavar="SWEEP_FILE", help=argparse.SUPPRESS)  # slurm/train.sh
    sw.add_argument("--point", type=int, help=argparse.SUPPRESS)
    sw.set_defaults(func=_cmd_sweep)
