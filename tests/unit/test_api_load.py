"""`disent.load` without a run: what it says when the path is wrong. The API on a real run and the MLflow model
it logs: tests/integration/test_api.py."""
from __future__ import annotations

import pytest

import disent


def test_load_names_what_it_takes_when_the_path_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory, a checkpoint directory"):
        disent.load(tmp_path / "nothing-here")
