# imfast — the two commands: `make run` (an embedded node) and `make test` (everything).
# Both work on a fresh machine: they create .venv, install, build the Cython core.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PORT   ?= 8080
DATA_DIR ?= ./data
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: run install build test test-fast test-pure test-integration services bench lint clean help

help:
	@echo "make run    - start an embedded node on :$(PORT) (data in $(DATA_DIR))"
	@echo "make test   - install everything (test services too) and run every test"
	@echo "make bench  - Cython vs pure-Python, fan-out and memory (10K) benchmarks;"
	@echo "              make bench BENCH_ARGS=--full adds memory at 100K (6 workers)"
	@echo "make lint   - ruff + mypy --strict"

$(VENV)/.installed: pyproject.toml setup.py requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel Cython
	$(PIP) install -q -e '.[distributed]' -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

# Builds imfast/_core/*.pyx in place; every module also has a pure-Python twin.
build: install
	$(PY) setup.py -q build_ext --inplace

run: build
	$(VENV)/bin/imfast serve --port $(PORT) --data-dir $(DATA_DIR) --log-format text

# Real Redis / MariaDB / etcd / Kafka-compatible servers for the integration tests
# (installed with apt-get/pip when missing; the tests start their own instances).
services: install
	PYTHON=$(PY) bash scripts/install-test-services.sh
	PYTHON=$(PY) bash scripts/install-browser-test-deps.sh

# The whole suite with the Cython core, then the core-dependent suites again on the
# pure-Python twins (IMFAST_NO_EXTENSIONS=1).
test: build services lint
	$(PY) -m pytest -q $(PYTEST_ARGS)
	IMFAST_NO_EXTENSIONS=1 $(PY) -m pytest -q tests/unit tests/contract tests/e2e $(PYTEST_ARGS)

test-fast: build
	$(PY) -m pytest -q tests/unit tests/contract tests/e2e $(PYTEST_ARGS)

bench: build
	$(PY) bench/run.py $(BENCH_ARGS)

lint: install
	$(PY) -m ruff check imfast tests bench
	$(PY) -m mypy imfast

clean:
	rm -rf build $(VENV) *.egg-info imfast/_core/*.so imfast/_core/*.c
