"""glibc malloc thresholds (disent.train.engines.keep_freed_memory_for_reuse): each step's freed
activations are reused instead of being page-faulted in again. Page faults are counted, not timed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from disent.train.engines import _ALLOCATOR_SETTINGS

# A few conv training steps; prints whether the thresholds were set and the page faults per step.
STEPS = """
import resource, sys
import torch
from disent.train.engines import keep_freed_memory_for_reuse
applied = keep_freed_memory_for_reuse() if sys.argv[1] == "tune" else False
net = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(64, 64, 3, padding=1))
x = torch.rand(64, 1, 28, 28)
def step():
    net(x).square().mean().backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def run_steps(mode: str, **extra_env) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k not in _ALLOCATOR_SETTINGS}
    env.update(OMP_NUM_THREADS="1", **extra_env)
    out = subprocess.run([sys.executable, "-c", STEPS, mode], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_fixed_thresholds_stop_the_per_step_page_faults():
    applied, tuned = run_steps("tune")
    _, default = run_steps("default")
    assert applied
    assert tuned * 3 < default, (tuned, default)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_an_allocator_chosen_in_the_environment_is_left_alone():
    applied, _ = run_steps("tune", MALLOC_ARENA_MAX="2")
    assert not applied
