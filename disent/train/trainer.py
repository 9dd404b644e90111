"""The step-based training loop over the two DeepSpeed engines.

One step = `train.grad_accum` micro-batches; for each micro-batch:
  1. the VAE engine's forward computes the VAE loss with the discriminator's module frozen,
     `vae_engine.backward(loss)`, `vae_engine.step()`;
  2. the discriminator engine judges real pairs against the (detached) fakes,
     `disc_engine.backward(real + fake)`, `disc_engine.step()`.
DeepSpeed applies the optimizer update at the accumulation boundary.

After each step come the periodic actions, each owned by its own component: the metrics window
(train/metrics.py, every `log_every` steps), the profiler (train/profiler.py), the eval hooks
(train/hooks.py, every `eval_every` steps and at the end), the checkpoint (disent/checkpoint/,
every `checkpoint_every` steps and at the end) and the stop signal (disent/signals.py): SIGTERM/SIGUSR1/Ctrl-C make
every rank finish its step, checkpoint and return with `preempted=True` (exit 75, requeued; 130 for Ctrl-C).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from disent.api import Model
from disent.checkpoint import CheckpointInfo, CheckpointManager
from disent.config import Config, changed_keys, flatten, to_dict, to_yaml
from disent.data.stream import PairLoader
from disent.errors import ExitCode
from disent.process_group import from_rank_zero
from disent.signals import PreemptionFlag
from disent.tracking import MLflowLogger
from disent.tracking.naming import run_name, training_tags
from disent.train.distributed import agree_any, apply_determinism, wait_for_rank_zero
from disent.train.engines import Engines, build_engines, frozen, stage0_grad_norm
from disent.train.hooks import EvalRequest, EvaluationHook
from disent.train.metrics import TrainingMetrics
from disent.train.plan import RunPlan, write_plan
from disent.train.profiler import StepProfiler
from disent.train.pruning import prune_quiet_units
from disent.train.progress import ProgressReport
from disent.train.rng import isolated_rng, rng_state, seed_everything, set_rng_state
from disent.train.summary import RunSummary

log = logging.getLogger(__name__)

IMAGE_KEYS = ("x1", "x1p", "x2", "x2p")

LoaderFactory = Callable[..., Any]  # (data_cfg, split, batch_size, rank, world_size, seed, manifest=) -> PairLoader


def make_loader(data_cfg, split: str, batch_size: int, rank: int, world_size: int, seed: int, manifest=None):
    """The one place the trainer gets its data loader from."""
    return PairLoader(data_cfg, split, batch_size, rank, world_size, seed, manifest=manifest)


# --------------------------------------------------------------------------- trainer


@dataclass
class TrainResult:
    step: int
    preempted: bool  # stopped by a signal, after its checkpoint
    run_id: str | None
    checkpoint: Path | None
    eval_failures: list[str] = dataclasses.field(default_factory=list)
    interrupted: bool = False  # the signal was Ctrl-C (SIGINT)

    @property
    def exit_code(self) -> int:
        return ExitCode.OK if not self.preempted else ExitCode.INTERRUPTED if self.interrupted else ExitCode.PREEMPTED


class Trainer:
    """Owns the engines, the loader, the tracker and the checkpoints of one run; what the run derives (world size,
    device, micro batch, DeepSpeed configs, the training manifest) it reads from its plan."""

    def __init__(
        self,
        cfg: Config,
        plan: RunPlan,
        loader_factory: LoaderFactory | None = None,
        tracker=None,
        eval_hooks: list[Callable[[Any], None]] | None = None,  # each called with an EvalRequest (train/hooks.py)
        preemption: PreemptionFlag | None = None,
    ):
        self.cfg = cfg
        self.plan = plan
        self.env = env = plan.env
        self.run_dir = Path(cfg.run_dir)
        self.loader_factory = loader_factory or make_loader
        self.step = 0
        self.eval_hooks = list(eval_hooks) if eval_hooks is not None else [EvaluationHook()]
        # Installed by train(), or earlier by the caller (the CLI: before the engines are built, so a
        # preemption during start-up means "one step, checkpoint, exit 75" rather than dying with 143).
        self.preemption = preemption or PreemptionFlag()
        self.checkpoints = CheckpointManager(self.run_dir, cfg.train.keep_checkpoints, cfg.train.checkpoint_upload_url)
        self.layout = self.checkpoints.layout  # every path under run_dir
        self._last_checkpoint_step: int | None = None
        self.world_size_change: tuple[int, int] | None = None  # (written by, now) when resumed on another world size
        self._last_checkpoint: Path | None = None
        self._output_dtype: torch.dtype | None = None

        # Same weights on every rank (DeepSpeed broadcasts rank 0's anyway); per-rank noise after.
        seed_everything(cfg.seed)
        self.deterministic = apply_determinism(cfg.train.deterministic, env.device_type)
        self.eval_failures: list[str] = []  # "step N: Error: message", also tagged on the MLflow run
        self.engines: Engines = build_engines(cfg, plan)
        self._seed_this_rank(step=0)
        self.loader = self.loader_factory(
            cfg.data, cfg.data.train_split, plan.micro_batch, env.rank, env.world_size, cfg.seed, manifest=plan.manifest
        )
        if tracker is None:
            tracker = MLflowLogger.from_config(cfg, env.rank, env.local_rank)
        self.tracker = tracker  # owns the MLflow run id (rank 0's, broadcast to every rank at start)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The trainer's own part of a checkpoint: the step and every RNG (the loader is a part of its own)."""
        return {"step": self.step, "rng": rng_state()}

    def _seed_this_rank(self, step: int) -> None:
        """Per-rank noise: distinct on every rank, and fresh at the step a resume on another world size starts."""
        seed_everything(self.cfg.seed + 1_000_003 * self.env.rank + 7_919 * step)

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        set_rng_state(state["rng"])

    @property
    def checkpoint_parts(self) -> dict[str, Any]:
        """What a checkpoint holds, by name: both engines, the data loader, the trainer's step and RNG."""
        return {"vae": self.engines.vae, "disc": self.engines.disc, "loader": self.loader, "trainer": self}

    def save_checkpoint(self) -> Path:
        meta = {"mlflow_run_id": self.tracker.run_id, "config": to_dict(self.cfg)}
        path = self.checkpoints.save(self.step, self.checkpoint_parts, meta, vae=self.engines.vae_model)
        self._last_checkpoint_step, self._last_checkpoint = self.step, path
        return path

    def restore(self, info: CheckpointInfo) -> dict:
        """Load every part from a checkpoint; returns its meta. A checkpoint written by another number
        of ranks continues here: the engines are resharded, the RNG is seeded afresh per rank (the
        written ranks' streams do not map onto the new ones) and the change is recorded in MLflow."""
        meta = self.checkpoints.load(info, self.checkpoint_parts)
        self._last_checkpoint_step, self._last_checkpoint = self.step, info.path
        written_by = int(meta["world_size"])
        if written_by != self.env.world_size:  # the manager has logged the resharding itself
            self._seed_this_rank(self.step)
            self.world_size_change = (written_by, self.env.world_size)
            if self.env.is_main:
                log.info("RNG seeded afresh per rank at step %d: the model's noise differs from here on (the data "
                         "order does not: it is global)",
                         self.step)
        changed = changed_keys(meta.get("config", {}), to_dict(self.cfg))
        if self.env.is_main and changed:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))
        log.info("resumed from %s at step %d", info.path, self.step)
        return meta

    # ------------------------------------------------------------------ data

    def _to_device(self, batch: dict) -> dict[str, torch.Tensor]:
        device = self.env.device
        dtype = self._compute_dtype
        out = {}
        for key in IMAGE_KEYS:
            x = batch[key].to(device, non_blocking=True).float().div_(255)
            if dtype != torch.float32:
                x = x.to(dtype)
            if self.cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out[key] = x
        out["y1"] = batch["y1"].to(device, non_blocking=True)
        out["y2"] = batch["y2"].to(device, non_blocking=True)
        return out

    @property
    def _compute_dtype(self) -> torch.dtype:
        return next(self.engines.vae.module.parameters()).dtype

    # ------------------------------------------------------------------ one step

    def train_step(self, batches) -> dict[str, torch.Tensor]:
        """One optimizer step of both engines (grad_accum micro-batches). Returns detached terms."""
        accum = self.plan.grad_accum
        sums: dict[str, torch.Tensor] = {}
        norms: dict[str, torch.Tensor | None] = {}
        for micro in range(accum):
            with isolated_rng():
                batch = next(batches)
            terms = self._micro_step(self._to_device(batch), boundary=micro == accum - 1, stage0_norms=norms)
            for key, value in terms.items():
                value = value.float() / accum
                sums[key] = sums[key] + value if key in sums else value
        for name, engine in (("vae", self.engines.vae), ("disc", self.engines.disc)):
            norm = engine.get_global_grad_norm()
            norm = norms.get(name) if norm is None else norm
            if norm is not None:  # a tensor stays on its device: reading it here would wait for the GPU
                sums[f"grad_norm/{name}"] = torch.as_tensor(norm, dtype=torch.float32, device=self.env.device)
        return sums

    def _micro_step(self, b: dict, boundary: bool, stage0_norms: dict) -> dict[str, torch.Tensor]:
        """The VAE's forward/backward/step with the critics frozen, then the critics'. At the accumulation
        boundary, ZeRO 0's gradient norms are taken before step() clears them."""
        vae_engine, disc_engine = self.engines.vae, self.engines.disc
        disc_module = disc_engine.module
        with frozen(disc_module):
            vae_loss, terms, fakes = vae_engine(b["x1"], b["x1p"], b["x2"], b["x2p"], b["y2"],
                                                discriminator=disc_module, step=self.step, y1=b["y1"])
            vae_engine.backward(vae_loss)
        self._output_dtype = fakes.from_z1.dtype  # what the decoder's convolutions produced (the run summary)
        if boundary:
            stage0_norms["vae"] = stage0_grad_norm(vae_engine)
        vae_engine.step()

        d_loss, d_terms = self.engines.objective.discriminator_losses(disc_engine, b["x2"], b["x2p"], b["y2"], fakes)
        disc_engine.backward(d_loss)
        if boundary:
            stage0_norms["disc"] = stage0_grad_norm(disc_engine)
        disc_engine.step()
        return {**terms, **d_terms, "vae_loss": vae_loss.detach(), "disc_loss": d_loss.detach()}

    # ------------------------------------------------------------------ loop

    def train(self, resume: str | os.PathLike | None = None, auto_resume: bool = True,
              exiting: bool = False) -> TrainResult:
        """Run to cfg.train.steps (or until preempted). Resumes from `resume` or the latest checkpoint.

        exiting=True: the process exits once this returns (the CLI): after the stop checkpoint (or the
        final one) is complete, SIGTERM and SIGUSR1 are ignored for the rest of the process's life.
        Otherwise the previous handlers are restored on return.
        """
        self._start_tracking(self._resume(resume, auto_resume))
        self.preemption.install()
        status, preempted = "FAILED", False
        self.summary = RunSummary(self.env.device, self.cfg.train.compile, self.cfg.train.global_batch_size)
        try:
            preempted = self._run_steps(exiting)
            if not preempted:
                self._finish(exiting)
            status = "KILLED" if preempted else "FINISHED"
        finally:
            self.summary.report(status, self.layout.summary, self.tracker, self.env.is_main, self.step)
            self._teardown(status, exiting)
        return TrainResult(step=self.step, preempted=preempted, run_id=self.tracker.run_id, checkpoint=self._last_checkpoint,
                           eval_failures=list(self.eval_failures), interrupted=self.preemption.interrupted)

    def _run_steps(self, exiting: bool) -> bool:
        """Train until cfg.train.steps; True when a stop signal ended the run first."""
        cfg, env, total = self.cfg, self.env, self.cfg.train.steps
        batches = iter(self.loader)
        log.info("training from step %d to %d (%d ranks, micro batch %d, %s loader workers per rank, %s)",
                 self.step, total, env.world_size, self.plan.micro_batch, getattr(self.loader, "num_workers", "?"),
                 env.device_type)
        progress = ProgressReport(cfg.name, self.step, total, bar=env.is_main and cfg.train.progress)
        profiler = StepProfiler(cfg.train.profile_steps, total - self.step, self.layout.profile, env.rank, self.tracker)
        with progress, profiler:
            metrics = TrainingMetrics(
                file=self.layout.metrics, log_every=cfg.train.log_every, last_step=total,
                global_batch=cfg.train.global_batch_size, is_main=env.is_main, tracker=self.tracker, progress=progress,
                reduce_on=env.device if env.backend == "nccl" else torch.device("cpu"), loader=self.loader,
                lrs=self.engines.lrs)
            while self.step < total:
                terms = self.train_step(batches)
                self.step += 1
                self.summary.step(terms, self._output_dtype)
                profiler.step()
                metrics.record(self.step, terms)
                stop = self._stop_agreed()
                evaluate = self.step % cfg.train.eval_every == 0 and self.step < total and not stop
                # An evaluation step is a checkpoint step, and the checkpoint comes first: a run that fails while
                # its ranks wait for the evaluation resumes after it instead of redoing the steps and the evaluation.
                if self.step == total and cfg.model.prune_below_kl > 0:  # before the final checkpoint, which keeps it
                    prune_quiet_units(self.engines.vae_model, batches, self._to_device, cfg.model.prune_below_kl)
                if self.step % cfg.train.checkpoint_every == 0 or self.step == total or stop or evaluate:
                    self.save_checkpoint()
                    if exiting and (stop or self.step == total):
                        self.preemption.settle()
                if evaluate:
                    self.run_eval_hooks(self.step)
                if stop and self.step < total:  # a signal during the last step: the run is finished
                    code = ExitCode.INTERRUPTED if self.preemption.interrupted else ExitCode.PREEMPTED
                    log.warning("%s at step %d; checkpoint written, exiting with %d", code.name.lower(), self.step, code)
                    return True
        return False

    def _stop_agreed(self) -> bool:
        """Whether any rank was signalled to stop, agreed at stop-check, log and checkpoint steps only."""
        train = self.cfg.train
        if self.step % train.stop_check_every and self.step % train.log_every and self.step % train.checkpoint_every:
            return False
        return agree_any(self.preemption.raised)

    def _resume(self, resume: str | os.PathLike | None, auto_resume: bool) -> dict | None:
        """The meta of the checkpoint resumed from (`resume`, else the latest one), or None. Rank 0 chooses and
        every rank takes its choice: on a shared file system each rank's own listing may lag (NFS caches file
        attributes), and ranks that resumed different steps would train apart."""
        info = None
        if self.env.is_main:
            if resume is not None:
                info = CheckpointManager.resolve(resume)
            elif auto_resume:
                info = self.checkpoints.latest_complete()
        path = from_rank_zero(str(info.path) if info is not None else None)
        if path is not None and info is None:
            info = CheckpointManager.resolve(path)
        return self.restore(info) if info is not None else None

    def _finish(self, exiting: bool) -> None:
        """A run that reached its last step: the final checkpoint, evaluation and exported weights."""
        if self._last_checkpoint_step != self.step:
            self.save_checkpoint()
        if exiting:
            self.preemption.settle()
        if self.cfg.eval.at_end:
            self.run_eval_hooks(self.step)
        if self.env.is_main:
            models = {"vae": self.engines.vae_model, "disc": self.engines.disc_model}
            for path in self.checkpoints.export_final(models, to_yaml(self.cfg)):
                self.tracker.log_artifact(path, "final")
            if self.cfg.tracking.log_model:
                # lazy: MLflow warns when the model class is defined (and forces it shown); rank 0 alone logs it
                from disent.tracking.pyfunc import log_trained_model

                log_trained_model(self.tracker, lambda: Model.copy_of(self.engines.vae_model, self.cfg,
                                                                      str(self.layout.final)),
                                  self.layout.final_model, self.cfg.tracking.register_model)

    def _teardown(self, status: str, exiting: bool) -> None:
        if exiting and status == "FAILED":
            # The process leaves with this failure; the SIGTERM a scheduler sends the rest of the step
            # meanwhile (srun --kill-on-bad-exit) must not turn its exit code (69 when retryable) into 143.
            self.preemption.settle()
        self.preemption.restore()
        self._finish_uploads(status)
        self.tracker.close(status=status)
        close = getattr(self.loader, "close", None)
        if close:
            close()

    def _finish_uploads(self, status: str) -> None:
        """A finished run waits for its uploads. A stopped or failed one has a scheduler's short grace: rank 0 waits
        at most train.checkpoint_upload_timeout_s. After a stop the other ranks wait for rank 0, so every rank exits
        75 together: srun --kill-on-bad-exit ends the step as soon as one task exits non-zero, and would SIGKILL
        a rank 0 still uploading after KillWait (a failure where a preemption was meant)."""
        bound = None if status == "FINISHED" else self.cfg.train.checkpoint_upload_timeout_s
        self.checkpoints.wait_for_uploads(bound)
        if status == "KILLED" and self.cfg.train.checkpoint_upload_url:
            if not self.env.is_main:
                log.info("stopping: waiting for rank 0's checkpoint upload (at most %ds)", bound)
            wait_for_rank_zero(bound + 30)

    def eval_request(self, step: int):
        return EvalRequest(step=step, models={"vae": self.engines.vae_model, "disc": self.engines.disc_model},
                           cfg=self.cfg, device=self.env.device, rank=self.env.rank, out_dir=self.layout.eval_dir(step),
                           tracker=self.tracker)

    def run_eval_hooks(self, step: int) -> None:
        """Every hook (rank 0 evaluates; the others wait for it on the CPU control group, up to eval.timeout_s).
        A hook that fails does not end the run, but it is never silent: an ERROR line, an MLflow tag
        `eval_failed.step_N` and the CLI's last lines name it."""
        for hook in self.eval_hooks:
            try:
                with isolated_rng(cuda=True):  # evaluation never shifts the training noise
                    hook(self.eval_request(step))
            except Exception as exc:  # noqa: BLE001 - reported below, the training goes on
                what = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                log.error("evaluation at step %d failed (%s)", step, what, exc_info=True)
                self.eval_failures.append(f"step {step}: {what}")
                if self.env.is_main:
                    self.tracker.set_tags({f"eval_failed.step_{step}": what})
        wait_for_rank_zero(self.cfg.eval.timeout_s)

    # ------------------------------------------------------------------ tracking

    def _start_tracking(self, resume_meta: dict | None) -> None:
        """Start (or, on resume, continue) the MLflow run; rank 0 writes and logs the run's config."""
        params = {**flatten(to_dict(self.cfg)), **self.plan.params()}
        params["derived.loader_workers"] = getattr(self.loader, "num_workers", None)  # data.num_workers=auto
        run_id = resume_meta.get("mlflow_run_id") if resume_meta else None
        self.tracker.start(run_id=run_id, run_name=run_name(self.cfg), params=params, tags=training_tags(
            self.cfg, self.env.world_size, self.env.device_type, self.plan.manifest.digest,
            {self.step: self.world_size_change} if self.world_size_change else {}))
        if self.env.is_main:
            write_plan(self.cfg, self.plan, self.layout)
            self.tracker.log_artifact(self.layout.config, "config")
            self.tracker.log_artifact(self.layout.deepspeed_configs, "config/deepspeed")
