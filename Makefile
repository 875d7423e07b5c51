# One entry point per job; each does its own set-up on a fresh machine.
PY_SYS ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint bench clean

# torch first, pinned to the CPU wheel; the package's range (torch>=2.4) then installs nothing more.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/keel demo

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q -x --durations=15

# The peers benchmark runs each peer library in its own .venv-peers/<lib> (pinned; made here if missing).
bench: $(STAMP)
	PY_SYS=$(PY_SYS) benchmarks/peers/setup.sh
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) runs .pytest_cache
