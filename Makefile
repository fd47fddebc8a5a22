# Two commands on a fresh machine:
#   make demo   - create .venv, install CPU torch then the locked set and fedlora, run the default simulation
#   make test   - the same install (and nginx, which the deployment tests start), then the whole suite
# Dev loop: `make test-fast` runs the unit tier (not slow: no Flower, no processes, no long training).
# Both spread over the cores; `make test JOBS=0` runs in this process, one test after another.
# On a CUDA machine install a CUDA torch instead: `make demo TORCH=torch`.
# The installed set is requirements-lock.txt (pinned, hash-checked; torch is the one package it leaves
# out, installed first as $(TORCH)); `make lock` refreshes it and the README's "Tested versions".

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
LOCK   := requirements-lock.txt
# where `make lock` finds the CPU torch wheel it resolves against (pip's find-links; a local
# wheel or the PyTorch CPU index keeps CUDA-only packages out of the lock)
TORCH_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: demo test test-fast install nginx lock wheel bench clean

# A new or changed lock rebuilds the venv from empty, so what runs is exactly the lock.
$(BIN)/fedlora: pyproject.toml $(LOCK)
	$(PYTHON) -m venv --clear $(VENV)
	# torch first: a bare `torch` requirement could otherwise pull a multi-GB CUDA build
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $@

install: $(BIN)/fedlora

demo: $(BIN)/fedlora
	$(BIN)/fedlora simulate

# The deployment tests start nginx, the SuperLink's Fleet proxy (a system package): installed here
# with apt when missing and run as root, else the command to install it is printed.
nginx:
	@if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing nginx-light (the SuperLink's Fleet proxy, which the deployment tests start)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light; \
	  else \
	    echo "the deployment tests need nginx: install it (Debian/Ubuntu: sudo apt-get install nginx-light)" >&2; exit 2; \
	  fi; \
	fi

# one worker per core (pytest-xdist); a module's tests stay on one worker (tests/conftest.py)
JOBS ?= auto
test: $(BIN)/fedlora nginx
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadgroup --no-loadscope-reorder --durations=20

test-fast: $(BIN)/fedlora nginx
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadgroup --no-loadscope-reorder -m "not slow"

# Resolve the newest set that fits pyproject's ranges (Linux, Python 3.11, against $(TORCH)),
# with the hashes of every file of each release, and write it with the README's table.
lock: $(BIN)/fedlora
	echo "$(TORCH)" > $(VENV)/torch-pin.txt
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 --python-platform linux \
	  --constraints $(VENV)/torch-pin.txt --no-emit-package torch \
	  $(if $(TORCH_FIND_LINKS),--find-links $(TORCH_FIND_LINKS)) --generate-hashes --upgrade \
	  --custom-compile-command "make lock" --quiet -o $(LOCK)
	$(BIN)/python .ci/tested_versions.py --write README.md

wheel: $(BIN)/fedlora
	$(BIN)/python -m build --no-isolation --outdir dist .

bench: $(BIN)/fedlora
	$(BIN)/python -m fedlora.simulations.bench.server
	$(BIN)/python -m fedlora.simulations.bench.qlora
	$(BIN)/python -m fedlora.simulations.bench.tenant
	$(BIN)/python -m fedlora.simulations.bench.dp
	$(BIN)/python -m fedlora.simulations.bench.policy
	$(BIN)/python -m fedlora.simulations.bench.secagg
	$(BIN)/python -m fedlora.simulations.bench.secagg --engine simulation
	$(BIN)/python -m fedlora.simulations.bench.federation
	$(BIN)/python -m fedlora.simulations.bench.deployment

clean:
	rm -rf $(VENV) runs .pytest_cache dist build
