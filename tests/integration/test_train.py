"""Training on two DeepSpeed engines, 2 CPU ranks under torchrun with gloo, on tiny real shards.

Each torchrun launch costs ~15 s of start-up on 2 cores, so checks are grouped per launch.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.processes import wait_for
from tests.support.train_helpers import (
    ROOT,
    complete_checkpoints,
    logged_steps,
    metric_lines,
    step_dir,
    tiny_overrides,
    torchrun,
)

BASE = "configs/base.yaml"
LOSS_KEYS = ("vae_loss", "reconstruction", "kl", "swap", "adversarial", "disc_loss", "disc_real", "disc_fake")
METRIC_KEYS = LOSS_KEYS + (
    "disc_acc_real", "disc_acc_fake", "grad_norm/vae", "grad_norm/disc", "lr/vae", "lr/disc",
    "samples_per_s", "data_wait_s",
)


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    return {m["step"]: {k: m[k] for k in LOSS_KEYS} for m in metric_lines(run_dir)}


def assert_ok(result):
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def assert_state_dicts_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- ZeRO x discriminator matrix


CASES = [
    "train.zero_stage=0 model.discriminator=pair",
    "train.zero_stage=0 model.discriminator=label",
    "train.zero_stage=1 model.discriminator=pair train.grad_accum=2 train.global_batch_size=16",
    "train.zero_stage=1 model.discriminator=label",
    "train.zero_stage=2 model.discriminator=pair",
    "train.zero_stage=2 model.discriminator=label train.grad_accum=2 train.global_batch_size=16",
    # GPU-readiness paths, run on CPU: each repeats case 0 (same seed, same batches) with one change
    "train.zero_stage=0 model.discriminator=pair train.compile=true",
    "train.zero_stage=0 model.discriminator=pair train.precision=bf16",
    "train.zero_stage=0 model.discriminator=pair train.channels_last=true",
    # the last-step pruning agrees across ranks (one all-reduce of the units' KL) and lands in the final weights
    "train.zero_stage=1 model.discriminator=pair model.prune_below_kl=0.5 loss.swap_contrast=1.0",
]
# relative agreement with case 0's first logged losses: compiled kernels and channels_last
# reorder float sums; bf16 autocast rounds matmul and conv inputs to 8 mantissa bits
AGREES_WITH_CASE0 = {6: 1e-3, 7: 5e-2, 8: 1e-3}


def test_two_ranks_zero_0_1_2_both_discriminators(tmp_path, tiny_data):
    """Every ZeRO stage x discriminator mode trains on 2 ranks; ranks agree on every weight."""
    run = tmp_path / "run"
    args = ["--dump-params", *tiny_overrides(run, tiny_data, **{"train.steps": 4, "train.checkpoint_every": 2})]
    for case in CASES:
        args += ["--case", case]
    extensions = tmp_path / "torch_extensions"
    result = torchrun(args, timeout=600, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert_ok(result)
    # no JIT-built op: a fresh machine pays no compile, and no stale build lock can hang a later run
    assert not extensions.exists() or not any(extensions.iterdir())
    for i, case in enumerate(CASES):
        case_dir = run / f"case{i}"
        logged = metric_lines(case_dir)
        assert [m["step"] for m in logged] == [2, 4], case
        for m in logged:
            missing = [k for k in METRIC_KEYS if k not in m]
            assert not missing, (case, missing)
            assert all(math.isfinite(m[k]) for k in METRIC_KEYS), (case, m)
            assert 0.0 <= m["disc_acc_real"] <= 1.0 and 0.0 <= m["disc_acc_fake"] <= 1.0
            assert m["grad_norm/vae"] > 0 and m["grad_norm/disc"] > 0
        # gradients were reduced across ranks: both ranks hold the same weights
        rank0 = torch.load(case_dir / "params-rank0-step4.pt", weights_only=True)
        rank1 = torch.load(case_dir / "params-rank1-step4.pt", weights_only=True)
        assert_state_dicts_equal(rank0, rank1)
        # training moved the weights away from the initial ones
        final = torch.load(case_dir / "final" / "vae.pt", weights_only=True)
        assert final.keys() == {k[len("vae."):] for k in rank0 if k.startswith("vae.")}
        assert ("encoder.unit_mask" in final) == ("prune_below_kl" in case), case
        if "prune_below_kl" in case:
            assert set(final["encoder.unit_mask"].tolist()) <= {0.0, 1.0}
        assert complete_checkpoints(case_dir) == [2, 4], case
        for ckpt in (step_dir(case_dir, 2), step_dir(case_dir, 4)):
            assert (ckpt / "vae").is_dir() and (ckpt / "disc").is_dir()
            assert (ckpt / "trainer-rank0.pt").is_file() and (ckpt / "trainer-rank1.pt").is_file()
            meta = json.loads((ckpt / "meta.json").read_text())
            assert meta["world_size"] == 2 and meta["mlflow_run_id"] and meta["config"]["name"] == "tiny"
        # what ran, not what was asked (disent/train/summary.py)
        summary = json.loads((case_dir / "summary.json").read_text())
        assert summary["status"] == "FINISHED" and summary["steps"] == 4 and summary["first_step_s"] > 0
        assert math.isfinite(summary["last_vae_loss"]) and math.isfinite(summary["last_disc_loss"])
        assert summary["decoder_output_dtype"] == ("bfloat16" if "precision=bf16" in case else "float32"), case
        assert ("compile_frames" in summary) == ("compile=true" in case), case
        if "compile=true" in case:
            assert summary["compile_frames"] >= 1 and summary["compile_graph_breaks"] >= 0
        ds_cfg = json.loads((case_dir / "deepspeed" / "vae.json").read_text())
        assert ds_cfg["zero_optimization"]["stage"] == int(case.split()[0].split("=")[1])
        assert ds_cfg["torch_autocast"]["enabled"] == ("precision=bf16" in case)
        if i in AGREES_WITH_CASE0:
            reference = metric_lines(run / "case0")[0]
            for key in ("reconstruction", "swap", "kl", "adversarial", "disc_loss"):
                assert logged[0][key] == pytest.approx(reference[key], rel=AGREES_WITH_CASE0[i]), (case, key)


def test_one_rank_zero_0_skips_the_self_all_reduce_and_matches_zero_1(tmp_path, tiny_data):
    """With one rank, ZeRO 0 skips DeepSpeed's gradient all-reduce; its weights match ZeRO 1's, which reduces."""
    run = tmp_path / "run"
    args = ["--dump-params", *tiny_overrides(run, tiny_data, **{"train.steps": 4, "train.checkpoint_every": 4}),
            "--case", "train.zero_stage=0", "--case", "train.zero_stage=1"]
    assert_ok(torchrun(args, nproc=1, timeout=300))
    zero0 = torch.load(run / "case0" / "params-rank0-step4.pt", weights_only=True)
    zero1 = torch.load(run / "case1" / "params-rank0-step4.pt", weights_only=True)
    assert zero0.keys() == zero1.keys()
    for key in zero0:
        torch.testing.assert_close(zero0[key], zero1[key], rtol=1e-4, atol=1e-6, msg=key)
    assert metric_lines(run / "case0")[0]["grad_norm/vae"] == pytest.approx(
        metric_lines(run / "case1")[0]["grad_norm/vae"], rel=1e-4)


# --------------------------------------------------------------------------- determinism and resume


def test_same_seed_same_losses_and_resume_is_exact(tmp_path, tiny_data):
    """20 straight steps == 10 steps + resume for 10 (bit-identical weights); same seed == same losses;
    the resumed run continues the same MLflow run without duplicate metric steps."""
    common = {"train.zero_stage": 1, "train.grad_accum": 2, "train.global_batch_size": 16,
              "train.log_every": 1, "train.checkpoint_every": 10, "train.eval_every": 7}
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    assert_ok(torchrun(["train", BASE, *tiny_overrides(straight, tiny_data, **common, **{"train.steps": 20})], script=None))
    assert_ok(torchrun(["train", BASE, *tiny_overrides(split, tiny_data, **common, **{"train.steps": 10})], script=None))
    first, second = losses(straight), losses(split)
    assert sorted(second) == list(range(1, 11))
    # An evaluation step (7, 14) is a checkpoint step, written before the evaluation (keep_checkpoints 3).
    assert complete_checkpoints(straight) == [10, 14, 20]
    evaluated = min(f.stat().st_mtime_ns for f in (straight / "eval" / step_dir(straight, 14).name).iterdir())
    assert (step_dir(straight, 14) / "COMPLETE").stat().st_mtime_ns <= evaluated
    for step in range(1, 11):
        assert first[step] == second[step], step  # same seed: identical losses, exactly

    result = torchrun(["train", BASE, *tiny_overrides(split, tiny_data, **common, **{"train.steps": 20}),
                       "--resume", step_dir(split, 10)], script=None)
    assert_ok(result)
    assert "resumed from" in result.stderr
    resumed = losses(split)
    for step in range(11, 21):
        assert first[step] == resumed[step], step
    for name in ("vae.pt", "disc.pt"):
        assert_state_dicts_equal(torch.load(straight / "final" / name, weights_only=True),
                                 torch.load(split / "final" / name, weights_only=True))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{split}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("disent").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "vae_loss")
    assert sorted(m.step for m in history) == list(range(1, 21))
    assert complete_checkpoints(split)[-1] == 20


# --------------------------------------------------------------------------- resume on another number of ranks


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.float().flatten() for _, v in sorted(state.items())])


STAGES = (0, 1, 2)


def _stage_cases(root: Path) -> list[str]:
    """One --case per ZeRO stage (one process-group start-up for all three), each with its own MLflow store."""
    args = []
    for i, stage in enumerate(STAGES):
        args += ["--case", f"train.zero_stage={stage} tracking.uri=sqlite:///{root}/case{i}/mlflow.db"]
    return args


def test_resume_on_another_number_of_ranks(tmp_path, tiny_data):
    """For ZeRO 0, 1 and 2: 2 ranks to step 4, resumed on 1 rank to step 8, resumed on 2 ranks to step 12.
    Every resume continues the same MLflow run from the checkpoint's weights (recorded as a world-size
    change), and the result is close to 12 uninterrupted steps on 2 ranks: closer than 12 uninterrupted
    steps on 1 rank are (not equal: the data order and the noise change with the world size)."""
    chain, straight, straight_one = tmp_path / "chain", tmp_path / "straight", tmp_path / "straight-one-rank"
    common = {"train.log_every": 1, "train.checkpoint_every": 4}

    def launch(root: Path, steps: int, nproc: int):
        for i in range(len(STAGES)):
            (root / f"case{i}").mkdir(parents=True, exist_ok=True)  # each case's MLflow store lives there
        result = torchrun(["--no-hooks", *tiny_overrides(root, tiny_data, **common, **{"train.steps": steps}),
                           *_stage_cases(root)], nproc=nproc, timeout=600)
        assert_ok(result)
        return result

    launch(chain, 4, 2)
    weights_at_4 = [torch.load(step_dir(chain / f"case{i}", 4) / "vae_weights.pt",
                               weights_only=True) for i in range(len(STAGES))]
    launch(chain, 4, 1)  # resumed on 1 rank with nothing left to train: the exported weights are the loaded ones
    for i, stage in enumerate(STAGES):
        assert_state_dicts_equal(torch.load(chain / f"case{i}" / "final" / "vae.pt", weights_only=True), weights_at_4[i])
    one = launch(chain, 8, 1)
    assert one.stderr.count("written by 2 ranks; resharded onto 1") == len(STAGES), one.stderr[-3000:]
    assert one.stderr.count("universal checkpoint format") == 2 * 2  # ZeRO 1 and 2, two engines each
    two = launch(chain, 12, 2)
    assert two.stderr.count("written by 1 ranks; resharded onto 2") == len(STAGES), two.stderr[-3000:]
    launch(straight, 12, 2)
    launch(straight_one, 12, 1)

    from mlflow.tracking import MlflowClient

    for i, stage in enumerate(STAGES):
        run_dir = chain / f"case{i}"
        assert logged_steps(run_dir) == list(range(1, 13)), stage
        assert not (run_dir / ".universal").exists()
        final = {name: _flat(torch.load(root / f"case{i}" / "final" / "vae.pt", weights_only=True))
                 for name, root in (("chain", chain), ("straight", straight), ("straight_one", straight_one))}
        apart = torch.linalg.vector_norm(final["chain"] - final["straight"])
        # the spread a world-size change alone makes: 12 steps on 1 rank against 12 on 2 (same seed)
        spread = torch.linalg.vector_norm(final["straight_one"] - final["straight"])
        moved = torch.linalg.vector_norm(final["straight"] - _flat(weights_at_4[i]))
        print(f"ZeRO {stage}: |chain - straight| = {apart:.4g}, |straight on 1 rank - straight| = {spread:.4g}, "
              f"|straight(12) - chain(4)| = {moved:.4g}")
        assert apart < spread, (stage, float(apart), float(spread))

        client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("disent").experiment_id])
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["world_size_change.step_4"] == "2 -> 1", stage
        assert run.data.tags["world_size_change.step_8"] == "1 -> 2", stage
        assert run.data.tags["world_size"] == "2", stage
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "vae_loss")) == list(range(1, 13))


@pytest.fixture(scope="module")
def one_rank_group():
    """One gloo group for the module's in-process engines (DeepSpeed caches its groups per process)."""
    import torch.distributed as dist

    from disent.host import free_port

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _toy_engine(stage: int):
    import deepspeed

    torch.manual_seed(0)
    # BatchNorm: buffers (running statistics), which a universal load must bring back too
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.BatchNorm1d(10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": stage}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _adam_state(engine) -> dict[str, torch.Tensor]:
    """Adam's moments (exp_avg, exp_avg_sq) of every tensor the optimizer steps, and those tensors (ZeRO's
    fp32 master partitions)."""
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    out = {}
    for g, group in enumerate(inner.param_groups):
        for i, param in enumerate(group["params"]):
            for key, value in inner.state.get(param, {}).items():
                if torch.is_tensor(value) and value.numel() > 1:
                    out[f"{g}.{i}.{key}"] = value.clone()
            out[f"{g}.{i}.param"] = param.detach().clone()
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_a_partitioned_optimizer_state_comes_back_exactly_through_the_universal_conversion(tmp_path, one_rank_group,
                                                                                         stage):
    """The resharding path of CheckpointManager.load on a real DeepSpeed engine: a checkpoint that names
    another world size is converted (ds_to_universal) and loaded; weights, master weights and Adam's
    moments, and the module's buffers (BatchNorm statistics) are those saved, bit for bit, and the
    conversion is cleaned up."""
    from disent.checkpoint import CheckpointManager

    class Steps:
        def __init__(self):
            self.state = {"step": 3}

        def state_dict(self):
            return self.state

        def load_state_dict(self, state):
            self.state = state

    saved = _toy_engine(stage)
    for _ in range(3):
        loss = saved(torch.randn(4, 6)).pow(2).mean()
        saved.backward(loss)
        saved.step()
    manager = CheckpointManager(tmp_path)
    path = manager.save(3, {"vae": saved, "trainer": Steps()}, {"config": {}}, vae=saved.module)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))  # as if 2 ranks had written it

    loaded, steps = _toy_engine(stage), Steps()
    steps.state = None
    assert not torch.equal(_flat(saved.module.state_dict()), _flat(loaded.module.state_dict()))
    manager.load(manager.latest_complete(), {"vae": loaded, "trainer": steps})
    assert steps.state == {"step": 3}
    assert_state_dicts_equal(saved.module.state_dict(), loaded.module.state_dict())
    moments = _adam_state(saved)
    assert any(key.endswith("exp_avg_sq") for key in moments), moments.keys()
    assert_state_dicts_equal(moments, _adam_state(loaded))
    assert not (tmp_path / ".universal").exists()
    assert loaded._config.load_universal_checkpoint is False  # switched on for the one load only


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_partitioned_checkpoint_is_refused_before_the_conversion_reads_it(tmp_path, one_rank_group):
    """ds_to_universal unpickles without weights_only; every file is checked first, and the refusal is an
    error (the same on every rank), not a hang or a run of the file's code."""
    from disent.checkpoint import CheckpointError, CheckpointManager

    engine = _toy_engine(1)
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, {"vae": engine}, {"config": {}}, vae=engine.module)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    marker = tmp_path / "pwned"
    (optim,) = (path / "vae").glob("zero_pp_rank_0_*optim_states.pt")
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, optim)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        manager.load(manager.latest_complete(), {"vae": _toy_engine(1)})
    assert not marker.exists()


