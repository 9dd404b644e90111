"""The step-based training loop over the two DeepSpeed engines.

One step = `train.grad_accum` micro-batches; for each micro-batch:
  1. the VAE engine's forward computes the VAE loss with the discriminator's module frozen,
     `vae_engine.backward(loss)`, `vae_engine.step()`;
  2. the discriminator engine judges real pairs against the (detached) fakes,
     `disc_engine.backward(real + fake)`, `disc_engine.step()`.
DeepSpeed applies the optimizer update at the accumulation boundary.

Every `log_every` steps the rank-averaged metrics go to MLflow (rank 0) and metrics.jsonl;
every `eval_every` steps and at the end the eval hooks run; every `checkpoint_every` steps and at
the end a checkpoint is written. SIGTERM/SIGUSR1 make every rank finish its step, checkpoint and
return with `preempted=True` (the CLI exits with ExitCode.PREEMPTED, 75, so the job is requeued).
"""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from disent.config import Config, flatten, micro_batch_size, run_name, to_dict, to_yaml
from disent.errors import ExitCode
from disent.models.objective import discriminator_losses
from disent.checkpoint import CheckpointInfo, CheckpointManager, atomic_torch_save, atomic_write_bytes
from disent.train.engines import DistEnv, Engines, build_engines, frozen

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
IMAGE_KEYS = ("x1", "x1p", "x2", "x2p")

LoaderFactory = Callable[..., Any]  # (data_cfg, split, batch_size, rank, world_size, seed) -> PairLoader


def make_loader(data_cfg, split: str, batch_size: int, rank: int, world_size: int, seed: int):
    """The one place the trainer gets its data loader from."""
    from disent.data.stream import PairLoader

    return PairLoader(data_cfg, split, batch_size, rank, world_size, seed)


# --------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    """All RNG states as tensors and plain values (loadable with torch.load(weights_only=True))."""
    version, py_state, gauss = random.getstate()
    kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
            "has_gauss": int(np_has_gauss), "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class isolated_rng:
    """Global RNG draws inside the block (python, numpy, torch CPU) are undone afterwards.

    The data loader runs inside it: a torch DataLoader draws its worker base seed from the global
    torch generator when its iterator starts, which would shift the training noise (z samples)
    after a resume, where the iterator starts at a different point of the RNG stream.
    """

    def __init__(self, cuda: bool = False):
        self.cuda = cuda and torch.cuda.is_available()

    def __enter__(self):
        self._py = random.getstate()
        self._np = np.random.get_state()
        self._torch = torch.get_rng_state()
        self._cuda = torch.cuda.get_rng_state_all() if self.cuda else None
        return self

    def __exit__(self, *exc):
        random.setstate(self._py)
        np.random.set_state(self._np)
        torch.set_rng_state(self._torch)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)
        return False


# --------------------------------------------------------------------------- signals


def ignore_stop_signals(*_args) -> None:
    """SIGTERM and SIGUSR1 ignored by this process (also usable as a DataLoader worker_init_fn)."""
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class stop_signals_held:
    """SIGTERM/SIGUSR1 blocked in the calling thread inside the block.

    The data loader is advanced inside it: that is where DataLoader workers are forked, and a forked
    process inherits the forking thread's signal mask, so the workers never act on the SIGTERM/SIGUSR1
    that Slurm (or `kill -TERM -PGID`) sends to every process of the step. Without it torch's worker
    SIGTERM handler kills the worker and the rank fails with "DataLoader worker ... is killed by
    signal: Terminated" instead of checkpointing. This process loses nothing: a signal sent meanwhile
    is taken by another thread or when the block ends, and the trainer's handler runs as usual.
    (Workers started with a worker_init_fn that ignores the signals would not need this.)
    """

    def __enter__(self):
        self._old = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
        return self

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old)
        return False


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; the loop checks it (agreed across ranks) at the end of each step.

    Slurm (and `kill -TERM -PGID`) signals every process of the step, DataLoader workers included:
    the workers are started with these signals blocked (`stop_signals_held`). Any other child forked
    after `install()` inherits this handler, where it does nothing.
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()
        self.settled = False

    def _handler(self, signum, frame):
        if os.getpid() != self._pid:  # a forked child (a DataLoader worker): not ours to act on
            return
        if self.signal is None:
            log.warning("received %s: finishing this step, then checkpointing", signal.Signals(signum).name)
        self.signal = signum

    def install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def settle(self) -> None:
        """The last checkpoint is complete and the process is about to exit: ignore SIGTERM/SIGUSR1 from
        now on, for good (`restore()` keeps them ignored). Under `srun --kill-on-bad-exit` the first rank
        to exit 75 makes Slurm SIGTERM the slower ones while they close MLflow and the process group; that
        must not turn their 75 (or 0) into 143."""
        if threading.current_thread() is not threading.main_thread():
            return
        ignore_stop_signals()
        self.settled = True

    def restore(self) -> None:
        if not self.settled:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous.clear()

    @property
    def raised(self) -> bool:
        return self.signal is not None


