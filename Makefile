# The two set-up commands of the README. Each creates the virtual environment on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

MLFLOW_VENV := .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed

.PHONY: serve test lint bench browser gpu-check mlflow-venv

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[service,dev]'
	touch $(STAMP)

# The MLflow server that the tracking tests start (tests/service/test_tracking.py). The full mlflow package pins
# pyarrow < 26, below the service's pin, so it gets a tool environment of its own; jobs log through mlflow-skinny,
# which the service extra installs into .venv.
$(MLFLOW_STAMP): constraints-mlflow.txt
	$(PY) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install -q -U pip
	$(MLFLOW_VENV)/bin/pip install -q -c constraints-mlflow.txt mlflow
	touch $(MLFLOW_STAMP)

mlflow-venv: $(MLFLOW_STAMP)

serve: $(STAMP)
	$(VENV)/bin/syncbn serve

# The dashboard tests drive Debian's Chromium (never a browser downloaded at run time). Installing it needs root and
# Debian's package registry; where either is missing the browser tests skip with a reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: the dashboard's browser tests will skip"; }

test: $(STAMP) $(MLFLOW_STAMP) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check syncbn service tests bench
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check syncbn service tests bench

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_syncbn.py

# The GPU check (issue 9): the CUDA tests, then bench/bench_gpu.py with its results table; under 6 minutes on one
# GPU. Without a CUDA GPU it says so and exits 0 (the tests would only skip).
gpu-check: $(STAMP)
	@if ! $(VENV)/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		echo "gpu-check needs a CUDA GPU (torch.cuda.is_available() is False here): nothing run"; exit 0; fi; \
	$(VENV)/bin/python -m pytest -q -m gpu tests/syncbn/test_cuda.py -rs --durations=5 || exit $$?; \
	$(VENV)/bin/python bench/bench_gpu.py --iters 20 --json bench/results/gpu.json
