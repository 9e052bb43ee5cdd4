# Two entry points do all set-up on a fresh machine:
#   make reproduce   regenerate every table and figure (PROFILE=quick|gpu|paper, DATA_ROOT=..., NPROC=...)
#   make test        run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= quick
DATA_ROOT ?=
NPROC ?= 1

.PHONY: venv test reproduce bench clean-results

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,notebooks]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest

reproduce: venv
	$(PY) -m mfcore reproduce --profile $(PROFILE) --data-root "$(DATA_ROOT)" --nproc-per-node $(NPROC)

bench: venv
	$(PY) -m mfcore bench
