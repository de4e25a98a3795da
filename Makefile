# Two commands set everything up on a fresh machine:
#   make demo   builds a tiny random-weight Llama, packs it as int4 and generates from a prompt
#   make test   runs the CPU test suite (GPU tests skip without CUDA)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tiermem demo

test: $(STAMP)
	$(PY) -m ruff check tiermem engine storage kernels tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check tiermem engine storage kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
