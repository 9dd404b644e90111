#!/usr/bin/env bash
# The GPU check: one command, from the repository root of a machine with a CUDA GPU, under 8 minutes.
#
#   benchmarks/gpu_check.sh                       # results in ./gpu-check-YYYYmmdd-HHMMSS/
#   OUT=results/h200 benchmarks/gpu_check.sh      # results in results/h200/
#
# What it runs, each phase under `timeout` (one hang cannot eat the budget):
#   1. CUDA: `import torch; assert torch.cuda.is_available()` or exit 2 (nothing else is done).
#   2. Install what is missing, never torch: from .whl/ with --no-index when it exists (`make gpu-wheels` builds
#      it on a machine with a registry: a lent GPU machine has none), else `pip install -e .[test]`. The project
#      itself runs from this checkout (PYTHONPATH).
#   3. The machine: nvidia-smi -q, torch/CUDA/cuDNN/DeepSpeed versions, pip freeze, the git commit.
#   4. Shards: sprites 64x64 prepared once, for the benchmark and the tests.
#   5. `python benchmarks/bench_gpu.py` on configs/sprites_gpu.yaml (BENCH_STEPS steps, no final evaluation or
#      model): samples/s, MFU, GPU idle time in a step, data wait, the loader's rate, and what ran (the run's
#      summary.json: first step, the decoder's output dtype, peak memory, torch.compile's counters, last losses).
#   6. `pytest -m gpu tests/gpu`: the shipped GPU config trained on this GPU (bf16 + compile +
#      channels_last with a resume and evaluations, fp16, GPU weights loaded on CPU, deterministic on/off,
#      2 ranks over NCCL when 2 GPUs are visible). JUnit XML, the log and every run's output.
#   7. summary.md: the headline figures, and where everything is.
#
# Settings (environment): OUT (results folder), PYTHON (interpreter; default python, else python3),
# GPU_CHECK_BUDGET_S (total seconds, default 460), BENCH_STEPS (default 60).
# Exit codes: 0 all passed; 1 a test or the benchmark failed (see summary.md); 2 no CUDA device;
# 3 the project could not be installed.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 3
ROOT="$(pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-460}"
BENCH_STEPS="${BENCH_STEPS:-60}"
BENCH_LIMIT_S=180  # the benchmark's share: start, a cold compile, the steps, the loader
START=$SECONDS

if [ -z "$PYTHON" ]; then
  echo "gpu_check: no python or python3 on PATH (set PYTHON)" >&2
  exit 2
fi
if ! probe="$(timeout -k 5 120 "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>&1)"; then
  about="$(timeout -k 5 60 "$PYTHON" -c "import torch; print(f'torch {torch.__version__}, built for CUDA {torch.version.cuda}')" 2>/dev/null || echo "no torch importable")"
  echo "gpu_check: no CUDA device: \`$PYTHON -c \"import torch; assert torch.cuda.is_available()\"\` failed ($about; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>})." >&2
  echo "gpu_check: run this on a machine with an NVIDIA GPU and a CUDA build of torch (or set PYTHON to one). Nothing was run." >&2
  [ -n "$probe" ] && echo "$probe" | tail -n 3 | sed 's/^/gpu_check:   /' >&2
  exit 2
fi

OUT="${OUT:-gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 3
say() { echo "gpu_check: $*" | tee -a "$OUT/gpu_check.log" >&2; }
left() { echo $(( BUDGET_S - (SECONDS - START) )); }
phase() {  # phase NAME SECONDS CMD...: run under timeout (SIGINT first: pytest still writes its report), record rc and time
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc
  [ "$limit" -lt 10 ] && limit=10
  say "$name: up to ${limit}s: $*"
  timeout -s INT -k 20 "$limit" "$@"
  rc=$?
  [ $rc -eq 124 ] && say "$name: stopped after ${limit}s (timeout)"
  echo "$name $rc $((SECONDS - t0))" >> "$OUT/phases.txt"
  say "$name: exit $rc after $((SECONDS - t0))s"
  return $rc
}
say "results go to $OUT; python: $PYTHON; budget ${BUDGET_S}s"

