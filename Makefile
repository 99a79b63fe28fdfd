# The two commands: `make run` and `make test`. Both set everything up on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raylane-installed
DEV_STAMP := $(VENV)/.raylane-dev-installed
ARGS ?=

.PHONY: run test setup setup-dev setup-gpu clean

# `make run` installs what running needs; `make test` adds the dev extras (pytest, Ray Train, linters).
setup: $(STAMP)

setup-dev: $(DEV_STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing raylane and its dependencies (torch, ray) into $(VENV): about 3 minutes, once"
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	@touch $(STAMP)

$(DEV_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(DEV_STAMP)

# `make setup-gpu`: a fresh venv with the CUDA build of the pinned torch installed FIRST, then raylane on top
# (pip keeps torch 2.13.0+cuXXX: it satisfies the ==2.13.0 pin). Installing the CUDA wheel into a venv that
# already holds the CPU wheel does nothing ("Requirement already satisfied"), hence a venv of its own.
GPU_VENV ?= .venv-gpu
TORCH_CUDA_INDEX ?= https://download.pytorch.org/whl/cu128
TORCH_PIN := $(shell sed -n 's/.*"\(torch==[^"]*\)".*/\1/p' pyproject.toml | head -1)

setup-gpu:
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --index-url $(TORCH_CUDA_INDEX) $(TORCH_PIN)
	$(GPU_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e .
	$(GPU_VENV)/bin/python -c "import torch; assert torch.version.cuda, 'got the CPU wheel'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())"
	@touch $(GPU_VENV)/.raylane-installed
	@echo "now: make run VENV=$(GPU_VENV) ARGS=cluster=gpu"

run: $(STAMP)
	$(PY) -m raylane.train $(ARGS)

# The tests compile the comm kernels into a cache inside the clone: a fresh clone starts cold, as CI does,
# so a kernel that compiles only from an old cache entry in /tmp cannot pass here and fail there.
test: $(DEV_STAMP)
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.cache/inductor $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs outputs .pytest_cache .cache
