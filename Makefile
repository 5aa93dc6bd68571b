# meshllm developer entry points. Everything installs into .venv from this repository's own files.
#   make demo   start a local mesh (router + 2 replicas) on the built-in demo model, stream a reply, run a small batch
#   make test   install everything, then run proto freshness, lint, format, type checks and all tests
#   make chart  lint the Helm chart and render it for every value set in helm/meshllm/ci
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.meshllm-installed
# checkov (the chart's security scan in tests/e2e/test_helm.py) pins packages of its own, so it gets a
# venv of its own; the tests find it at .venv-tools/bin/checkov
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.meshllm-tools-installed
# redis-server (Debian's package) runs the shared-quota tests; installing it needs root
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
PYPROJECTS := pyproject.toml protos/pyproject.toml server/pyproject.toml client/pyproject.toml router/pyproject.toml replica/pyproject.toml

.PHONY: setup demo test check lint typecheck protos chart bench bench-router bench-quota bench-client bench-admin bench-http clean

setup: $(STAMP) $(TOOLS_STAMP)

$(STAMP): $(PYPROJECTS) Makefile
	command -v redis-server >/dev/null || $(SUDO) sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25.1"
	$(PY) -m pip install --quiet -e ./protos -e ./server -e ./client -e "./router[tracing]" -e "./replica[ctranslate2,tracing]" --group dev
	touch $(STAMP)

$(TOOLS_STAMP): pyproject.toml Makefile
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --upgrade "pip>=25.1"
	$(TOOLS_VENV)/bin/python -m pip install --quiet --group helm-tools
	touch $(TOOLS_STAMP)

demo: setup
	$(PY) -m meshllm.client.demo

check: setup
	$(PY) protos/generate.py --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: check
	$(VENV)/bin/pytest -q

chart: setup
	$(PY) helm/chart.py lint helm/meshllm
	$(PY) helm/chart.py template meshllm helm/meshllm >/dev/null
	for values in helm/meshllm/ci/*-values.yaml; do \
		$(PY) helm/chart.py lint helm/meshllm -f $$values && \
		$(PY) helm/chart.py template meshllm helm/meshllm -f $$values >/dev/null || exit 1; \
	done

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

bench-admin: setup
	$(PY) benchmarks/admin.py

bench-http: setup
	$(PY) benchmarks/http_api.py

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .pytest_cache .mypy_cache .ruff_cache
