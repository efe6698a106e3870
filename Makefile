# dbops: the two commands are `make demo` and `make test`. Both install what is missing.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV ?= .venv
BIN := $(VENV)/bin
LAB ?= .lab
PYTEST_ARGS ?=

.PHONY: help deps venv demo test test-unit bench lab-up lab-down clean

help:
	@echo "make demo   install what is missing, start a local lab, run dbops end to end"
	@echo "make test   install what is missing, run the whole test suite"
	@echo "make bench  benchmarks (JSON lines on stdout)"
	@echo "make lab-down  stop the demo lab"

# System packages (Debian 12). Idempotent: apt runs only when something is missing.
deps:
	@bash scripts/install-deps.sh

# The virtualenv uses the system Python so the postgres OS user can run dbops
# (archive_command / restore_command run as postgres).
$(BIN)/dbops: pyproject.toml constraints.txt $(shell find dbops -name "*.py") | deps
	@PYTHON=$(PYTHON) bash scripts/venv.sh
	@touch $(BIN)/dbops

venv: $(BIN)/dbops

demo: venv
	@LAB=$(LAB) BIN=$(BIN) bash scripts/demo.sh

test: venv
	$(BIN)/pytest -q -p no:cacheprovider --timeout=1200 $(PYTEST_ARGS) tests

test-unit: venv
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

bench: venv
	@BIN=$(BIN) bash scripts/bench.sh

lab-up: venv
	$(BIN)/dbops lab up --dir $(LAB)

lab-down:
	@test -x $(BIN)/dbops && $(BIN)/dbops lab down --dir $(LAB) || true

clean: lab-down
	rm -rf $(VENV) $(LAB) build *.egg-info
