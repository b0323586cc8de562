# Every target but `install` uses the virtual environment at .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: install run test bench protos lint clean

install: $(BIN)/activate
$(BIN)/activate: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Without CUDA, install the local CPU build first so the range in pyproject does not fetch a CUDA wheel.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q $(TORCH_CPU); fi
	$(BIN)/pip install -q -e '.[server,dev]'
	touch $(BIN)/activate

run: install
	$(BIN)/rebalancer-server --host 127.0.0.1 --state-dir ./var

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/solver_bench.py

protos: install
	$(BIN)/python -m rebalancer_client.protogen

lint: install
	$(BIN)/ruff check server client tests benchmarks
	$(BIN)/ruff format --check server client tests benchmarks

clean:
	rm -rf $(VENV) var .pytest_cache