# --------------------------------------------------------------------------- preemption


def _signal_once_logged(run_dir: Path, proc, lines: int, sig: int) -> str:
    """Send `sig` to proc once run_dir/metrics.jsonl has `lines` records; return proc's output once it has ended.
    Waiting, the output (a pipe) shows only if the job ended first."""
    try:
        wait_for(lambda: len(metric_lines(run_dir)) >= lines, 120, f"{lines} logged steps", proc, poll=0.2,
                 describe=lambda: proc.stdout.read()[-4000:] if proc.poll() is not None else "")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return out


def test_sigterm_two_ranks_checkpoint_then_auto_resume(tmp_path, tiny_data):
    """SIGTERM to torchrun (as Kubernetes does): every rank finishes its step, a complete checkpoint is
    written, workers exit 75; a restart resumes from it automatically, in the same MLflow run."""
    run = tmp_path / "run"
    long = {"train.steps": 100000, "train.checkpoint_every": 100000, "train.log_every": 2, "train.zero_stage": 2}
    proc = torchrun(["train", BASE, *tiny_overrides(run, tiny_data, **long)], script=None, wait=False)
    out = _signal_once_logged(run, proc, 2, signal.SIGTERM)
    assert out.count("exiting with 75") == 2, out[-4000:]  # both ranks
    steps = complete_checkpoints(run)
    assert len(steps) == 1, out[-4000:]
    step = steps[0]
    assert 4 <= step < 100000
    ckpt = step_dir(run, step)
    leftovers = [p for p in (run / "checkpoints").iterdir() if p != ckpt]
    assert not leftovers and not list(ckpt.rglob(".*.tmp*"))
    assert torch.load(ckpt / "trainer-rank1.pt", weights_only=True)["trainer"]["step"] == step

    result = torchrun(["train", BASE, *tiny_overrides(run, tiny_data, **{**long, "train.steps": step + 2})], script=None)
    assert_ok(result)
    assert f"resumed from {ckpt} at step {step}" in result.stderr
    logged = metric_lines(run)
    assert logged[-1]["step"] == step + 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("disent").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "vae_loss")]
    assert len(steps) == len(set(steps))


