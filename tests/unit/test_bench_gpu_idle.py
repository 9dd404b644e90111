"""benchmarks/bench_gpu.py's GPU idle time, read from a constructed profiler trace. The benchmark scripts run
end to end: tests/integration/test_benchmarks.py."""
from __future__ import annotations

import json
import sys

from tests.support.train_helpers import ROOT


def test_gpu_idle_fraction_is_the_time_no_gpu_work_ran_within_the_profiled_steps(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gpu import gpu_idle

    def event(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 0}

    events = [event("user_annotation", "ProfilerStep#6", 100, 100), event("user_annotation", "ProfilerStep#7", 200, 100),
              event("kernel", "before the steps", 0, 90),  # outside: not counted
              event("kernel", "a", 90, 30),  # clipped to 100..120
              event("kernel", "b", 110, 40), event("gpu_memcpy", "c", 140, 20),  # overlap: 100..160 in all
              event("gpu_memset", "d", 250, 100),  # clipped to 250..300
              event("cpu_op", "aten::mm", 100, 200)]  # the CPU's work is not the GPU's
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    got = gpu_idle(trace)
    assert got["profiled_steps"] == 2 and abs(got["gpu_idle_fraction"] - (1 - 110 / 200)) < 1e-9, got
    assert abs(got["profiled_step_ms"] - 0.1) < 1e-9 and abs(got["gpu_busy_ms_per_step"] - 0.055) < 1e-9, got
    trace.write_text(json.dumps({"traceEvents": events[:2] + events[-1:]}))  # a CPU run: no GPU activity
    assert gpu_idle(trace) is None
