#!/bin/bash
# Train disent under Slurm: srun starts one task per GPU, each through the launcher
# (python -m launcher), which turns SLURM_PROCID/NTASKS/LOCALID/NODEID and the node list into
# RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
#
#   sbatch slurm/train.sh                                   # configs/fashion_mnist.yaml, 1 node x 8 GPUs
#   sbatch --nodes=4 slurm/train.sh configs/multinode_gpu.yaml train.steps=50000
#   CONFIG=configs/sprites.yaml OVERRIDES="model.z_dim=32 train.zero_stage=2" \
#     DATA_URL=s3://bucket/sprites MLFLOW_TRACKING_URI=http://mlflow:5000 sbatch slurm/train.sh
#
# Every #SBATCH line can be overridden by the same sbatch flag (e.g. --ntasks-per-node=4
# --gpus-per-node=4, or --gpus-per-node=0 --cpus-per-task=1 on a CPU partition). Settings from
# the environment (sbatch exports the submitting shell's environment):
#   CONFIG               config file (or the first argument after the script)
#   OVERRIDES            space-separated section.key=value overrides (or the remaining arguments)
#   DATA_URL             overrides data.url (a directory or s3://bucket/prefix)
#   MLFLOW_TRACKING_URI  overrides tracking.uri (and is what MLflow reads)
#   PYTHON               the interpreter with disent installed (default: python3 on PATH)
#   TRAIN_CMD            the training command (default: disent train)
#
#   MAX_RETRIES          requeues after failures (any exit but 0, 2 and 75) before the job fails (default 3)
#   DISENT_SWEEP         set by `disent sweep --backend slurm`: the sweep file; array task i trains point i
#
# CPUs: srun gets --cpus-per-task=$SLURM_CPUS_PER_TASK explicitly. Since Slurm 22.05 srun no longer
# inherits sbatch's --cpus-per-task, so without it each task would be bound to one core while it runs
# OMP_NUM_THREADS=--cpus-per-task threads and its DataLoader workers.
#
# Exit codes (disent.errors.ExitCode, read from the installed package below; the one table is in
# docs/faults.md), as srun reports them for the step:
#   0      done.
#   2      an input error (config, data at start, checkpoint): never requeued; fix the input.
#   75     preempted: Slurm sends SIGUSR1 120 s before the time limit (--signal=USR1@120), and SIGTERM
#          when the job is preempted, cancelled or requeued. The trainer finishes its step, writes a
#          checkpoint and exits 75; this script requeues the job (--requeue), always, and it does not
#          count as a retry.
#   other  a failure that a restart may get past: 69 (a retryable failure: S3 unreachable past its
#          retries, a shard failing mid-run, a lost peer), a crash (1), or a signal death (128+N: 134
#          SIGABRT from NCCL's watchdog, 137 SIGKILL, 143 SIGTERM from srun --kill-on-bad-exit ending the
#          step). Requeued up to MAX_RETRIES times, counted in the job's Comment field across requeues;
#          then the job fails with that code.
# srun reports the highest signal (128+N) of any task, else the highest exit code: when one task
# exits 2 while another is still starting, srun's SIGTERM to the latter can make the step's code 143,
# which is retried within MAX_RETRIES rather than failing at once.
# A requeued job runs this script again and the trainer resumes from the latest complete checkpoint
# in run_dir. The output file is appended to, so one file holds every restart of the job.
#
#SBATCH --job-name=disent
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120
#SBATCH --requeue
set -uo pipefail

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "slurm/train.sh: not inside a Slurm job (SLURM_JOB_ID is unset): submit it with sbatch, e.g." \
       "sbatch slurm/train.sh configs/fashion_mnist.yaml (on one machine: python -m launcher --nproc N -- disent train CONFIG)" >&2
  exit 2
fi
PYTHON=${PYTHON:-python3}
if ! codes=$("${PYTHON}" -m disent.errors --shell); then
  echo "slurm/train.sh: ${PYTHON} cannot import disent (set PYTHON to the interpreter it is installed in)" >&2
  exit 2
