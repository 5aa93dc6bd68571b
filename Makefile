# meshllm developer entry points. Everything installs into .venv from this repository's own files.
#   make demo   start a local mesh (router + 2 replicas) on the built-in demo model, stream a reply, run a small batch
#   make test   install everything, then run proto freshness, lint, format, type checks and all tests
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.meshllm-installed
# redis-server (Debian's package) runs the shared-quota tests; installing it needs root
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
PYPROJECTS := pyproject.toml protos/pyproject.toml client/pyproject.toml router/pyproject.toml replica/pyproject.toml

.PHONY: setup demo test check lint typecheck protos bench bench-router bench-quota bench-client clean

setup: $(STAMP)

$(STAMP): $(PYPROJECTS) Makefile
	command -v redis-server >/dev/null || $(SUDO) sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25.1"
	$(PY) -m pip install --quiet -e ./protos -e ./client -e "./router[tracing]" -e "./replica[ctranslate2,tracing]" --group dev
	touch $(STAMP)

demo: setup
	$(PY) -m meshllm.router.demo

check: setup
	$(PY) protos/generate.py --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: check
	$(VENV)/bin/pytest -q

protos: setup
	$(PY) protos/generate.py

bench: setup
	$(PY) benchmarks/replica.py

bench-router: setup
	$(PY) benchmarks/router.py

bench-quota: setup
	$(PY) benchmarks/quota.py

bench-client: setup
	$(PY) benchmarks/client.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
