# Two commands on a fresh machine:
#   make demo   - create .venv, install CPU torch then fedlora, run the default simulation
#   make test   - create .venv, install CPU torch then fedlora with test extras, run the whole suite
# Dev loop: `make test-fast` runs the unit tier (not slow: no Flower, no processes, no long training).
# On a CUDA machine install a CUDA torch instead: `make demo TORCH=torch`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: demo test test-fast install bench clean

$(BIN)/fedlora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: a bare `torch` requirement could otherwise pull a multi-GB CUDA build
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/fedlora

demo: $(BIN)/fedlora
	$(BIN)/fedlora simulate

test: $(BIN)/fedlora
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/fedlora
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(BIN)/fedlora
	$(BIN)/python -m simulations.bench.server
	$(BIN)/python -m simulations.bench.qlora
	$(BIN)/python -m simulations.bench.tenant
	$(BIN)/python -m simulations.bench.dp
	$(BIN)/python -m simulations.bench.secagg
	$(BIN)/python -m simulations.bench.secagg --engine simulation
	$(BIN)/python -m simulations.bench.federation
	$(BIN)/python -m simulations.bench.deployment

clean:
	rm -rf $(VENV) runs .pytest_cache
