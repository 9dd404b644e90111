"""The shipped GPU config on a real GPU, through the real command, cut to what each must show (the whole check fits
8 minutes): bf16 + torch.compile + channels_last for 10 steps, then a resume to 15 with one evaluation; fp16 with
its evaluation; GPU-written weights loaded on a CPU-only process; two short deterministic runs that must end with the
same bits (their speed goes to determinism.json); 2 ranks on NCCL where there are 2 GPUs. Sizes: the shipped model
(sprites_gpu.yaml) at its per-GPU micro batch, evaluations on 500 train / 200 test images. Each run's
run_dir/summary.json says what ran (the decoder's output dtype, compile counters, peak memory). See conftest.py for
the skip and the logs."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import yaml

from tests.support.gpu_helpers import DEVICE, DRY_RUN, GPU_CONFIG, MICRO_BATCH, ROOT, cuda_devices, output, tail
from tests.support.train_helpers import logged_steps, metric_lines, step_dir

pytestmark = pytest.mark.gpu  # also set for every test in tests/gpu/ by conftest.py, with the skip


def evaluation(run_dir, step) -> dict:
    path = run_dir / "eval" / f"step-{step:08d}" / "eval.json"
    assert path.is_file(), f"no evaluation at step {step}: {path} is missing"
    return json.loads(path.read_text())


def assert_trained(result, run_dir, last_step: int):
    """Exit 0 on the requested device, a complete last checkpoint, finite losses, no evaluation error."""
    assert result.returncode == 0, tail(result)
    text = output(result)
    assert f"device: {DEVICE}" in text, tail(result)
    assert "ERROR: the evaluation" not in text, tail(result)  # an evaluation failure fails the check
    assert (step_dir(run_dir, last_step) / "COMPLETE").is_file(), tail(result)
    lines = metric_lines(run_dir)
    assert lines and lines[-1]["step"] == last_step, lines[-1:]
    bad = [m["step"] for m in lines if not (math.isfinite(m["vae_loss"]) and math.isfinite(m["disc_loss"]))]
    assert not bad, f"non-finite losses at steps {bad}"


# --------------------------------------------------------------------------- (a) bf16, compiled, resumed


@pytest.fixture(scope="module")
def compiled_run(runs, tmp_path_factory):
    """sprites_gpu.yaml as shipped (bf16, torch.compile, channels_last, cudnn autotuning) for 10 steps with a
    checkpoint at 5 and 10 and no evaluation; then the same command asked for 15 steps resumes from step 10 (its
    graphs from the shared compile cache, which is what a restart pays) and evaluates once, at the end."""
    run_dir = tmp_path_factory.mktemp("bf16-compiled") / "run"
    common = {"train.checkpoint_every": 5, "train.eval_every": 1000}
    first = runs.run("bf16_compiled_first", ["train", GPU_CONFIG, *runs.overrides(
        run_dir, **common, **{"train.steps": 10, "tracking.log_model": "false", "eval.at_end": "false"})],
        timeout=360)
    assert_trained(first, run_dir, 10)
    resumed = runs.run("bf16_compiled_resumed", ["train", GPU_CONFIG, *runs.overrides(
        run_dir, **common, **{"train.steps": 15})], timeout=240)
    return {"dir": run_dir, "first": first, "resumed": resumed}


def test_shipped_gpu_config_trains_compiled_in_bf16_resumes_and_evaluates(compiled_run):
    run_dir, resumed = compiled_run["dir"], compiled_run["resumed"]
    assert_trained(resumed, run_dir, 15)
    assert f"resumed from {step_dir(run_dir, 10)} at step 10" in output(resumed), tail(resumed)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    ran = json.loads((run_dir / "summary.json").read_text())  # what the resumed run did
    if not DRY_RUN:
        assert (saved["precision"], saved["compile"], saved["channels_last"]) == ("bf16", True, True), saved
        assert ran["decoder_output_dtype"] == "bfloat16" and ran["compile_frames"] >= 1, ran
        assert ran["peak_memory_gib"] > 0, ran
    assert ran["status"] == "FINISHED" and ran["steps"] == 5 and math.isfinite(ran["last_vae_loss"]), ran
    assert saved["device"] == DEVICE and saved["global_batch_size"] == MICRO_BATCH
    assert logged_steps(run_dir) == [5, 10, 15]  # one log window every 5 steps
    for step in (5, 10, 15):
        assert (step_dir(run_dir, step) / "COMPLETE").is_file(), step
    report = evaluation(run_dir, 15)  # the one evaluation, after the resume
    assert math.isfinite(report["class_from_s_mlp"]) and report["grids"], sorted(report)
    assert not (run_dir / "eval" / "step-00000010").exists()  # the first run: eval.at_end=false
    assert (run_dir / "final" / "vae.pt").is_file() and (run_dir / "final" / "model" / "MLmodel").is_file()
    assert "model was not written" not in output(resumed), tail(resumed)


# --------------------------------------------------------------------------- (b) fp16


@pytest.fixture(scope="module")
def fp16_run(runs, tmp_path_factory):
    if DRY_RUN:
        pytest.skip("fp16 needs CUDA (dry run on CPU)")
    run_dir = tmp_path_factory.mktemp("fp16") / "run"
    trained = runs.run("fp16_train", ["train", GPU_CONFIG, *runs.overrides(run_dir, **{
        "train.precision": "fp16", "train.channels_last": "false", "train.compile": "false", "train.steps": 15,
        "train.checkpoint_every": 15,
        "train.eval_every": 1000, "tracking.log_model": "false"})], timeout=240)
    return {"dir": run_dir, "trained": trained}


def test_fp16_trains_with_loss_scaling_and_its_evaluation_is_present(fp16_run, runs):
    run_dir, trained = fp16_run["dir"], fp16_run["trained"]
    assert_trained(trained, run_dir, 15)
    ds = json.loads((run_dir / "deepspeed" / "vae.json").read_text())
    assert ds["fp16"]["enabled"] and not ds.get("torch_autocast", {}).get("enabled"), ds
    report = evaluation(run_dir, 15)  # the end-of-training evaluation (fp16 weights through a float32 copy)
    assert math.isfinite(report["class_from_s_mlp"]), sorted(report)
    # `disent eval` of the fp16 checkpoint, on the GPU it finds
    evaluated = runs.run("fp16_eval", ["eval", run_dir, "eval.max_train_samples=500", "eval.max_test_samples=200",
                                       "eval.probe_epochs=5", "eval.grid_size=4", "--no-mlflow"], timeout=180)
    assert evaluated.returncode == 0, tail(evaluated)
    path = run_dir / "eval" / "step-00000015" / "eval.json"  # one place per step, the training's and `disent eval`'s
    assert path.is_file(), tail(evaluated)
    assert math.isfinite(json.loads(path.read_text())["class_from_s_mlp"])


# --------------------------------------------------------------------------- (c) GPU weights on a CPU


_LOAD_ON_CPU = """
import json, sys
import numpy as np, torch
import disent
assert not torch.cuda.is_available(), "this process must see no GPU"
run_dir = sys.argv[1]
x = np.random.default_rng(0).integers(0, 256, (16, 3, 64, 64), dtype=np.uint8)
out = {}
for name, source in (("run", run_dir), ("final", run_dir + "/final"), ("checkpoint", sys.argv[2])):
    model = disent.load(source, device="cpu")
    params = {(p.device.type, p.dtype) for p in model.vae.parameters()}
    s, mu, logvar = model.encode(x)
    swapped = model.swap(x[:8], x[8:])
    out[name] = {"params": sorted(map(str, params)), "s": s.tolist(), "mu": mu.tolist(),
                 "shapes": [list(s.shape), list(mu.shape), list(logvar.shape), list(swapped.shape)],
                 "finite": bool(np.isfinite(s).all() and np.isfinite(mu).all() and np.isfinite(swapped).all())}
