# make demo : the main job (CPU by default, the GPU when there is one)
# make test : the test suite
# Both create .venv and install what they need on a clean machine.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# the CPU build of PyTorch that lies on these machines' disk; override for your platform
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bench,hf

.PHONY: demo test venv bench clean

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
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m featattn bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
