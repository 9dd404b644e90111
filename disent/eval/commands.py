"""`disent eval` and `disent swap`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from disent.config import Config, ConfigError
from disent.logs import setup_logging

log = logging.getLogger(__name__)

@dataclass
class TrainedModel:
    vae: object  # DisentVAE, in eval mode
    cfg: Config
    info: object  # disent.checkpoint.CheckpointInfo it was read from
    mlflow_run_id: str | None

    @property
    def checkpoint(self) -> Path:
        return self.info.path

    @property
    def step(self) -> int:
        return self.info.step


def load_trained(path: str | Path, overrides: list[str] = ()) -> TrainedModel:
    """A run directory (its latest complete checkpoint) or one checkpoint directory."""
    from disent.api import read_checkpoint

    info, cfg, vae = read_checkpoint(path, overrides)
    return TrainedModel(vae.eval(), cfg, info, info.meta().get("mlflow_run_id"))


def log_evaluation(cfg: Config, metrics: dict, out_dir: Path, step: int, run_id: str | None, child: bool) -> str | None:
    """Log eval/* metrics, the grids and eval.json to the training run (or a child run of it)."""
    from disent.tracking.naming import run_name
    from disent.eval.evaluate import numeric_metrics
    from disent.tracking import MLflowLogger

    logger = MLflowLogger.from_config(cfg, rank=0)
    logger.system_metrics = False
    if child or run_id is None:
        tags = {"mlflow.parentRunId": run_id, "disent.kind": "evaluation"} if run_id else {"disent.kind": "evaluation"}
        logger.start(run_name=f"eval {run_name(cfg)} @ step {step}", tags=tags)
    else:
        logger.start(run_id=run_id)
    logger.log_metrics(numeric_metrics(metrics), step=step)
    for path in sorted(out_dir.glob("*.png")) + [out_dir / "eval.json"]:
        logger.log_artifact(path, f"eval/step-{step:08d}")
    logger.close(status="FINISHED")
    return logger.run_id


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from disent.eval.evaluate import evaluate
    from disent.host import available_cpus

    setup_logging()  # each metric's progress on stderr
    model = load_trained(args.path, args.overrides)
    out_dir = Path(args.output) if args.output else model.info.eval_dir
    done = out_dir / "eval.json"
    if done.is_file() and not (args.redo or args.overrides or args.output):
        # The training's own evaluation of this step (or an earlier `disent eval`): the same work, already in MLflow.
        metrics = json.loads(done.read_text())
        print(f"step {model.step} of {model.checkpoint} is evaluated already: {done} (--redo evaluates it again)",
              file=sys.stderr)
        run_id = model.mlflow_run_id
    else:
        torch.set_num_threads(available_cpus())  # the cores this process may use, as the launcher gives a rank
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        metrics = evaluate(model.vae.to(device), model.cfg, out_dir, device)
        run_id = None
        if not args.no_mlflow:
            run_id = log_evaluation(model.cfg, metrics, out_dir, model.step, model.mlflow_run_id, args.child_run)
    metrics.update(checkpoint=str(model.checkpoint), step=model.step, mlflow_run_id=run_id or model.mlflow_run_id)
    done.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    json.dump({k: v for k, v in metrics.items() if k != "grids"}, sys.stdout, indent=2, sort_keys=True)
    print(f"\nwrote {done}" + (f" and grids: {', '.join(metrics['grids'].values())}" if "grids" in metrics else ""))
    for name, error in metrics.get("failed_metrics", {}).items():
        print(f"disent: ERROR: the eval metric {name} failed: {error} (the others are in {done})", file=sys.stderr)
    return 1 if metrics.get("failed_metrics") else 0


def _cmd_swap(args: argparse.Namespace) -> int:
    from disent.eval.analogy import write_analogies

    for label, path in (("--content", args.content), ("--style", args.style)):
        if not path.exists():
            raise ConfigError(f"{label} {path} does not exist")
    if args.content.is_dir() != args.style.is_dir():
        raise ConfigError("--content and --style must both be image files or both be folders")
    if not args.content.is_dir():
        from PIL import Image

        if args.output.suffix.lower() not in Image.registered_extensions():
            raise ConfigError(f"-o {args.output}: the image's format comes from its extension; name the file with "
                              f"one, e.g. -o {args.output.with_suffix('.png')} (a folder only when --content and "
                              "--style are folders)")
    import torch

    from disent.host import available_cpus

    torch.set_num_threads(available_cpus())  # the cores this process may use, as the launcher gives a rank
    model = load_trained(args.checkpoint)
    written = write_analogies(model.vae, args.content, args.style, args.output,
                              model.cfg.data.channels, model.cfg.data.image_size)
    print(f"wrote {len(written)} image(s): {written[-1] if len(written) > 1 else written[0]}")
    return 0


def register(subparsers, add_config_args) -> None:
    ev = subparsers.add_parser(
        "eval", help="measure disentanglement of a trained run on the held-out split",
        description="Class probes on s and z, factor read-out (sprites), reconstruction and swap errors, and "
        "image grids. Results go to <checkpoint>/eval/eval.json, the PNG grids beside it, and the run's MLflow run.",
    )
    ev.add_argument("path", help="run directory (uses its latest complete checkpoint) or a checkpoints/step-* directory")
    ev.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="override the stored config (e.g. eval.max_test_samples=500 data.url=s3://...)")
    ev.add_argument("--output", help="directory for eval.json and the grids (default: run_dir/eval/step-N, where the "
                    "training's own evaluation of that step goes)")
    ev.add_argument("--redo", action="store_true", help="evaluate again a step that has an eval.json already")
    ev.add_argument("--child-run", action="store_true", help="log to a child MLflow run of the training run")
    ev.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ev.set_defaults(func=_cmd_eval)

    sw = subparsers.add_parser(
        "swap", help="single-image analogies: the class of --content drawn in the style of --style",
        description="Renders Dec(z of STYLE, s of CONTENT). With two folders, every pair plus grid.png.",
    )
    sw.add_argument("--checkpoint", required=True, help="run directory or checkpoints/step-* directory")
    sw.add_argument("--content", required=True, type=Path, help="image (or folder) that gives the class (s)")
    sw.add_argument("--style", required=True, type=Path, help="image (or folder) that gives the style (z)")
    sw.add_argument("-o", "--output", required=True, type=Path, help="output PNG (or folder)")
    sw.set_defaults(func=_cmd_swap)
