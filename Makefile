# The two set-up commands of the README. Each creates the virtual environment on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test test-vision lint bench browser gpu-check

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[service,dev]'
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

# torchvision and timm for real (issue 18): a second environment with torch 2.14.1 (the CUDA build, which runs on the
# CPU; beside the pinned CPU torch 2.13.0 torchvision cannot import) plus torchvision and timm. Its constraints are
# constraints.txt without torch's pin, and constraints-vision.txt's pins over it. It runs the tests marked `vision`
# (they must not skip here: SYNCBN_REQUIRE_VISION) and the model registry and model listing tests.
VISION_VENV := .venv-vision
VISION_STAMP := $(VISION_VENV)/.installed

$(VISION_STAMP): pyproject.toml constraints.txt constraints-vision.txt
	$(PY) -m venv $(VISION_VENV)
	$(VISION_VENV)/bin/pip install -q -U pip
	grep -v '^torch==' constraints.txt > $(VISION_VENV)/constraints.txt
	$(VISION_VENV)/bin/pip install -q -c $(VISION_VENV)/constraints.txt -c constraints-vision.txt -e '.[service,dev,vision]'
	touch $(VISION_STAMP)

test-vision: $(VISION_STAMP)
	SYNCBN_REQUIRE_VISION=1 $(VISION_VENV)/bin/python -m pytest -q -m vision
	$(VISION_VENV)/bin/python -m pytest -q -m "not vision" tests/service/test_model_registry.py tests/service/test_api_models.py
