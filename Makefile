# flowpolicy: `make demo` and `make test` do all the set-up (virtual environment included).
#
# The pinned CPU build of torch is installed first, because a bare `torch` requirement makes pip
# pick a multi-GB CUDA build. Ask for another build with `make TORCH="torch==2.13.0+cu126" test`,
# or keep whatever torch pip resolves with `make TORCH= test`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(if $(TORCH),$(BIN)/python -m pip install --quiet "$(TORCH)")
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python examples/train_lake.py --out runs/demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/bench_flows.py
	$(BIN)/python benchmarks/bench_density.py
	$(BIN)/python benchmarks/bench_sac.py
	$(BIN)/python benchmarks/bench_lake.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
