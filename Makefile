# The two set-up commands of the README. Each creates the virtual environment on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench browser

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/syncbn serve

# The dashboard tests drive Debian's Chromium (never a browser downloaded at run time). Installing it needs root and
# Debian's package registry; where either is missing the browser tests skip with a reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: the dashboard's browser tests will skip"; }

test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_syncbn.py
