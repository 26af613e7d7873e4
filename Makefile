# mdmt_tf — two commands on a fresh machine:
#   make run    set up (venv outside the checkout, keyed by requirements/lock.txt) and run the main job
#   make test   set up and run all tests
# Also: make setup (venv + bin/mdmt) | make venv (prints the venv's bin dir last) | make wrapper | make lock
# After `make setup`, bin/mdmt is this checkout's `mdmt` command (no PYTHONPATH to set; README, Command line).
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV_BIN = $(shell scripts/setup_venv.sh --print-path)/bin
PY = PYTHONPATH=$(CURDIR) $(VENV_BIN)/python
RUN_DIR ?= runs/pipeline
PYTEST_ARGS ?=

.PHONY: help setup wrapper venv run test lock

help:
	@echo "make run    set up + run the main job on the embedded synthetic data"
	@echo "make test   set up + run all tests (slow end-to-end tests included)"
	@echo "make setup  only set up the venv and write bin/mdmt, this checkout's mdmt command"
	@echo "make venv   same, then print the venv's bin directory"

setup:
	@scripts/setup_venv.sh >&2
	@scripts/write_wrapper.sh
	@echo "[setup] wrote bin/mdmt: run it as bin/mdmt, or put it on PATH: export PATH=\"$(CURDIR)/bin:\$$PATH\"" >&2

# Only (re)write bin/mdmt; it looks up the venv each time it runs and says if it is not set up.
wrapper:
	@scripts/write_wrapper.sh

venv: setup
	@echo $(VENV_BIN)

run: setup
	$(PY) -m mdmt_tf pipeline run --runner local --data synthetic --root $(RUN_DIR)

test: setup
	@PYTHONPATH=$(CURDIR) scripts/run_tests.sh $(VENV_BIN)/python $(PYTEST_ARGS)

# Re-resolve requirements/requirements.in into requirements/lock.txt (see DEVELOPERS.md).
lock:
	@scripts/relock.sh
