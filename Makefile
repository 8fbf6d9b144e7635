# One entry point for setup, checks and the demo. Every target is idempotent: run twice,
# the second run does (almost) nothing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA ?= data/demo
DEMO_RUN ?= runs/demo
MODELS ?= models
GRPC_PORT ?= 50051
HTTP_PORT ?= 8000
METRICS_PORT ?= 9090
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup proto test test-fast lint demo-data demo-model serve clean readme-check image-test lock gpu-bundle gpu-rehearsal

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# The locked versions (requirements/dev.lock, from `make lock`), then the project itself
# without letting pip resolve anything else.
$(STAMP): pyproject.toml requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(STAMP) proto  ## venv in .venv with the locked project, training and dev dependencies; generated protobuf code

proto: $(STAMP)  ## generate the gRPC Python code from proto/ (never committed)
	@if [ -d proto ] && ls proto/classifier/v1/*.proto >/dev/null 2>&1; then \
		$(PY) -m service.protogen; \
	fi

# In parallel (pytest-xdist): most integration time is spent waiting on servers and
# subprocesses, so a worker more than there are cores keeps them busy; --dist loadfile
# keeps each module's servers and trained models in one process, and the fixtures several
# modules share are built once per run (tests/fixtures.py). The 20 slowest tests are
# listed at the end, so a suite that grows shows where.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(3, len(os.sched_getaffinity(0)) + 1))")
test: setup  ## the test suite
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=20 $(PYTEST_ARGS)

# Only tests/unit: every test under tests/integration starts something, and collecting
# that folder alone costs seconds of imports.
test-fast: setup  ## the tests that start nothing and train nothing (seconds)
	$(PY) -m pytest -q -m "not slow and not integration" tests/unit $(PYTEST_ARGS)

lint: setup  ## ruff (lint + format check), mypy, the import layers (import-linter), hadolint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy service training bench tests .ci/readme_commands.py .ci/demo_model_bar.py
	$(VENV)/bin/lint-imports pyproject.toml
	@if [ -f Dockerfile ]; then $(VENV)/bin/hadolint Dockerfile; fi

demo-data: setup  ## build the offline demo dataset (digits on photos) in data/demo
	$(PY) -m training -q demo-data --root $(DEMO_DATA)

demo-model: demo-data  ## train the demo model (about 5 minutes on 2 cores) and export it to models/demo/
	@if [ -f $(DEMO_RUN)/best.pt ]; then echo "demo model already trained: $(DEMO_RUN)/best.pt"; \
	else $(PY) -m training -q train --config training/configs/demo.yaml --data $(DEMO_DATA) --output $(DEMO_RUN); fi
	@if ls $(MODELS)/demo/*/model.onnx >/dev/null 2>&1; then echo "demo model already exported: $$(ls $(MODELS)/demo/*/model.onnx | tail -1)"; \
	else $(PY) -m training -q export $(DEMO_RUN)/best.pt --repository $(MODELS) --name demo --data $(DEMO_DATA); fi

serve: setup  ## serve models/: gRPC on :50051, HTTP (OIP REST, the page) on :8000, metrics on :9090; builds the demo model if there is none
	@if ! ls $(MODELS)/*/*/model.onnx >/dev/null 2>&1; then $(MAKE) --no-print-directory demo-model; fi
	$(PY) -m service --model-repository $(MODELS) --port $(GRPC_PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT) --log-format text

clean:  ## remove generated code, caches (keeps .venv, data, runs, models)
	rm -rf service/proto_gen .pytest_cache .mypy_cache .ruff_cache

readme-check: setup  ## run every README command as written (starts make serve if nothing serves)
	$(PY) .ci/readme_commands.py

# The cpu image as docker and compose run it, the Kubernetes pod from deploy/k8s as podman
# kube plays it, and the ray image as a head and a worker running one scoring job.
image-test: setup demo-model  ## build the Dockerfile's cpu and ray targets with buildah; run them, and the k8s pod, with podman
	bash .ci/image-test.sh
	bash .ci/pod-test.sh
	bash .ci/ray-image-test.sh

# The device run's bundle (README, "On a GPU"): cp312 wheels, onnxruntime-gpu slimmed to one
# GPU architecture, the generated code and the demo checkpoint, in parts of <= 56 MiB.
gpu-bundle: setup demo-model  ## write .gpu-bundle/: what a bare CUDA 13 machine needs for the device run, in parts
	$(PY) -m bench.device.bundle --out .gpu-bundle --wheel-cache .cache/gpu-wheels

# The device run rehearsed here (bench/device/rehearse.sh): the bundle into a clean Python
# 3.12 holding only the GPU image's packages, then the run's CPU parts on this tree.
PYTHON312 ?= python3.12
gpu-rehearsal: gpu-bundle  ## prove the bundle and the device run here, before a GPU loan (PYTHON312=...)
	PYTHON312=$(PYTHON312) bash bench/device/rehearse.sh

LOCK = $(VENV)/bin/uv pip compile pyproject.toml --quiet --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 -c requirements/constraints.txt
lock: setup  ## refresh the lock files in requirements/ from pyproject.toml (then make setup installs them)
	$(LOCK) -o requirements/serve.lock
	$(LOCK) --extra scoring -o requirements/scoring.lock
	$(LOCK) --extra ray -o requirements/ray.lock
	$(LOCK) --extra train --extra dev --extra ray -o requirements/dev.lock
