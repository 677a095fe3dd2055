# kubeforge — every target sets up what it needs, so any of them works first in a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.kubeforge-installed
PYTEST_ARGS ?=
# Two workers, a test file each at a time; each worker that needs a cluster starts its own dev cluster (they
# run side by side in separate network slots), so the long e2e modules overlap.
PYTEST_PARALLEL ?= -n 2 --dist loadfile
# pip's wheel cache (torch's CUDA build is several GB) kept with the project's other caches.
export PIP_CACHE_DIR ?= $(HOME)/.cache/kubeforge/pip

.PHONY: setup cluster-binaries generate verify lint test test-unit test-integration demo bench clean

setup: $(STAMP)

# torch is pinned to PyPI's build (the CUDA one: several GB, runs on CPU; pip's wheel cache keeps it after the
# first install); constraints.txt pins the rest so installs are reproducible and the resolver never backtracks.
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need python3 >= 3.11 (apt-get install python3 python3-venv)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt 'torch==2.13.0'
	$(PIP) install -q -c constraints.txt -e '.[train,dev]'
	@touch $@

# Kubernetes v1.34.4 control plane + etcd 3.6 for the dev cluster, built from the Go module proxy (cached
# under ~/.cache/kubeforge; honours KUBEBUILDER_ASSETS). Skipped when KUBECONFIG points at a cluster.
cluster-binaries:
	@if [[ -z "$$KUBECONFIG" ]]; then bash scripts/build-k8s.sh >/dev/null; fi

generate: setup
	$(PY) -m kubeforge.api.crdgen

verify: setup
	$(PY) -m kubeforge.api.crdgen --check
	$(VENV)/bin/ruff check operator tests bench
	$(PY) -m kubeforge.helmcheck

lint: verify

test-unit: setup
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

test-integration: setup cluster-binaries
	$(PY) -m pytest tests/integration tests/e2e -q $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The README's test command: unit, integration (real API server + etcd + S3 server) and end-to-end tests.
test: setup cluster-binaries
	$(PY) -m pytest tests -q $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The README's main job: a dev cluster (unless KUBECONFIG is set) with the operator, and the whole life of a
# tiny model on CPU from examples/lifecycle.yaml: pre-train -> extend context -> RL -> serve, one apply.
demo: setup cluster-binaries
	$(PY) -m kubeforge.demo

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
