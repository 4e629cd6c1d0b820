PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean

# Create the virtual environment and install the pinned stack (re-runs when requirements change).
setup: $(STAMP)

$(STAMP): requirements.txt
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: setup
	$(PYTHON) -m benchmarks.attention --lengths 256,512,1024,2048 --repeats 3

test: setup
	$(PYTHON) -m pytest -n 2 tests

bench: setup
	$(PYTHON) -m benchmarks.attention

lint: setup
	$(PYTHON) -m ruff check .

clean:
	rm -rf $(VENV) build
