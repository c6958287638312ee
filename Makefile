# make demo : the main job (CPU by default, the GPU when there is one)
# make test : ruff check, then the test suite
# Both create .venv and install what they need on a clean machine.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# the CPU build of PyTorch that lies on these machines' disk; override for your platform
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bench,hf

.PHONY: demo test gpu-test venv bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m featattn demo

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# make gpu-test : on a machine with a CUDA GPU, after every kernel change.  The cuda-marked
# tests and the kernel test modules that move to the GPU when there is one (marked on_device
# by tests/conftest.py: they run in bf16 there), with autotuning on, as users get it
# (FEATATTN_NO_AUTOTUNE would hide a bad config), in parallel when pytest-xdist is
# installed, then the quick demo.  Uses .venv when it exists,
# else the machine's python3 (a GPU box with torch and triton already installed).
GPU_PY ?= $(shell test -x $(PY) && echo $(PY) || echo $(PYTHON))
GPU_JOBS ?= 4
gpu-test:
	$(GPU_PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make gpu-test needs a CUDA GPU')"
	PYTHONPATH=$(CURDIR) $(GPU_PY) -m pytest -q -rf --durations=15 -m "cuda or on_device" $$($(GPU_PY) -c "import xdist" 2>/dev/null && echo "-n $(GPU_JOBS)") tests
	PYTHONPATH=$(CURDIR) $(GPU_PY) -m featattn demo --quick

bench: $(VENV)/.installed
	$(PY) -m featattn bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
