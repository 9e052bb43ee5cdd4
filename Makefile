# Two entry points do all set-up on a fresh machine:
#   make reproduce   regenerate every table and figure (PROFILE=quick|gpu|paper, DEVICE=auto|cpu|cuda,
#                    DATA_ROOT=..., NPROC=...)
#   make test        run the test suite
#   make lab         open the notebooks in JupyterLab (from .venv)
#   make test-browser notebook 08 in JupyterLab under headless Chromium (needs chromium, chromium-driver)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= quick
DEVICE ?= auto
DATA_ROOT ?=
NPROC ?= 1

.PHONY: venv test test-browser reproduce lab bench clean-results

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,notebooks]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
# git filter: outputs and execution counts are stripped when a notebook is staged, so a notebook run and
# saved in JupyterLab does not dirty git (cell ids are kept: the committed notebooks are already clean)
	if git rev-parse --git-dir >/dev/null 2>&1; then \
	  $(VENV)/bin/nbstripout --install --attributes .gitattributes && \
	  git config filter.nbstripout.clean '"$(abspath $(PY))" -m nbstripout --keep-id' && \
	  { git update-index -q --refresh >/dev/null || true; }; fi
# (the refresh records the notebooks as clean under the new filter; without it every `git status`, which runs
#  with each checkpoint's git commit, would filter all nine notebooks again)
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest

reproduce: venv
	$(PY) -m mfcore reproduce --profile $(PROFILE) --device $(DEVICE) --data-root "$(DATA_ROOT)" --nproc-per-node $(NPROC)

# notebook 08 in a real JupyterLab under headless Chromium (apt-get install chromium chromium-driver); .ci/run runs it
test-browser: venv
	$(PY) -m pip install --quiet -e ".[browser]"
	$(PY) tests/browser_check.py

lab: venv
	cd notebooks && ../$(VENV)/bin/jupyter lab

bench: venv
	$(PY) -m mfcore bench
