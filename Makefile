PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup build demo test test-fast bench bench-gpu lint clean

# jax's accelerator extra, e.g. `make setup JAX_EXTRA=cuda12` on an NVIDIA GPU machine: installs
# jax[cuda12] at the pinned jax version (its CUDA plugin and CUDA libraries). On an existing venv
# remove $(STAMP) first so that setup runs again.
JAX_EXTRA ?=

# Create the virtual environment, install the pinned stack and the test tools (re-runs when either
# requirements file changes) and build the CPU top-k selection kernel.
setup: $(STAMP) build

$(STAMP): requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt -r requirements-dev.txt \
	  $(if $(JAX_EXTRA),'jax[$(JAX_EXTRA)]')
	touch $(STAMP)

# Exact top-k selection for CPU (topk/select.py loads it; falls back to lax.top_k without it),
# compiled by setup.py (which holds the compiler flags) into topk/, where `pip install .` puts it.
SELECT_LIB := topk/libtopk_select.so

build: $(SELECT_LIB)

$(SELECT_LIB): csrc/topk_select.cc setup.py $(STAMP)
	$(PYTHON) setup.py build_ext --inplace

demo: setup
	$(PYTHON) demo.py

test: setup
	$(PYTHON) -m pytest -n 2 tests

# The loop to run while editing: everything but the subprocess and end-to-end tests (marked slow).
test-fast: setup
	$(PYTHON) -m pytest -n 2 -m "not slow" tests

# Attention memory/speed versus length, then the selection speed targets (with PyTorch's fused
# attention as a reference when torch is installed in the venv: pip install torch==2.13.0).
bench: setup
	$(PYTHON) -m benchmarks.attention
	$(PYTHON) -m benchmarks.select

# On one GPU: the fused kernels, attention forms and full-size training steps, about 9 minutes
# (README "GPU and TPU").
bench-gpu: setup
	PYTHON=$(PYTHON) bash benchmarks/gpu.sh

lint: setup
	$(PYTHON) -m ruff check .

clean:
	rm -rf $(VENV) build $(SELECT_LIB) .cache