# 2. install only what is missing, never torch; the project runs from this checkout
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
IMPORTS="import disent, deepspeed, mlflow, webdataset, boto3, sklearn, yaml, pytest"
if ! "$PYTHON" -c "$IMPORTS" > "$OUT/import-check.txt" 2>&1; then
  pip_cmd=("$PYTHON" -m pip install --disable-pip-version-check)
  if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
    # the machine's own torch stays: a constraint at its version (a local label such as +cu130 matches)
    "$PYTHON" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$OUT/constraints.txt"
    say "installing from .whl/ without an index ($(ls "$ROOT"/.whl/*.whl | wc -l) wheels), torch held at $(cat "$OUT/constraints.txt")"
    pip_cmd+=(--no-index --find-links "$ROOT/.whl" -c "$OUT/constraints.txt" "$ROOT"/.whl/*.whl)
  else
    say "disent or a dependency is not importable ($(tail -n 1 "$OUT/import-check.txt")) and there is no .whl/: pip install -e .[test]"
    pip_cmd+=(-e ".[test]")
  fi
  if ! phase install 240 "${pip_cmd[@]}" > "$OUT/pip-install.log" 2>&1 ||
     ! "$PYTHON" -c "$IMPORTS" >> "$OUT/import-check.txt" 2>&1; then
    say "the project could not be installed: see $OUT/pip-install.log and import-check.txt"
    exit 3
  fi
fi

# 3. the machine
timeout -k 5 60 nvidia-smi -q > "$OUT/nvidia-smi-q.txt" 2>&1 || say "nvidia-smi -q failed (see nvidia-smi-q.txt)"
timeout -k 5 60 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
timeout -k 5 120 "$PYTHON" -m pip freeze --disable-pip-version-check > "$OUT/pip-freeze.txt" 2>&1
{ git -C "$ROOT" rev-parse HEAD; git -C "$ROOT" status --short; } > "$OUT/git.txt" 2>&1
timeout -k 5 120 "$PYTHON" - > "$OUT/environment.json" 2>> "$OUT/gpu_check.log" <<'EOF'
import json, os, platform
import torch
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version(), "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
       "capability": list(torch.cuda.get_device_capability(0)), "cpus": os.cpu_count(),
       "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
for name in ("deepspeed", "mlflow", "triton", "numpy"):
    try:
        env[name] = __import__(name).__version__
    except Exception as exc:  # noqa: BLE001
        env[name] = f"not importable: {type(exc).__name__}"
print(json.dumps(env, indent=2))
EOF

# 4. shards, once, for the benchmark and the tests
SHARDS="$OUT/shards"
phase prepare 120 "$PYTHON" -m disent.cli prepare sprites "$SHARDS" --image-size 64 --num-samples 12000 \
  --group-size 32 --groups-per-shard 8 --no-progress --overwrite > "$OUT/prepare.log" 2>&1 || say "prepare failed: see prepare.log"

# 5. the benchmark first (stdout: one JSON object)
mkdir -p "$OUT/bench-run"
phase bench_gpu "$BENCH_LIMIT_S" "$PYTHON" benchmarks/bench_gpu.py --steps "$BENCH_STEPS" --url "$SHARDS" \
  --out "$OUT/bench-run" > "$OUT/bench_gpu.json" 2> "$OUT/bench_gpu.log"
bench_rc=$?
gzip -f "$OUT"/bench-run/trace-*.json 2>/dev/null  # Chrome traces are large; chrome://tracing and Perfetto read .gz

# 6. the GPU tests, in what is left
pytest_args=(-m gpu tests/gpu -v -rA -p no:cacheprovider --junitxml="$OUT/pytest-junit.xml")
"$PYTHON" -c "import pytest_timeout" 2>/dev/null || pytest_args+=(-o "addopts=-ra")  # addopts names --timeout
limit=$(( $(left) - 15 ))
DISENT_GPU_CHECK_OUT="$OUT" DISENT_GPU_SHARDS="$SHARDS" phase pytest "$limit" "$PYTHON" -m pytest "${pytest_args[@]}" \
  2>&1 | tee "$OUT/pytest.log"
pytest_rc=$(awk '$1 == "pytest" {print $2}' "$OUT/phases.txt")

# 7. summary.md
"$PYTHON" - "$OUT" > "$OUT/summary.md" 2>> "$OUT/gpu_check.log" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])


def read_json(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


def pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"


def num(v, fmt="{:.0f}"):
    return "n/a" if v is None else fmt.format(v)


env = read_json("environment.json") or {}
lines = [f"# GPU check: {', '.join(env.get('devices', [])) or 'unknown GPU'}", ""]
lines.append(f"torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), DeepSpeed {env.get('deepspeed')}, "
             f"Triton {env.get('triton')}, Python {env.get('python')}, {env.get('cpus')} CPUs; commit "
             + ((out / "git.txt").read_text().split()[0][:12] if (out / "git.txt").is_file() and (out / "git.txt").read_text().strip() else "?"))
lines += ["", "## Phases", "", "| phase | exit | seconds |", "|---|---|---|"]
if (out / "phases.txt").is_file():
    for row in (out / "phases.txt").read_text().splitlines():
        name, rc, secs = row.split()
        lines.append(f"| {name} | {rc}{' (timeout)' if rc == '124' else ''} | {secs} |")

lines += ["", "## Tests (`pytest -m gpu tests/gpu`)", ""]
phases = dict(row.split()[:2] for row in (out / "phases.txt").read_text().splitlines()) if (out / "phases.txt").is_file() else {}
if phases.get("pytest") in ("124", "137"):
    lines += ["**Stopped by its time limit**: the tests below finished; the others did not run.", ""]
try:
    root = ET.parse(out / "pytest-junit.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    a = suite.attrib
    lines.append(f"{a.get('tests')} tests: {a.get('failures')} failed, {a.get('errors')} errors, {a.get('skipped')} skipped, "
                 f"{float(a.get('time', 0)):.0f} s")
    lines += ["", "| test | outcome | seconds |", "|---|---|---|"]
    for case in suite.iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                detail = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
        name = case.get("name")
        lines.append(f"| {name} | {outcome}{': ' + detail.replace('|', '/') if detail else ''} | {float(case.get('time', 0)):.0f} |")
except (OSError, ET.ParseError, AttributeError) as exc:
    lines.append(f"no JUnit report ({type(exc).__name__}); see pytest.log")

det = read_json("determinism.json")
if det:
    on = det.get("on", {})
    lines += ["", "## Deterministic (sprites_gpu.yaml, one GPU, no compile)", "",
              f"- {num(on.get('steps_per_s'), '{:.2f}')} steps/s at micro batch {det.get('micro_batch_per_gpu')} "
              "(the benchmark above runs non-deterministic, as shipped)",
              f"- two deterministic runs bit-identical: {det.get('deterministic_runs_bit_identical', 'not measured')}"]

bench = read_json("bench_gpu.json")
lines += ["", "## Benchmark (`benchmarks/bench_gpu.py`)", ""]
if bench and "train_samples_per_s" in bench:
    busy = bench.get("keeps_gpu_busy")
    lines += [
        f"- {bench['config']}, micro batch {bench['micro_batch_per_gpu']} per GPU, {bench['precision']}, "
        f"compile {bench['compile']}",
        f"- train: {bench['train_samples_per_s']:.0f} samples/s, {bench['step_ms']:.2f} ms/step; "
        f"{bench['achieved_tflops']:.1f} TFLOP/s = MFU {pct(bench.get('model_flop_utilisation'))} "
        f"({bench['model_gflops_per_sample']:.1f} GFLOP/sample)",
        f"- GPU idle in a profiled step: {pct(bench.get('gpu_idle_fraction'))} "
        f"(profiled step {num(bench.get('profiled_step_ms'), '{:.2f}')} ms); data wait {pct(bench.get('data_wait_fraction'))}",
        f"- loader: {bench['loader_pairs_per_s']:.0f} pairs/s with {bench['loader_workers']} workers = "
        f"{bench['loader_over_train']:.2f}x the step",
        f"- keeps the GPU busy: {'unknown' if busy is None else 'yes' if busy else 'no: ' + '; '.join(bench.get('why', []))}",
    ]
    ran = bench.get("ran") or {}
    lines += ["", "What ran (the run's summary.json): " + (", ".join(f"{k} {v}" for k, v in sorted(ran.items()))
                                                        or "no summary")]
elif bench:
    lines.append(f"`{json.dumps(bench)}`")
else:
    lines.append("no result; see bench_gpu.log")

lines += ["", "## Files", "",
          "- pytest.log, pytest-junit.xml; logs/ (every training run's output); determinism.json",
          "- bench_gpu.json, bench_gpu.log; bench-run/ (metrics.jsonl, top operators, Chrome trace .gz)",
          "- nvidia-smi-q.txt, nvidia-smi.txt, environment.json, pip-freeze.txt, git.txt, phases.txt, gpu_check.log"]
print("\n".join(lines))
EOF

say "done in $((SECONDS - START))s: tests exit $pytest_rc, benchmark exit $bench_rc"
cat "$OUT/summary.md"
echo
echo "gpu_check: results are in $OUT (summary.md first)"
[ "$pytest_rc" = 0 ] && [ "$bench_rc" = 0 ]
