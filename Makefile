# The two set-up commands of the README. Each creates the virtual environment on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench browser gpu-check images test-containers

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

# Container images (deploy/README.md): the CPU image with docker, or with podman and the flags this machine needs
# (deploy/podman/build-flags.sh: --format docker, the local base image, the pip configuration bind-mounted).
# Machines without a registry: run deploy/podman/setup-podman.sh once first (as root).
ENGINE ?= $(shell deploy/podman/engine.sh 2>/dev/null)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_CPU ?= syncbn:$(VERSION)-cpu

images:
	@test -n "$(ENGINE)" || { deploy/podman/engine.sh; exit 1; }
	$(ENGINE) build $$(deploy/podman/build-flags.sh $(ENGINE)) -f deploy/docker/Dockerfile.cpu -t $(IMAGE_CPU) .
	@# Dockerfile.cuda's base cannot be pulled everywhere: its wheel stage is checked on the CPU image instead
	@# (everything but the CUDA layer), and the tag of that check removed again.
	$(ENGINE) build $$(deploy/podman/build-flags.sh $(ENGINE)) --target build --build-arg CUDA_IMAGE=$(IMAGE_CPU) \
		-f deploy/docker/Dockerfile.cuda -t syncbn-cuda-wheel-check:$(VERSION) .
	$(ENGINE) run --rm syncbn-cuda-wheel-check:$(VERSION) ls /wheels/syncbn-$(VERSION)-py3-none-any.whl
	$(ENGINE) rmi syncbn-cuda-wheel-check:$(VERSION) >/dev/null

# The container test (issue 19): podman set up where it can be (root and apt), the CPU image built, then a Ray head,
# two Ray workers and the service in containers run a STRICT_SPREAD job through a worker's loss. It skips with the
# reason where no container engine is usable.
test-containers: $(STAMP)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$$(deploy/podman/engine.sh 2>/dev/null)" != docker ]; then \
		deploy/podman/setup-podman.sh || echo "podman set-up failed: the container test will skip"; fi
	@engine="$$(deploy/podman/engine.sh)" && $(MAKE) --no-print-directory images ENGINE="$$engine" || \
		echo "no container engine usable here: the container test will skip"
	SYNCBN_CONTAINER_IMAGE=$(IMAGE_CPU) $(VENV)/bin/python -m pytest -q -s -rs -p no:cacheprovider --durations=8 tests/deploy/containers
