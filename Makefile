# mllm-microscope — every target builds the environment it needs first.
#   make figures   run the whole notebook suite on the embedded model (figures/ + runs/latest/)
#   make test      run all tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: env test figures lint benchmark clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

env: $(STAMP)

test: env
	$(BIN)/python -m pytest -q

figures: env
	$(BIN)/python -m microscope.suite --out runs/latest --figures figures

lint: env
	$(BIN)/ruff check microscope tests benchmarks

clean:
	rm -rf runs .pytest_cache .ruff_cache