def test_a_stop_whose_checkpoint_upload_hangs_exits_75_on_every_rank_within_the_bound(tmp_path, tiny_data):
    """Defect: with train.checkpoint_upload_url, rank 0 waited for the stop checkpoint's upload without a bound while
    the other ranks exited 75 at once, and srun --kill-on-bad-exit then SIGKILLed rank 0: a failure where a
    preemption was meant. Here the S3 endpoint accepts connections and never answers; both ranks wait at most
    train.checkpoint_upload_timeout_s for it, together, and exit 75."""
    import socket
    import time

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # connections complete in the backlog; no request is ever answered
    run = tmp_path / "run"
    long = {"train.steps": 100000, "train.checkpoint_every": 100000, "train.log_every": 2,
            "train.checkpoint_upload_url": "s3://bucket/ckpt", "train.checkpoint_upload_timeout_s": 4}
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{hole.getsockname()[1]}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        proc = torchrun(["train", BASE, *tiny_overrides(run, tiny_data, **long)], script=None, wait=False, env=env)
        started = time.monotonic()
        out = _signal_once_logged(run, proc, 2, signal.SIGTERM)
    finally:
        hole.close()
    assert out.count("exiting with 75") == 2, out[-4000:]
    assert "did not finish within 4s" in out, out[-4000:]
    assert time.monotonic() - started < 100, out[-4000:]
    assert len(complete_checkpoints(run)) == 1


