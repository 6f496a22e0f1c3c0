# Two commands do all set-up: `make demo` (main job) and `make test` (test suite).
# The venv is keyed on the lock file's hash: a changed lock rebuilds it, an unchanged one is reused.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
LOCK := requirements/cpu.lock
STAMP := $(VENV)/.lock-$(shell sha256sum $(LOCK) | cut -c1-16)
# The CPU torch wheel is found in /opt/wheels on this kind of machine; elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (see README).
PIP_FLAGS := --no-deps --disable-pip-version-check -q $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast clean-venv

venv: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	@if [ -d $(VENV) ] && [ ! -f $(STAMP) ]; then echo "lock changed: rebuilding $(VENV)"; rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -r $(LOCK)
	$(BIN)/pip install $(PIP_FLAGS) --no-build-isolation -e .
	@$(BIN)/python -c "import importlib.metadata as m, sys; bad=[d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].lower().startswith('nvidia')]; sys.exit('CUDA packages in a CPU venv: %s' % bad if bad else 0)"
	@touch $(STAMP)

demo: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/muse demo

test: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
