"""Bad configs and arguments through the real command line: `disent train ...` and the same under
`python -m launcher --nproc 2`. Each is refused with exit code 2 and one message naming the key, the
value or the file, with no traceback, before any process group starts (no rendezvous, no DeepSpeed
engine, no MLflow run, nothing written to run_dir)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support.faultkit import BASE, LAUNCHER, base_env
from tests.support.train_helpers import ROOT, tiny_overrides

pytestmark = pytest.mark.slow

# Lines that only appear once a process group / engine / run exists.
STARTED = ("init_process_group", "Initializing TorchBackend", "deepspeed.initialize", "DeepSpeed Flops",
           "created MLflow run", "training from step", "[rank 1]", "Added key: store_based_barrier")


def run(args, timeout=120, **env) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run(args, cwd=ROOT, env=base_env(OMP_NUM_THREADS="1", **env), capture_output=True,
                            text=True, timeout=timeout)
    return result, time.monotonic() - start


def assert_refused(result, took, needles, ranks=1):
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("disent: config error:")]
    # one paragraph (one line) per rank that got to print it: once a rank refuses, the launcher
    # stops the others, which may not have reached their own check yet
    assert 1 <= len(errors) <= ranks and len(set(errors)) == 1, out[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not [s for s in STARTED if s in out], out[-3000:]
    assert took < 60, took


CASES = {
    "typo": (["model.z_dimm=8"], ["'model.z_dimm'", "did you mean 'model.z_dim'", "the command line"]),
    "typo-section": (["trian.steps=8"], ["'trian'", "did you mean 'train'"]),
    "wrong-type": (["train.steps=ten"], ["'train.steps'", "must be int", "'ten'"]),
    "wrong-type-list": (["optim.vae.betas=0.9"], ["'optim.vae.betas'", "a list of float"]),
    "unknown-discriminator": (["model.discriminator=triplet"], ["'model.discriminator'", "'pair', 'label'",
                                                                "'triplet'"]),
    "unknown-on-error": (["data.on_error=ignore"], ["'data.on_error'", "'raise', 'skip'"]),
    "not-positive": (["train.steps=0"], ["'train.steps' must be > 0"]),
    "zero-stage-3": (["train.zero_stage=3"], ["'train.zero_stage' must be 0, 1 or 2"]),
    "fp16-on-cpu": (["train.precision=fp16"], ["train.precision=fp16 needs a GPU", "bf16"]),
    "channels-last-with-zero": (["train.channels_last=true", "train.zero_stage=2"],
                                ["'train.channels_last' needs train.zero_stage=0"]),
    "missing-data": (["data.url=/nonexistent/data"], ["no manifest for split 'train'", "/nonexistent/data"]),
    "data-mismatch": (["data.num_classes=7"], ["data.num_classes=7 but the data has 4 classes"]),
    "not-an-override": (["model.z_dim"], ["'model.z_dim' is not of the form section.key=value"]),
    "credentials-in-url": (["tracking.uri=http://me:hunter2-pw@127.0.0.1:5000"],
                           ["'tracking.uri'", "http://***@127.0.0.1:5000", "MLFLOW_TRACKING_PASSWORD"]),
    "resume-missing": (["--resume", "/nonexistent/step-00000003"], ["--resume", "does not exist"]),
    "misaligned-zero-bucket": (["train.zero_stage=1", "deepspeed.vae.zero_optimization.allgather_bucket_size=999"],
                               ["'deepspeed.vae.zero_optimization.allgather_bucket_size' is 999", "multiple of 2"]),
}


# Settings only DeepSpeed itself can judge: refused while the engines are built (the process group
# exists by then), still as one line naming the setting, exit 2, no traceback, no MLflow run.
DEEPSPEED_REFUSES = {
    "bucket-size-zero": (["train.zero_stage=2", "deepspeed.disc.zero_optimization.reduce_bucket_size=0"],
                         ["DeepSpeed refused the disc engine's config",
                          "deepspeed.disc.zero_optimization.reduce_bucket_size"]),
    "unknown-zero-key": (["train.zero_stage=1", "deepspeed.vae.zero_optimization.overlap_comms=true"],
                         ["DeepSpeed refused the vae engine's config", "overlap_comms",
                          "deepspeed.vae.zero_optimization.overlap_comms"]),
}


@pytest.mark.parametrize("case", list(DEEPSPEED_REFUSES))
def test_a_setting_deepspeed_refuses_is_named_in_one_line(case, tmp_path, tiny_data):
    extra, needles = DEEPSPEED_REFUSES[case]
    result, took = run([sys.executable, "-m", "disent.cli", "train", BASE, *tiny_overrides(tmp_path / "run", tiny_data),
                        *extra])
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("disent: config error:")]
    assert len(errors) == 1, out[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert "created MLflow run" not in out and "training from step" not in out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_refused_before_anything_starts(case, tmp_path, tiny_data):
    extra, needles = CASES[case]
    result, took = run([sys.executable, "-m", "disent.cli", "train", BASE, *tiny_overrides(tmp_path / "run", tiny_data),
                        *extra])
    assert_refused(result, took, needles)
    assert "hunter2-pw" not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_config_files(tmp_path, tiny_data):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(ROOT / BASE) + "\nmodel:\n  z_dimm: 8\n")
    result, took = run([sys.executable, "-m", "disent.cli", "train", str(bad), *tiny_overrides(tmp_path / "r", tiny_data)])
    assert_refused(result, took, ["'model.z_dimm'", f"(from {bad})", "did you mean 'model.z_dim'"])

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    result, took = run([sys.executable, "-m", "disent.cli", "train", str(broken)])
    assert_refused(result, took, [str(broken), "not valid YAML"])

    result, took = run([sys.executable, "-m", "disent.cli", "train", str(tmp_path / "nope.yaml")])
    assert_refused(result, took, [str(tmp_path / "nope.yaml"), "does not exist"])


def test_bad_arguments_are_usage_errors(tmp_path):
    for args in (["train"], ["train", BASE, "--no-such-flag", "x"], ["trian", BASE]):
        result, _ = run([sys.executable, "-m", "disent.cli", *args])
        assert result.returncode == 2 and "usage: disent" in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("extra, needles", [
    (["train.global_batch_size=9"], ["train.global_batch_size=9 is not divisible by world size (2)"]),
    (["train.global_batch_size=12", "train.grad_accum=4"], ["world size (2) x train.grad_accum (4) = 8"]),
    (["model.discriminator=triplet"], ["'model.discriminator'"]),
    (["data.url=/nonexistent/data"], ["no manifest for split 'train'"]),
])
def test_bad_config_under_the_launcher_is_refused_by_every_rank_without_a_rendezvous(tmp_path, tiny_data, extra,
                                                                                      needles):
    result, took = run([*LAUNCHER, "--nproc", "2", "--grace", "5", "--", sys.executable, "-m", "disent.cli", "train",
                        BASE, *tiny_overrides(tmp_path / "run", tiny_data), *extra])
    assert_refused(result, took, needles, ranks=2)
    assert "launcher: rank" in result.stderr and "exited with code 2" in result.stderr


def test_a_config_error_is_not_restarted_by_the_launcher(tmp_path, tiny_data):
    result, _ = run([*LAUNCHER, "--nproc", "2", "--max-restarts", "2", "--grace", "5", "--", sys.executable, "-m",
                     "disent.cli", "train", BASE, *tiny_overrides(tmp_path / "run", tiny_data), "model.z_dimm=8"])
    assert result.returncode == 2
    assert "restart 1/2" not in result.stderr
