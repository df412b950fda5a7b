# mllm-microscope — every target builds the environment it needs first.
#   make figures   run the whole notebook suite on the embedded model (figures/ + runs/latest/)
#   make test      lint (ruff) and type-check (mypy, configured in pyproject.toml) the package, then run all tests
#   make seeds     train seeds 1, 2 of shapes-llava and shapes-omnifusion (runs/seeds/, about 2 hours on
#                  2 cores) and write every seed's geometry profile table to microscope/zoo/seed_profiles/
#                  (commit those)
#   make mutation  mutation score of the analysis modules on a seeded sample of mutants (docs/mutation-testing.md)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: env browser test figures seeds lint benchmark mutation clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

env: $(STAMP)

# tests/test_browser.py drives JupyterLab in headless Chromium (Debian's chromium and chromium-driver)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	    SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; }

test: env browser
	@echo "lint and type check first: a ruff or mypy error fails make test before any test runs"
	$(BIN)/ruff check microscope tests benchmarks
	$(BIN)/python -m mypy
	@echo "the tests, two processes at a time (one test file stays on one process), one thread each"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --ignore=tests/test_notebooks.py \
	    --ignore=tests/test_browser.py
	@echo "JupyterLab in headless Chromium, alone: with another test process beside it a dialog once took its click"
	$(BIN)/python -m pytest -q tests/test_browser.py
	@echo "the notebooks under papermill on every model type: two kernels at a time, one thread each"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup tests/test_notebooks.py
	@echo "geometry once more on other kernels: torch's baseline CPU code, MKL's compatible path, OpenBLAS's oldest x86-64 kernels, one thread"
	MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default OPENBLAS_CORETYPE=Prescott OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow" tests/test_geometry.py

figures: env
	$(BIN)/python -m microscope.suite --out runs/latest --figures figures

seeds: env
	$(BIN)/python -m microscope.zoo seeds --seeds 0 1 2 --work runs/seeds

lint: env
	$(BIN)/ruff check microscope tests benchmarks
	$(BIN)/python -m mypy

# mutation score of knockout, tracing, attribution, geometry, store, roles on a seeded sample of
# mutmut's mutants (docs/mutation-testing.md); results stay in mutants/, so a rerun resumes
mutation: env
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 19 $(BIN)/python benchmarks/mutation.py --per-module 10

clean:
	rm -rf runs .pytest_cache .ruff_cache .mypy_cache mutants
