# The two commands: `make run` and `make test`. Both set everything up on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raylane-installed
DEV_STAMP := $(VENV)/.raylane-dev-installed
ARGS ?=

.PHONY: run test setup setup-dev clean

# `make run` installs what running needs; `make test` adds the dev extras (pytest, Ray Train, linters).
setup: $(STAMP)

setup-dev: $(DEV_STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	@touch $(STAMP)

$(DEV_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(DEV_STAMP)

run: $(STAMP)
	$(PY) -m raylane.train $(ARGS)

# The tests compile the comm kernels into a cache inside the clone: a fresh clone starts cold, as CI does,
# so a kernel that compiles only from an old cache entry in /tmp cannot pass here and fail there.
test: $(DEV_STAMP)
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.cache/inductor $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs outputs .pytest_cache .cache
