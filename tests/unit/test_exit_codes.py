"""The exit codes have one definition (disent.errors.ExitCode) that every consumer reads (the scripts that read
them: tests/integration/test_exit_codes_scripts.py)."""
from __future__ import annotations

import re

from disent.config import ConfigError
from disent.data.errors import DataError, DataUnavailable, ShardError
from disent.errors import ExitCode, InputError, RetryableFailure
from tests.support.train_helpers import ROOT


def test_each_kind_of_failure_has_its_own_code():
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    assert ExitCode.INPUT_ERROR == 2 and ExitCode.RETRYABLE not in (0, 1, 2, ExitCode.PREEMPTED)
    for input_error in (ConfigError, DataError):
        assert issubclass(input_error, InputError) and not issubclass(input_error, RetryableFailure)
    for runtime in (DataUnavailable, ShardError):
        assert issubclass(runtime, RetryableFailure) and not issubclass(runtime, InputError)


def test_no_module_defines_its_own_exit_code_numbers():
    pattern = re.compile(r"^\s*[A-Z_]*(EXIT|EX)_[A-Z_]+\s*=\s*\d+", re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("disent", "launcher") for p in (ROOT / folder).rglob("*.py")
                 if pattern.search(p.read_text())]
    assert not offenders, offenders