fi
eval "${codes}"  # EXIT_INPUT_ERROR, EXIT_RETRYABLE, EXIT_PREEMPTED: the trainer's own constants
MAX_RETRIES=${MAX_RETRIES:-3}
if [ $# -gt 0 ]; then
  CONFIG=$1
  shift
fi
CONFIG=${CONFIG:-configs/fashion_mnist.yaml}
read -r -a overrides <<< "${OVERRIDES:-}"
overrides+=("$@")
if [ -n "${DATA_URL:-}" ]; then overrides+=("data.url=${DATA_URL}"); fi
if [ -n "${MLFLOW_TRACKING_URI:-}" ]; then overrides+=("tracking.uri=${MLFLOW_TRACKING_URI}"); fi
read -r -a train_cmd <<< "${TRAIN_CMD:-disent train}"
# A task of a `disent sweep --backend slurm` job array: its point's overrides come from the sweep file.
if [ -n "${DISENT_SWEEP:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  if ! point=$("${PYTHON}" -m disent.sweep "${DISENT_SWEEP}" "${SLURM_ARRAY_TASK_ID}"); then
    echo "slurm/train.sh: cannot read point ${SLURM_ARRAY_TASK_ID} of the sweep ${DISENT_SWEEP}" >/dev/stderr
    exit "${EXIT_INPUT_ERROR}"
  fi
  mapfile -t point_overrides <<< "${point}"
  overrides+=("${point_overrides[@]}")
fi

echo "slurm/train.sh: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
  "${SLURM_NTASKS} task(s); ${train_cmd[*]} ${CONFIG} ${overrides[*]}"

# --kill-on-bad-exit: a task that dies ends the step (srun terminates the others), so no rank is
# left waiting in a collective for a peer that is gone.
srun_args=(--kill-on-bad-exit=1)
# Slurm >= 22.05: srun does not inherit sbatch's --cpus-per-task (each task would get one core).
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then srun_args+=("--cpus-per-task=${SLURM_CPUS_PER_TASK}"); fi
srun "${srun_args[@]}" "${PYTHON}" -m launcher -- "${train_cmd[@]}" "${CONFIG}" "${overrides[@]}"
rc=$?

retries_so_far() {
  scontrol show job -o "${SLURM_JOB_ID}" | grep -o 'Comment=disent-retries=[0-9]*' | grep -o '[0-9]*$' || echo 0
}

echo "slurm/train.sh: srun exited with ${rc}"
requeued=0
if [ "${rc}" -eq 0 ]; then
  :
elif [ "${rc}" -eq "${EXIT_INPUT_ERROR}" ]; then
  echo "slurm/train.sh: the input was refused (exit ${rc}); not requeueing: fix what the error names."
elif [ "${rc}" -eq "${EXIT_PREEMPTED}" ]; then
  requeued=1
  echo "slurm/train.sh: preempted; the checkpoint is written. Requeueing job ${SLURM_JOB_ID}."
  # Fails harmlessly when the scheduler is requeueing the job already (scontrol requeue, preemption).
  scontrol requeue "${SLURM_JOB_ID}" || echo "slurm/train.sh: requeue refused (already requeued?)"
else
  # 69 (a retryable failure), a crash or a signal death (128+N: a rank lost under NCCL may abort with
  # 134, or be killed with 137 or 143 when srun ends the step): retried within the budget.
  if [ "${rc}" -eq "${EXIT_RETRYABLE}" ]; then
    what="a retryable failure (exit ${rc})"
  elif [ "${rc}" -gt 128 ]; then
    what="a failure (exit ${rc}: a task died of signal $((rc - 128)) or was killed when the step ended)"
  else
    what="a failure (exit ${rc})"
  fi
  retries=$(retries_so_far)
  if [ "${retries}" -lt "${MAX_RETRIES}" ]; then
    retries=$((retries + 1))
    echo "slurm/train.sh: ${what}; requeueing job ${SLURM_JOB_ID}" \
      "(retry ${retries}/${MAX_RETRIES}); it resumes from its latest checkpoint."
    scontrol update JobId="${SLURM_JOB_ID}" Comment="disent-retries=${retries}"
    requeued=1
    scontrol requeue "${SLURM_JOB_ID}" || echo "slurm/train.sh: requeue refused (already requeued?)"
  else
    echo "slurm/train.sh: ${what} after ${MAX_RETRIES} retries; the job fails."
  fi
fi
# A sweep's point that has ended for good (not requeued): the last one summarises the sweep.
if [ -n "${DISENT_SWEEP:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [ "${requeued}" -eq 0 ]; then
  "${PYTHON}" -m disent.cli sweep --finish-if-complete "${DISENT_SWEEP}" --point "${SLURM_ARRAY_TASK_ID}" \
    || echo "slurm/train.sh: the sweep's summary failed; run disent sweep --summarize PARENT_RUN_ID"
fi
exit "${rc}"
