"""The shell scripts read the exit codes from the package (`python -m disent.errors --shell`), and the Job's
pod failure policy names the same codes. The codes themselves: tests/unit/test_exit_codes.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import yaml

from disent.errors import ExitCode
from tests.support.k8s import expected_policy, policy_by_code
from tests.support.train_helpers import ROOT


def test_scripts_read_the_codes_from_the_package():
    shell = subprocess.run([sys.executable, "-m", "disent.errors", "--shell"], capture_output=True, text=True,
                           check=True).stdout
    assert dict(line.split("=") for line in shell.split()) == {f"EXIT_{c.name}": str(int(c)) for c in ExitCode}
    script = (ROOT / "slurm" / "train.sh").read_text()
    assert "-m disent.errors --shell" in script
    after = script[script.index('eval "${codes}"'):]  # before it, only "not in a Slurm job" and "cannot import disent" (2)
    code_lines = [line for line in after.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code_lines if re.search(r"\b(2|69|75)\b", line)], "train.sh hard-codes a code"
    for name in ("EXIT_PREEMPTED", "EXIT_RETRYABLE", "EXIT_INPUT_ERROR"):
        assert f'"${{{name}}}"' in script
    # the Job's podFailurePolicy names the codes, and any other failing code is counted (tests/unit/test_k8s_manifest.py)
    job = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "job.yaml").read_text()) if d and d["kind"] == "Job")
    assert policy_by_code(job) == {code: expected_policy(code) for code in range(1, 256)}


def test_train_sh_outside_slurm_says_to_submit_it_with_sbatch():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(ROOT / "slurm" / "train.sh"), "configs/base.yaml"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unbound variable" not in result.stderr
    assert result.stderr.count("\n") == 1 and "submit it with sbatch" in result.stderr, result.stderr
