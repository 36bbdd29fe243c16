# Two commands a newcomer needs: `make generate PROMPT="..."` and `make test`.
# Each creates the virtual environment and installs what it needs on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build to install. The default is the CPU build on this project's machines;
# GPU users pass their CUDA build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= A beautiful landscape with mountains
OUTPUT ?= outputs/
MODEL ?=
SYSTEM_PACKAGES ?= chromium redis-server
# Test processes: one per CPU, each pinned to its own core (tests/conftest.py); a test file stays in one process.
TEST_WORKERS ?= auto

.PHONY: generate test lint install system-deps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	# spandrel (upscaler models) without its torchvision requirement: PyPI's torchvision is a CUDA build that
	# fails to import beside the CPU torch (pyproject.toml, the `upscalers` extra).
	$(PY) -m pip install -q --no-deps 'spandrel>=0.4.1'
	touch $@

install: $(VENV)/.installed

## Render PROMPT with SDXL base + refiner (MODEL=tiny for the offline tiny pair: the same 50 + 30 steps at
## 256x256, a smoke run of seconds that proves the install).
generate: install
	$(VENV)/bin/refinery generate "$(PROMPT)" -o "$(OUTPUT)" $(if $(MODEL),--base $(MODEL) --refiner $(MODEL)) \
		$(if $(filter tiny,$(MODEL)),--size 256x256)

## Debian packages the tests drive for real (browser, Redis); installed only when missing.
system-deps:
	@bash scripts/system-deps.sh $(SYSTEM_PACKAGES)

## The whole suite: lint, types, tests. CI runs exactly this (.ci/run).
test: install system-deps lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-output