print(json.dumps(out))
"""


@pytest.mark.parametrize("which", ["compiled_run", "fp16_run"])
def test_weights_written_on_the_gpu_load_and_encode_on_a_cpu_only_process(which, request, runs):
    run = request.getfixturevalue(which)
    run_dir = run["dir"]
    if not (run_dir / "final" / "vae.pt").is_file():
        pytest.fail(f"{which} did not finish; see its test")
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _LOAD_ON_CPU, str(run_dir), str(last)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, tail(result)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    import numpy as np

    for name, model in got.items():
        assert model["params"] == ["('cpu', torch.float32)"], (name, model["params"])
        assert model["shapes"] == [[16, 8], [16, 8], [16, 8], [8, 3, 64, 64]], (name, model["shapes"])
        assert model["finite"], name
    # the run's latest checkpoint and its final export hold the same weights
    for name in ("final", "checkpoint"):
        np.testing.assert_allclose(got[name]["s"], got["run"]["s"], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got[name]["mu"], got["run"]["mu"], atol=1e-5, err_msg=name)


# --------------------------------------------------------------------------- (d) deterministic on and off


@pytest.fixture(scope="module")
def determinism_runs(runs, gpu_out, tmp_path_factory):
    """The shipped config (without compile, to keep it short) for 10 steps with train.deterministic true, twice, no
    final evaluation. OUT/determinism.json gets each run's speed (its log windows after the first) as it finishes,
    then whether the two runs ended with the same bits."""
    import torch

    root = tmp_path_factory.mktemp("determinism")
    settings = {"train.compile": "false", "train.steps": 10, "train.checkpoint_every": 1000,
                "train.eval_every": 1000, "tracking.log_model": "false", "eval.at_end": "false"}
    results, report = {}, {"config": str(GPU_CONFIG.relative_to(ROOT)), "device": DEVICE,
                           "micro_batch_per_gpu": MICRO_BATCH, "overrides": {k: str(v) for k, v in settings.items()}}
    for name, on in (("on", "true"), ("on_again", "true")):
        run_dir = root / name
        result = runs.run(f"deterministic_{name}", ["train", GPU_CONFIG, *runs.overrides(
            run_dir, **settings, **{"train.deterministic": on})], timeout=240)
        results[name] = (result, run_dir)
        if result.returncode == 0 and (run_dir / "metrics.jsonl").is_file():
            timed = metric_lines(run_dir)[1:] or metric_lines(run_dir)
            report[name] = {key: statistics.fmean(w[key] for w in timed)
                            for key in ("steps_per_s", "samples_per_s", "data_wait_fraction")}
        else:
            report[name] = {"failed": f"exit {result.returncode}", "log": str(runs.log(f"deterministic_{name}"))}
        (gpu_out / "determinism.json").write_text(json.dumps(report, indent=2))
    finals = [root / name / "final" / "vae.pt" for name in ("on", "on_again")]
    if all(path.is_file() for path in finals):
        a, b = (torch.load(path, map_location="cpu", weights_only=True) for path in finals)
        report["deterministic_runs_bit_identical"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (gpu_out / "determinism.json").write_text(json.dumps(report, indent=2))
    return results, report


def test_deterministic_runs_train_and_their_speed_is_recorded(determinism_runs, gpu_out):
    results, report = determinism_runs
    for name in ("on", "on_again"):
        result, run_dir = results[name]
        assert_trained(result, run_dir, 10)
        assert report[name]["steps_per_s"] > 0
    assert (gpu_out / "determinism.json").is_file()


def test_two_deterministic_runs_end_with_the_same_weights(determinism_runs):
    """docs/training.md: with train.deterministic on, the same device and ranks give the same bits."""
    results, report = determinism_runs
    for name in ("on", "on_again"):
        assert results[name][0].returncode == 0, tail(results[name][0])
    # torch warns (train.deterministic sets warn_only) for each op without a deterministic kernel
    warned = sorted({line.strip() for line in output(results["on"][0]).splitlines() if "deterministic" in line
                     and "Warning" in line})
    assert report.get("deterministic_runs_bit_identical"), ("two deterministic runs of the same seed ended apart; "
                                                            "torch's warnings:\n" + "\n".join(warned[:20]))


# --------------------------------------------------------------------------- (e) two ranks on NCCL


def test_two_ranks_on_two_gpus_train_over_nccl(runs, tmp_path):
    if not DRY_RUN and cuda_devices() < 2:
        pytest.skip("needs 2 CUDA devices: NCCL cannot put two ranks on one GPU")
    run_dir = tmp_path / "run"
    result = runs.run("two_ranks_nccl", ["train", GPU_CONFIG, *runs.overrides(run_dir, nproc=2, **{
        "train.compile": "false", "train.steps": 10, "train.checkpoint_every": 10, "train.eval_every": 1000,
        "tracking.log_model": "false"})], timeout=300, nproc=2)
    assert_trained(result, run_dir, 10)
    assert f"2 rank(s), backend {'gloo' if DRY_RUN else 'nccl'}" in output(result), tail(result)
    evaluation(run_dir, 10)