# --------------------------------------------------------------------------- trainer


@dataclass
class TrainResult:
    step: int
    preempted: bool
    run_id: str | None
    checkpoint: Path | None

    @property
    def exit_code(self) -> int:
        return ExitCode.PREEMPTED if self.preempted else ExitCode.OK


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class Trainer:
    """Owns the engines, the loader, the tracker and the checkpoints of one run."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        loader_factory: LoaderFactory | None = None,
        tracker=None,
        manifest_digest: str | None = None,
        eval_hooks: list[Callable[["Trainer", int], None]] | None = None,
        preemption: PreemptionFlag | None = None,
    ):
        from disent.train.hooks import EvaluationHook

        self.cfg = cfg
        self.env = env
        self.run_dir = Path(cfg.run_dir)
        self.loader_factory = loader_factory or make_loader
        self.manifest_digest = manifest_digest
        self.step = 0
        self.micro_batch = micro_batch_size(cfg, env.world_size)
        self.eval_hooks = list(eval_hooks) if eval_hooks is not None else [EvaluationHook()]
        # Installed by train(), or earlier by the caller (the CLI: before the engines are built, so a
        # preemption during start-up means "one step, checkpoint, exit 75" rather than dying with 143).
        self.preemption = preemption or PreemptionFlag()
        self.checkpoints = CheckpointManager(self.run_dir, cfg.train.keep_checkpoints, cfg.train.checkpoint_upload_url)
        self._last_checkpoint_step: int | None = None
        self._last_checkpoint: Path | None = None

        # Same weights on every rank (DeepSpeed broadcasts rank 0's anyway); per-rank noise after.
        seed_everything(cfg.seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        self.engines: Engines = build_engines(cfg, env)
        seed_everything(cfg.seed + 1_000_003 * env.rank)
        self.loader = self.loader_factory(
            cfg.data, cfg.data.train_split, self.micro_batch, env.rank, env.world_size, cfg.seed
        )
        if tracker is None:
            from disent.tracking import MLflowLogger

            tracker = MLflowLogger.from_config(cfg, env.rank)
        self.tracker = tracker
        self.run_id: str | None = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "loader_json": json.dumps(self.loader.state_dict()),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.loader.load_state_dict(json.loads(state["loader_json"]))
        set_rng_state(state["rng"])

    def save_checkpoint(self) -> Path:
        meta = {"mlflow_run_id": self.tracker.run_id if self.env.is_main else self.run_id, "config": to_dict(self.cfg)}
        path = self.checkpoints.save(self.step, self.engines, self.state_dict(), meta)
        self._last_checkpoint_step, self._last_checkpoint = self.step, path
        return path

    def restore(self, info: CheckpointInfo) -> dict:
        """Load engines + this rank's trainer state from a checkpoint; returns its meta."""
        state, meta = self.checkpoints.load(info, self.engines)
        self.load_state_dict(state)
        self._last_checkpoint_step, self._last_checkpoint = self.step, info.path
        if self.env.is_main:
            _warn_config_drift(meta.get("config", {}), to_dict(self.cfg))
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
        vae_engine, disc_engine = self.engines.vae, self.engines.disc
        disc_module = disc_engine.module
        sums: dict[str, torch.Tensor] = {}
        accum = self.cfg.train.grad_accum
        vae_norm = disc_norm = None
        for micro in range(accum):
            with isolated_rng(), stop_signals_held():
                batch = next(batches)
            b = self._to_device(batch)
            boundary = micro == accum - 1
            with frozen(disc_module):
                vae_loss, terms, fakes = vae_engine(
                    b["x1"], b["x1p"], b["x2"], b["x2p"], b["y2"],
                    discriminator=disc_module, loss_cfg=self.cfg.loss, step=self.step, y1=b["y1"],
                )
                vae_engine.backward(vae_loss)
            if boundary:
                vae_norm = _stage0_grad_norm(vae_engine)
            vae_engine.step()

            d_loss, d_terms = discriminator_losses(disc_engine, b["x2"], b["x2p"], b["y2"], fakes, self.cfg.loss)
            disc_engine.backward(d_loss)
            if boundary:
                disc_norm = _stage0_grad_norm(disc_engine)
            disc_engine.step()

            terms = {**terms, **d_terms, "vae_loss": vae_loss.detach(), "disc_loss": d_loss.detach()}
            for key, value in terms.items():
                value = value.float() / accum
                sums[key] = sums[key] + value if key in sums else value
        for name, engine, fallback in (("vae", vae_engine, vae_norm), ("disc", disc_engine, disc_norm)):
            norm = engine.get_global_grad_norm()
            norm = fallback if norm is None else norm
            if norm is not None:
                sums[f"grad_norm/{name}"] = torch.as_tensor(float(norm), dtype=torch.float32, device=self.env.device)
        return sums

    # ------------------------------------------------------------------ loop

    def _start_tracking(self, resume_meta: dict | None) -> None:
        import deepspeed

        from disent.tracking import git_commit

        run_id = resume_meta.get("mlflow_run_id") if resume_meta else None
        tags = {
            "git_commit": git_commit(),
            "data_manifest_sha256": self.manifest_digest,
            "world_size": self.env.world_size,
            "device_type": self.env.device_type,
            "deepspeed_version": deepspeed.__version__,
            "torch_version": torch.__version__,
            "config_name": self.cfg.name,
            "config_source": self.cfg.source,
            "overrides": " ".join(self.cfg.overrides) or None,
        }
        if tags["git_commit"]:
            tags["mlflow.source.git.commit"] = tags["git_commit"].removesuffix("-dirty")
        params = flatten(to_dict(self.cfg))
        params["derived.world_size"] = self.env.world_size
        params["derived.micro_batch_size"] = self.micro_batch
        params["derived.loader_workers"] = getattr(self.loader, "num_workers", None)  # data.num_workers=auto
        self.run_id = self.tracker.start(run_id=run_id, run_name=run_name(self.cfg), params=params, tags=tags)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.run_dir / "config.yaml", to_yaml(self.cfg).encode())
            ds_dir = self.run_dir / "deepspeed"
            ds_dir.mkdir(exist_ok=True)
            for name, ds_cfg in self.engines.configs.items():
                atomic_write_bytes(ds_dir / f"{name}.json", json.dumps(ds_cfg, indent=2).encode())
            self.tracker.log_artifact(self.run_dir / "config.yaml", "config")
            self.tracker.log_artifact(ds_dir, "config/deepspeed")

    def _agree_to_stop(self) -> bool:
        dist = _dist()
        flag = 1 if self.preemption.raised else 0
        if dist is None or self.env.world_size == 1:
            return bool(flag)
        t = torch.tensor([flag], dtype=torch.int32, device=self.env.device if self.env.backend == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _reduce_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(values)
        stacked = torch.stack([values[k].float().reshape(()) for k in keys])
        dist = _dist()
        if dist is not None and self.env.world_size > 1:
            if self.env.backend != "nccl":
                stacked = stacked.cpu()
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
            stacked = stacked / self.env.world_size
        return dict(zip(keys, stacked.tolist()))

    def run_eval_hooks(self, step: int) -> None:
        for hook in self.eval_hooks:
            try:
                with isolated_rng(cuda=True):  # evaluation never shifts the training noise
                    hook(self, step)
            except Exception:
                log.exception("eval hook %r failed at step %d", hook, step)

    def train(self, resume: str | os.PathLike | None = None, auto_resume: bool = True,
              exiting: bool = False) -> TrainResult:
        """Run to cfg.train.steps (or until preempted). Resumes from `resume` or the latest checkpoint.

        exiting=True: the process exits once this returns (the CLI): after the stop checkpoint (or the
        final one) is complete, SIGTERM and SIGUSR1 are ignored for the rest of the process's life.
        Otherwise the previous handlers are restored on return.
        """
        info = None
        if resume is not None:
            info = CheckpointManager.resolve(resume)
        elif auto_resume:
            info = self.checkpoints.latest_complete()
        meta = self.restore(info) if info is not None else None
        self._start_tracking(meta)
        cfg, env = self.cfg, self.env
        total = cfg.train.steps
        batches = iter(self.loader)
        self.preemption.install()
        window: dict[str, torch.Tensor] = {}
        window_steps = 0
        window_start = time.perf_counter()
        wait_start = float(getattr(self.loader, "wait_seconds", 0.0))
        preempted = False
        progress = ProgressReport(cfg.name, self.step, total, bar=env.is_main and cfg.train.progress)
        metrics_file = self.run_dir / "metrics.jsonl"
        status = "FAILED"
        profiler = None
        if cfg.train.profile_steps > 0:
            profiler = StepProfiler(cfg.train.profile_steps, total - self.step, self.run_dir, env.rank, self.tracker)
        try:
            log.info("training from step %d to %d (%d ranks, micro batch %d, %s loader workers per rank, %s)",
                     self.step, total, env.world_size, self.micro_batch, getattr(self.loader, "num_workers", "?"),
                     env.device_type)
            while self.step < total:
                terms = self.train_step(batches)
                self.step += 1
                if profiler is not None:
                    profiler.step()
                window_steps += 1
                for k, v in terms.items():
                    window[k] = window[k] + v if k in window else v
                progress.update()
                if self.step % cfg.train.log_every == 0 or self.step == total:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    waited = float(getattr(self.loader, "wait_seconds", 0.0)) - wait_start
                    local = {k: v / window_steps for k, v in window.items()}
                    local["data_wait_s"] = torch.tensor(waited)
                    local["data_wait_fraction"] = torch.tensor(waited / elapsed)
                    metrics = self._reduce_mean(local)
                    metrics["samples_per_s"] = window_steps * cfg.train.global_batch_size / elapsed
                    metrics["steps_per_s"] = window_steps / elapsed
                    metrics.update(self.engines.lrs())
                    skipped = getattr(self.loader, "skipped_shards", None)
                    if isinstance(skipped, (int, float)):
                        metrics["data_skipped_shards"] = float(skipped)
                    self._log_metrics(metrics, metrics_file, progress)
                    window, window_steps = {}, 0
                    window_start = time.perf_counter()
                    wait_start = float(getattr(self.loader, "wait_seconds", 0.0))
                stop = self._agree_to_stop()
                if self.step % cfg.train.eval_every == 0 and self.step < total and not stop:
                    self.run_eval_hooks(self.step)
                if self.step % cfg.train.checkpoint_every == 0 or self.step == total or stop:
                    self.save_checkpoint()
                    if exiting and (stop or self.step == total):
                        self.preemption.settle()
                if stop and self.step < total:  # a signal during the last step: the run is finished
                    preempted = True
                    log.warning("preempted at step %d; checkpoint written, exiting with %d", self.step,
                                int(ExitCode.PREEMPTED))
                    break
            if not preempted:
                if self._last_checkpoint_step != self.step:
                    self.save_checkpoint()
                if exiting:
                    self.preemption.settle()
                self.run_eval_hooks(self.step)
                self._save_final_weights()
            status = "KILLED" if preempted else "FINISHED"
        finally:
            if profiler is not None:
                profiler.stop()
            progress.close()
            if exiting and status == "FAILED":
                # The process leaves with this failure; the SIGTERM a scheduler sends the rest of the step
                # meanwhile (srun --kill-on-bad-exit) must not turn its exit code (69 when retryable) into 143.
                self.preemption.settle()
            self.preemption.restore()
            self.checkpoints.wait_for_uploads()
            self.tracker.close(status=status)
            close = getattr(self.loader, "close", None)
            if close:
                close()
        if env.is_main and self.run_id:
            self.run_id = self.tracker.run_id or self.run_id
        return TrainResult(step=self.step, preempted=preempted, run_id=self.run_id, checkpoint=self._last_checkpoint)

    def _log_metrics(self, metrics: dict[str, float], metrics_file: Path, progress: "ProgressReport") -> None:
        if not self.env.is_main:
            return
        self.tracker.log_metrics(metrics, step=self.step)
        with open(metrics_file, "a") as fh:
            fh.write(json.dumps({"step": self.step, **metrics}, sort_keys=True) + "\n")
        progress.report(self.step, metrics)

    def _save_final_weights(self) -> None:
        if not self.env.is_main:
            return
        final = self.run_dir / "final"
        final.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({k: v.detach().cpu() for k, v in self.engines.vae_model.state_dict().items()}, final / "vae.pt")
        atomic_torch_save({k: v.detach().cpu() for k, v in self.engines.disc_model.state_dict().items()}, final / "disc.pt")
        self.tracker.log_artifact(final / "vae.pt", "final")
        self.tracker.log_artifact(final / "disc.pt", "final")


class ProgressReport:
    """Rank 0's view of training progress: a tqdm bar on a terminal; elsewhere (an sbatch output file,
    `kubectl logs`, CI) one plain log line per `train.log_every` steps, since a redrawn bar written
    to a file is one endless line of carriage returns."""

    SHOWN = ("vae_loss", "disc_loss", "samples_per_s")

    def __init__(self, name: str, start: int, total: int, bar: bool):
        self.start, self.total = start, total
        self.t0 = time.perf_counter()
        self.bar = None
        if bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, metrics: dict[str, float]) -> None:
        short = {k: metrics[k] for k in self.SHOWN if k in metrics}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in short.items()}, refresh=False)
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        log.info("step %d/%d %s eta %s", step, self.total, " ".join(f"{k}={v:.4g}" for k, v in short.items()),
                 _duration(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan: nothing measured yet
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


PROFILE_SKIP_STEPS = 5  # start-up and the first log window are not what a profile should show


class StepProfiler:
    """torch.profiler over `steps` training steps after PROFILE_SKIP_STEPS: every rank writes a
    Chrome trace (chrome://tracing, Perfetto) to run_dir/profile/, rank 0 logs its trace and a
    table of the most expensive operators to MLflow."""

    def __init__(self, steps: int, steps_left: int, run_dir: Path, rank: int, tracker):
        from torch.profiler import ProfilerActivity, profile, schedule

        self.out = run_dir / "profile"
        self.rank, self.tracker = rank, tracker
        skip = max(0, min(PROFILE_SKIP_STEPS, steps_left - 1 - steps))  # short runs still get their trace
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profile = profile(activities=activities, record_shapes=False, on_trace_ready=self._write,
                                schedule=schedule(wait=skip, warmup=1, active=steps, repeat=1))
        self._profile.start()

    def _write(self, prof) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"trace-rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        top_ops = self.out / f"top-ops-rank{self.rank}.txt"
        atomic_write_bytes(top_ops, (table + "\n").encode())
        if self.rank == 0:
            log.info("profile written to %s; most expensive operators:\n%s", self.out, table)
            self.tracker.log_artifact(trace, "profile")
            self.tracker.log_artifact(top_ops, "profile")

    def step(self) -> None:
        self._profile.step()

    def stop(self) -> None:
        self._profile.stop()


def _stage0_grad_norm(engine) -> float | None:
    """ZeRO 0 in fp32 clips without keeping the norm; compute it (after the all-reduce) ourselves."""
    if engine.zero_optimization_stage() != 0 or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _warn_config_drift(saved: dict, current: dict) -> None:
    a, b = flatten(saved), flatten(current)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(("tracking.", "train.progress")))
    if changed:
        log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))

