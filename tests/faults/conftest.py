"""Fixtures of the fault-injection suite (tests/faults/). See docs/faults.md for the table of faults."""
from __future__ import annotations

import pytest

from train_helpers import make_tiny_data


@pytest.fixture(scope="session")
def fault_data(tmp_path_factory):
    """Tiny real shards (28x28x1, 4 classes, 3 training shards) shared by the suite."""
    return make_tiny_data(tmp_path_factory.mktemp("fault-data"))
