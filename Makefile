# The front door. `make demo` runs the main job end to end; `make test` runs the test suite.
# Both create .venv unless a virtualenv is already active, and install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip --disable-pip-version-check
STAMP := $(VENV)/.disent-installed
TEST_STAMP := $(VENV)/.disent-test-installed
# On CPU-only machines a CPU wheel of this version lies on local disk; elsewhere pip picks the
# build for the platform. A torch that is already installed is kept.
TORCH_SPEC ?= torch==2.13.0
# Debian packages: the demo's real data; the typefaces `disent prepare glyphs` renders; the tests
# also start a single-node Slurm cluster.
DEMO_APT_PACKAGES ?= dataset-fashion-mnist
FONT_APT_PACKAGES ?= fonts-urw-base35
TEST_APT_PACKAGES ?= $(DEMO_APT_PACKAGES) $(FONT_APT_PACKAGES) munge slurmctld slurmd slurm-client
PYTEST_ARGS ?=
# The image k8s/job.yaml runs, tagged with the package's version (read from the file: no import, no venv needed).
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' disent/__init__.py)
IMAGE ?= ghcr.io/disent/disent:$(VERSION)
IMAGE_BUILD_ARGS ?=
DOCKER ?= docker
# A Python of the image's version (3.12) to resolve docker/constraints.txt with; empty: found on PATH or in pyenv.
IMAGE_PYTHON ?=

# One PATH for every process: DeepSpeed's CPU ops are built with the ninja found first, and
# alternating between the system's and the venv's rebuilds them each time.
export PATH := $(VENV)/bin:$(PATH)

.PHONY: help setup system-deps demo test gpu-wheels image image-push constraints clean

help:
	@echo "make demo   prepare Fashion-MNIST, train on 2 CPU ranks, evaluate, log to ./mlflow.db"
	@echo "make test   run the test suite (what CI runs)"
	@echo "make setup  create $(VENV) and install disent (make test adds the test extras)"
	@echo "make gpu-wheels  .whl/: the wheels a lent GPU machine (no package registry) lacks, for benchmarks/gpu_check.sh"
	@echo "make image  build the Docker image k8s/job.yaml runs, as IMAGE=$(IMAGE) (IMAGE_BUILD_ARGS: --build-arg ...)"
	@echo "make image-push  build it and push IMAGE"
	@echo "make constraints  regenerate docker/constraints.txt, the image's pinned versions (needs PyPI and a Python 3.12)"

$(PYTHON):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) install -e ".[test]"
	touch $(TEST_STAMP)

setup: $(STAMP)

# Installs missing Debian packages when we are root (CI, fresh machines); otherwise says what is missing.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing Debian packages (install as root):$$missing"; fi; \
	fi

demo: setup
	@$(MAKE) --no-print-directory system-deps APT_PACKAGES="$(DEMO_APT_PACKAGES)"
	$(PYTHON) -m disent.demo

test: $(TEST_STAMP)
	@$(MAKE) --no-print-directory system-deps APT_PACKAGES="$(TEST_APT_PACKAGES)"
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# For the lent GPU machine, which reaches no registry: what it lacks, as CPython 3.12 wheels, in .whl/.
gpu-wheels: setup
	$(PYTHON) benchmarks/gpu_wheels.py --out .whl

image:
	$(DOCKER) build $(IMAGE_BUILD_ARGS) -t $(IMAGE) .

image-push: image
	$(DOCKER) push $(IMAGE)

# What `pip install .` resolves in the image after its torch line (PyPI, Python 3.12): docker/image_constraints.py.
constraints: setup
	$(PYTHON) docker/image_constraints.py $(if $(IMAGE_PYTHON),--python $(IMAGE_PYTHON))

clean:
	rm -rf runs data mlflow.db mlruns .pytest_cache
