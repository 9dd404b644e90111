"""The registry of evaluation metrics that `disent.eval.evaluate.evaluate()` runs.

Adding a metric is one function and a decorator, next to the others in disent/eval/evaluate.py:

    @register_metric("my_metric", headline=("my_key",))
    def my_metric(ctx: EvalContext) -> dict:
        return {"my_key": float(ctx.test_codes["mu"].std())}

Nothing else changes: evaluate() runs every registered metric in registration order (the order of
definition, which is also the order they draw random numbers in) and merges what they return into
eval.json (two metrics returning the same key is an error); every int or float value is logged to
MLflow as eval/<key>; the `headline` keys also go into the one-line summary of the training log.
Values must be JSON-able; a metric with nothing to report for this data returns {}.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from disent.config import Config

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from disent.eval.evaluate import Split
    from disent.models.vae import DisentVAE


@dataclass(frozen=True)
class EvalContext:
    """What every metric may use, computed once per evaluation. Codes are numpy float32 arrays
    keyed s, mu, logvar and z (one sampled z); out_dir exists already."""

    vae: DisentVAE  # in eval mode
    cfg: Config
    train: Split
    test: Split
    train_codes: dict
    test_codes: dict
    device: torch.device
    out_dir: Path

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def epochs(self) -> int:
        return self.cfg.eval.probe_epochs

    @property
    def classes(self) -> int:
        return self.cfg.data.num_classes


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[EvalContext], dict]
    headline: tuple[str, ...]  # keys of its result worth a place in the training log line


_REGISTRY: dict[str, Metric] = {}


def register_metric(name: str, headline: tuple[str, ...] = ()) -> Callable:
    """Decorator: run `fn(ctx) -> dict` as part of every evaluation, after the metrics registered before it."""

    def decorate(fn: Callable[[EvalContext], dict]) -> Callable[[EvalContext], dict]:
        if name in _REGISTRY:
            raise ValueError(f"an eval metric named {name!r} is registered already ({_REGISTRY[name].fn.__qualname__})")
        _REGISTRY[name] = Metric(name, fn, tuple(headline))
        return fn

    return decorate


def registered_metrics() -> list[Metric]:
    return list(_REGISTRY.values())


def run_metrics(ctx: EvalContext, metrics: list[Metric] | None = None) -> dict:
    """Every metric's results merged into one dict, in registration order. A metric that fails does not take the
    others with it: its error goes under `failed_metrics` (name -> error) and the rest are kept. Each metric's start
    and time are logged, so a long evaluation shows where it is."""
    merged: dict = {}
    owner: dict[str, str] = {}
    failed: dict[str, str] = {}
    chosen = registered_metrics() if metrics is None else metrics
    started = time.monotonic()
    for number, metric in enumerate(chosen, 1):
        begun = time.monotonic()
        log.info("evaluation %d/%d: %s ...", number, len(chosen), metric.name)
        try:
            found = metric.fn(ctx)
        except Exception as exc:  # noqa: BLE001 - named in the results and the log; the others still run
            failed[metric.name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            log.error("evaluation %d/%d: %s failed (%s)", number, len(chosen), metric.name, failed[metric.name],
                      exc_info=True)
            continue
        log.info("evaluation %d/%d: %s done in %.1f s (%.0f s so far)", number, len(chosen), metric.name,
                 time.monotonic() - begun, time.monotonic() - started)
        for key, value in found.items():
            if key in owner:
                raise ValueError(f"eval metrics {owner[key]!r} and {metric.name!r} both return the key {key!r}")
            owner[key] = metric.name
            merged[key] = value
    if failed:
        merged["failed_metrics"] = failed
    return merged


def headline(results: dict) -> str:
    """'key 0.912, key 0.200, ...' for the registered headline keys present in `results`, in registration order."""
    keys = [key for metric in registered_metrics() for key in metric.headline if key in results]
    return ", ".join(f"{key} {results[key]:.3f}" if isinstance(results[key], float) else f"{key} {results[key]}" for key in keys)
