# The two set-up commands of the README. Each creates the virtual environment on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

MLFLOW_VENV := .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed

.PHONY: serve test test-slow test-vision lint bench browser gpu-check mlflow-venv images test-containers

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
	$(VENV)/bin/python -m pytest -q -m "not slow"

# The long end-to-end runs (marker `slow`: several real servers, clusters or trainings each; README "Tests"), which
# `.ci/run` runs after `make test` so that the suite a developer runs stays well under 30 minutes.
test-slow: $(STAMP) $(MLFLOW_STAMP) browser
	$(VENV)/bin/python -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check syncbn service tests bench

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_syncbn.py

# The GPU check (issues 9, 16): the CUDA tests, then bench/bench_gpu.py (its correctness and speed verdicts), on
# the machine as it is: no virtual environment, no install. It needs torch, pytest, pytest-timeout and numpy in
# GPU_PY (the library and its CUDA tests import nothing else). Logs and JSON results go to GPU_OUT. Without a GPU it
# says so and exits 0; it fails (non-zero) when nvidia-smi lists a GPU that torch cannot see, when a test fails,
# or when a bench verdict is FAIL.
GPU_PY ?= python3
GPU_OUT ?= bench/results
gpu-check:
	@mkdir -p $(GPU_OUT)
	@PYTHONPATH=. $(GPU_PY) -c "import torch, pytest, pytest_timeout" || { \
		echo "gpu-check: $(GPU_PY) needs torch, pytest and pytest-timeout"; exit 1; }
	@if ! PYTHONPATH=. $(GPU_PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then \
			echo "gpu-check: nvidia-smi lists a GPU but torch.cuda.is_available() is False in $(GPU_PY)" \
				"(torch $$(PYTHONPATH=. $(GPU_PY) -c 'import torch; print(torch.__version__, torch.version.cuda)'))"; \
			exit 1; fi; \
		echo "gpu-check needs a CUDA GPU (torch.cuda.is_available() is False and nvidia-smi lists none): nothing run"; \
		exit 0; fi; \
	PYTHONPATH=. $(GPU_PY) -c "import torch; print('gpu-check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"; \
	PYTHONPATH=. $(GPU_PY) -m pytest -q -m gpu tests/syncbn/test_cuda.py -rs --timeout=120 --durations=5 \
		-p no:cacheprovider --junitxml=$(GPU_OUT)/gpu-tests.xml > $(GPU_OUT)/gpu-tests.log 2>&1; rc=$$?; \
	cat $(GPU_OUT)/gpu-tests.log; \
	if [ $$rc -ne 0 ]; then echo "gpu-check: CUDA tests failed (exit $$rc; log in $(GPU_OUT)/gpu-tests.log)"; exit 1; fi; \
	PYTHONPATH=. $(GPU_PY) bench/bench_gpu.py --iters 20 --deadline 200 --json $(GPU_OUT)/gpu.json \
		> $(GPU_OUT)/bench_gpu.log 2>&1; rc=$$?; \
	cat $(GPU_OUT)/bench_gpu.log; \
	if [ $$rc -ne 0 ]; then echo "gpu-check: bench_gpu verdicts failed (exit $$rc)"; exit 1; fi; \
	echo "gpu-check: passed (logs and results in $(GPU_OUT))"

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
