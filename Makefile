# Two commands set up everything on a fresh machine:
#   make demo   install, then the main job: build the embedded real dataset into an atlas store, train scVI,
#               write the latent back into the store, leave an MLflow run (./mlruns) with its plots
#   make test   install, then lint, check the import contract and run the default test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
# On a GPU machine set TORCH_SPEC to the CUDA build you want (e.g. TORCH_SPEC="torch==2.13.0").
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-slow bench bench-data clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/atlasvi train --config configs/scvi.yaml
	$(BIN)/python -c "import anndata; print(anndata.read_zarr('outputs/cellbench.zarr'))"

# The suite on TEST_WORKERS processes (pytest-xdist), a test file per process at a time so that a file's trained
# fixtures are built once; TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

test: install
	$(BIN)/ruff check atlasvi tests benchmarks
	$(BIN)/ruff format --check atlasvi tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test-slow: install
	$(BIN)/python -m pytest -m slow

bench: install   # the 10K / 100K / 1M table, atlasvi vs scvi-tools and annbatch (1-2 hours on 2 cores); benchmarks/results
	$(BIN)/python benchmarks/perf_compare.py --config configs/bench.yaml --update-readme README.md

clean:
	rm -rf outputs mlruns .pytest_cache
