# Two commands set everything up on a fresh Debian/Ubuntu machine with Python 3.11:
#   make serve   - install the runtime (no torch) into .venv and serve models/fashion-seresnet
#   make test    - install runtime + export + dev extras into .venv and run the whole suite
# Everything else (lint, bench, container check) builds on the same .venv.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
OPS_SOURCES := $(shell find ops -name '*.cc' -o -name '*.cu' -o -name '*.h' -o -name 'CMakeLists.txt' -o -name '*.cmake' 2>/dev/null)
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: serve test test-fast lint bench container-check clean gpu-setup gpu-check rolling-check

$(VENV)/.runtime: pyproject.toml $(OPS_SOURCES) scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh runtime
	touch $@

# One build of the op library per set-up: on a fresh clone `make test` installs the package
# with every extra at once (and so stamps the runtime too); after `make serve` set up a current
# runtime, only the extras' packages are added.
$(VENV)/.dev: pyproject.toml $(OPS_SOURCES) scripts/setup.sh
	@what=dev; [ -e $(VENV)/.runtime ] && [ -z "$$(find $^ -newer $(VENV)/.runtime)" ] \
	  && what=extras; \
	echo "PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh $$what"; \
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh $$what
	touch $(VENV)/.runtime $@

# Ctrl-C or SIGTERM stops the service (it drains first) without make reporting a failure.
serve: $(VENV)/.runtime
	bash scripts/foreground.sh $(PY) -m service --host $(HOST) --port $(PORT)

test: lint
	$(PY) -m pytest

# Everything but the end-to-end, slow and GPU tests (pytest markers, pyproject.toml): about
# 40 s on 2 shared cores, the check to run while editing.
test-fast: lint
	$(PY) -m pytest -m "not e2e and not slow and not gpu"

# The same checks as .pre-commit-config.yaml (pre-commit install runs them on each commit).
lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: $(VENV)/.dev
	$(PY) -m bench

# The Dockerfile and docker-compose.yml built and run for real by a private Docker engine from
# Debian's packages (root; no registry needed): scripts/container-e2e.sh --help.
container-check:
	bash scripts/container-e2e.sh

# Rolling restarts behind a real HAProxy (Debian's package, unpacked into the cache): three
# replicas, the scoring client at --retries 0, each replica SIGTERMed in turn, then one
# SIGKILLed; prints and writes the table (images, lost, duplicated). docs/scaling.md.
ROLLING_SUMMARY ?= rolling-check.json
rolling-check: $(VENV)/.dev
	SERESNET_ROLLING_CHECK=1 SERESNET_ROLLING_SUMMARY=$(ROLLING_SUMMARY) \
	  $(PY) -m pytest tests/test_rolling_restart.py -p no:randomly -q -s
	@cat $(ROLLING_SUMMARY)

# A machine with an NVIDIA GPU (driver installed) and a network: onnxruntime-gpu's CUDA and
# cuDNN wheels into .venv, at the onnxruntime-gpu version .venv already has, then the GPU
# check (bash scripts/gpu-check.sh --help; GPU_CHECK_ARGS="--full" for the whole matrix).
gpu-setup: $(VENV)/.dev
	version=$$($(PY) -c 'import onnxruntime; print(onnxruntime.__version__)'); \
	  $(PY) -m pip install "onnxruntime-gpu[cuda,cudnn]==$$version"
	$(PY) -c "import onnxruntime as o; o.preload_dlls(); print(o.get_available_providers())"
	bash scripts/gpu-check.sh --dry-run $(GPU_CHECK_ARGS)

GPU_CHECK_ARGS ?=
gpu-check: $(VENV)/.dev
	PYTHON=$(PY) bash scripts/gpu-check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build dist
