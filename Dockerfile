# The image k8s/job.yaml runs: disent and the launcher on CUDA. Build from the repository root:
#   make image        (docker build -t $IMAGE .: ghcr.io/disent/disent:<disent.__version__> unless IMAGE= is given)
#   make image-push   (builds, then docker push $IMAGE)
# A CPU-only image (for trying the Job on a cluster without GPUs); Python 3.12 like the CUDA base's, the Python
# docker/constraints.txt was resolved for:
#   make image IMAGE=disent:cpu IMAGE_BUILD_ARGS="--build-arg BASE=python:3.12-slim-bookworm \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
#
# A devel base (nvcc, headers) because DeepSpeed compiles its fused optimizer ops just in time.
ARG BASE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${BASE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# One torch release inside pyproject's range, the one the tests run (tests/unit/test_image.py checks both);
# docker/constraints.txt was resolved with it: change them together (make constraints).
ARG TORCH_SPEC="torch==2.13.0"
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ninja-build \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# torch first, from the index that matches the base (CUDA or CPU): the slowest layer, cached longest. Without
# -c: the constraints leave torch and its dependencies to this index by construction, and copying them in before
# this layer would rebuild it whenever they are regenerated.
RUN python3 -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY disent ./disent
COPY launcher ./launcher
# Every other version pinned: resolved from PyPI for this Python by `make constraints`.
COPY docker/constraints.txt ./docker/
RUN pip install -c docker/constraints.txt . && python -c "import disent, launcher, deepspeed, mlflow, webdataset"
# Configs last: k8s/job.yaml's ConfigMap extends /app/configs/*.yaml.
COPY configs ./configs

# The Job gives the command (python -m launcher -- disent train /etc/disent/train.yaml).
CMD ["python", "-m", "launcher", "--help"]
