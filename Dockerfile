# The image k8s/job.yaml runs: disent and the launcher on CUDA. Build from the repository root:
#   docker build -t ghcr.io/disent/disent:0.1.0 . && docker push ghcr.io/disent/disent:0.1.0
# A CPU-only image (for trying the Job on a cluster without GPUs):
#   docker build --build-arg BASE=python:3.11-slim-bookworm \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t disent:cpu .
#
# A devel base (nvcc, headers) because DeepSpeed compiles its fused optimizer ops just in time.
ARG BASE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${BASE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC="torch>=2.3,<3"
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

# torch first, from the index that matches the base (CUDA or CPU): the slowest layer, cached longest.
RUN python3 -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY disent ./disent
COPY launcher ./launcher
RUN pip install . && python -c "import disent, launcher, deepspeed, mlflow, webdataset"
# Configs last: k8s/job.yaml's ConfigMap extends /app/configs/*.yaml.
COPY configs ./configs

# The Job gives the command (python -m launcher -- disent train /etc/disent/train.yaml).
CMD ["python", "-m", "launcher", "--help"]