def test_auto_resume_from_a_checkpoint_of_another_model_shape_is_one_input_error(tmp_path, tiny_data):
    run = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)

    def train(**extra):
        return subprocess.run([sys.executable, "-m", "disent.cli", "train", BASE,
                               *tiny_overrides(run, tiny_data, **{"train.steps": 2, **extra})],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    assert_ok(train())
    result = train(**{"model.z_dim": 6, "train.steps": 4})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "run_dir holds a checkpoint of another model" in result.stderr and "model.z_dim=4 (the config: 6)" in \
        result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_checkpoints_exits_130_and_marks_the_run_killed(tmp_path, tiny_data):
    """Ctrl-C (SIGINT) to a bare `disent train`: like SIGTERM, the step finishes and a checkpoint is written, then one
    line and exit 130 (was: a KeyboardInterrupt traceback, the steps since the last checkpoint lost, the run FAILED)."""
    run = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    overrides = tiny_overrides(run, tiny_data, **{"train.steps": 100000, "train.checkpoint_every": 100000,
                                                  "train.log_every": 2})
    proc = subprocess.Popen([sys.executable, "-m", "disent.cli", "train", BASE, *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _signal_once_logged(run, proc, 1, signal.SIGINT)
    assert proc.returncode == 130, out[-4000:]
    assert "interrupted at step" in out and "KeyboardInterrupt" not in out and "Traceback" not in out, out[-4000:]
    assert len(complete_checkpoints(run)) == 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("disent").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]


def _small_filesystem(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, tiny_data):
    """run_dir on a 3 MiB file system, where a 6.5 MB checkpoint cannot fit: one line naming the path and "no space
    left", exit 69 (a bounded retry: space may be freed), and no partial step folder (was: a 50-line "unexpected pos"
    traceback, exit 1, the partial folder left)."""
    small = tmp_path / "small"
    if not _small_filesystem(small, "3m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = small / "run"
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        result = subprocess.run(
            [sys.executable, "-m", "disent.cli", "train", BASE, *tiny_overrides(run, tiny_data, **{
                "train.steps": 4, "train.checkpoint_every": 2, "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"})],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 69, result.stderr[-3000:]
        assert "no space left on the device of" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_a_full_disk_during_prepare_is_one_line_and_nothing_counts_as_prepared(tmp_path):
    small = tmp_path / "small"
    if not _small_filesystem(small, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        result = subprocess.run([sys.executable, "-m", "disent.cli", "prepare", "sprites", str(small / "out"),
                                 "--num-samples", "3000", "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert "no space left on the device of" in result.stderr and "--overwrite" in result.stderr
        assert not list((small / "out").rglob("manifest.json"))
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_sigusr1_single_process_exits_75(tmp_path, tiny_data):
    """`disent train` without torchrun: SIGUSR1 -> checkpoint, exit code 75 (EX_TEMPFAIL)."""
    run = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    overrides = tiny_overrides(run, tiny_data, **{"train.steps": 100000, "train.checkpoint_every": 100000,
                                                  "train.log_every": 2, "train.progress": True})
    proc = subprocess.Popen([sys.executable, "-m", "disent.cli", "train", BASE, *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _signal_once_logged(run, proc, 1, signal.SIGUSR1)
    assert proc.returncode == 75, out[-4000:]
    assert "[rank 0]" in out and "preempted at step" in out
    assert len(complete_checkpoints(run)) == 1


# --------------------------------------------------------------------------- a real MLflow server


def test_mlflow_server_receives_params_metrics_tags_artifacts(tmp_path, tiny_data, mlflow_server):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, tiny_data, **{
        "train.steps": 6, "train.eval_every": 3, "tracking.uri": mlflow_server, "tracking.system_metrics": True,
        "tracking.experiment": "server-test", "tracking.run_name": "null", "model.z_dim": 6,
        "train.profile_steps": 2,
    })
    env = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}  # MLflow drops a sample cut short by the end
    result = torchrun(["train", BASE, *overrides], script=None, env=env)
    assert_ok(result)

    from mlflow.tracking import MlflowClient

    from disent.data.manifest import read_manifest

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("server-test").experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.info.run_name.startswith("tiny ") and "model.z_dim=6" in r.info.run_name  # config name + overrides
    assert r.data.params["model.z_dim"] == "6" and r.data.params["train.zero_stage"] == "0"
    assert r.data.params["data.url"] == str(tiny_data)
    tags = r.data.tags
    assert tags["world_size"] == "2" and tags["device_type"] == "cpu"
    assert tags["data_manifest_sha256"] == read_manifest(str(tiny_data), "train").digest
    assert tags["deepspeed_version"] and tags["torch_version"] == torch.__version__
    assert "git_commit" in tags
    for key in METRIC_KEYS:
        history = client.get_metric_history(r.info.run_id, key)
        assert [m.step for m in history] == [2, 4, 6], key
    assert any(k.startswith("system/") for k in r.data.metrics), sorted(r.data.metrics)

    def listing(path=None):
        return {f.path for f in client.list_artifacts(r.info.run_id, path)}

    assert {"config", "eval", "final", "profile"} <= listing()
    assert {"profile/trace-rank0.json", "profile/top-ops-rank0.txt"} <= listing("profile")
    assert (run / "profile" / "trace-rank1.json").is_file()  # every rank traces; rank 0 logs
    assert "aten::convolution" in (run / "profile" / "top-ops-rank1.txt").read_text()
    assert "config/config.yaml" in listing("config")
    assert {"config/deepspeed/vae.json", "config/deepspeed/disc.json"} <= listing("config/deepspeed")
    assert {f"eval/step-00000003/{name}" for name in ("reconstructions.png", "swap_grid.png", "prior_samples.png",
            "interpolation.png", "eval.json")} <= listing("eval/step-00000003")
    assert [m.step for m in client.get_metric_history(r.info.run_id, "eval/class_from_s_linear")] == [3, 6]
    assert {"final/vae.pt", "final/disc.pt"} <= listing("final")
    local = client.download_artifacts(r.info.run_id, "final/vae.pt", str(tmp_path))
    assert_state_dicts_equal(torch.load(local, weights_only=True), torch.load(run / "final" / "vae.pt", weights_only=True))
    assert "disent: trained 6 steps; MLflow run " + r.info.run_id in result.stdout
