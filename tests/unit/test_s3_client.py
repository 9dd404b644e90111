"""The S3 client follows the standard AWS settings a user gives and adds the project's retries only where none is
given (real botocore clients; no request is sent)."""
from __future__ import annotations

import pytest


@pytest.fixture
def aws(monkeypatch):
    for var in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "DISENT_S3_RETRIES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    return monkeypatch


def _retries():
    from disent.io.s3 import connection

    connection._clients.clear()
    return connection.client().meta.config.retries


def test_aws_max_attempts_and_retry_mode_are_respected(aws):
    aws.setenv("AWS_MAX_ATTEMPTS", "3")
    aws.setenv("AWS_RETRY_MODE", "adaptive")
    assert _retries() == {"total_max_attempts": 3, "mode": "adaptive"}


def test_without_them_the_projects_retries_apply(aws):
    aws.setenv("DISENT_S3_RETRIES", "4")
    assert _retries() == {"mode": "standard", "total_max_attempts": 5}  # 4 retries after the first attempt
    aws.setenv("AWS_RETRY_MODE", "legacy")  # one given, the other still the project's
    assert _retries() == {"mode": "legacy", "total_max_attempts": 5}
