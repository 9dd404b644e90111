"""The exit codes have one definition (disent.errors.ExitCode) that every consumer reads."""
from __future__ import annotations

import re
import subprocess
import sys

import yaml

from disent.config import ConfigError
from disent.data.errors import DataError, DataUnavailable, ShardError
from disent.errors import ExitCode, InputError, RetryableFailure
from test_k8s import expected_policy, policy_by_code
from train_helpers import ROOT


def test_each_kind_of_failure_has_its_own_code():
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    assert ExitCode.INPUT_ERROR == 2 and ExitCode.RETRYABLE not in (0, 1, 2, ExitCode.PREEMPTED)
    for input_error in (ConfigError, DataError):
        assert issubclass(input_error, InputError) and not issubclass(input_error, RetryableFailure)
    for runtime in (DataUnavailable, ShardError):
        assert issubclass(runtime, RetryableFailure) and not issubclass(runtime, InputError)


def test_scripts_read_the_codes_from_the_package():
    shell = subprocess.run([sys.executable, "-m", "disent.errors", "--shell"], capture_output=True, text=True,
                           check=True).stdout
    assert dict(line.split("=") for line in shell.split()) == {f"EXIT_{c.name}": str(int(c)) for c in ExitCode}
    script = (ROOT / "slurm" / "train.sh").read_text()
    assert "-m disent.errors --shell" in script
    after = script[script.index('eval "${codes}"'):]  # before it, only "cannot import disent" (exit 2)
    code_lines = [line for line in after.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code_lines if re.search(r"\b(2|69|75)\b", line)], "train.sh hard-codes a code"
    for name in ("EXIT_PREEMPTED", "EXIT_RETRYABLE", "EXIT_INPUT_ERROR"):
        assert f'"${{{name}}}"' in script
    # the Job's podFailurePolicy names the codes, and any other failing code is counted (tests/test_k8s.py)
    job = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "job.yaml").read_text()) if d and d["kind"] == "Job")
    assert policy_by_code(job) == {code: expected_policy(code) for code in range(1, 256)}


def test_no_module_defines_its_own_exit_code_numbers():
    pattern = re.compile(r"^\s*[A-Z_]*(EXIT|EX)_[A-Z_]+\s*=\s*\d+", re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("disent", "launcher") for p in (ROOT / folder).rglob("*.py")
                 if pattern.search(p.read_text())]
    assert not offenders, offenders
