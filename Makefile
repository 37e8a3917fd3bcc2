# The two set-up commands of the README. Each creates the virtual environment on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/syncbn serve

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_syncbn.py
