# The two quickstart commands (README): each sets up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: env train test lint bench
env:
	bash scripts/setup_env.sh

train: env
	$(VENV)/bin/gift-train

test: env lint
	bash scripts/run_tests.sh

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: env
	$(PY) bench/logprob_memory.py
