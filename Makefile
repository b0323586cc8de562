# Every target but `install` uses the virtual environment at .venv (created by `make install`).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Without CUDA, the local CPU build of torch goes in first so the `torch>=2.4` range installs nothing more.
TORCH_CPU := torch==2.13.0

.PHONY: install run test bench bench-quick protos lint clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q $(TORCH_CPU); fi
	$(BIN)/pip install -q -e '.[server,dev]'
	touch $@

run: install
	$(BIN)/rebalancer-server --host 127.0.0.1 --state-dir ./var

test: install
	$(BIN)/python -m pytest -q

# Every benchmark, ratios against the `deepseek` policy measured in the same run; writes benchmarks/RESULTS.md.
bench: install
	$(BIN)/python benchmarks/report.py

bench-quick: install
	$(BIN)/python benchmarks/report.py --quick

protos: install
	$(BIN)/python -m rebalancer_wire.protogen

lint: install
	$(BIN)/ruff check server client wire testkit tests benchmarks deploy
	$(BIN)/ruff format --check server client wire testkit tests benchmarks deploy
	$(BIN)/buf lint
	$(BIN)/hadolint Dockerfile

clean:
	rm -rf $(VENV) var .pytest_cache
