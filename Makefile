# MedSegAI — two commands for a newcomer:
#   make demo   set up .venv and segment the shipped sample CT with the default model (writes demo-output/)
#   make test   set up .venv and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# tensorflow-cpu keeps CI small; GPU users: make setup TF_PACKAGE=tensorflow
TF_PACKAGE ?= tensorflow-cpu>=2.16,<2.22
STAMP := $(VENV)/.medsegai-installed
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test test-fast models bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TF_PACKAGE)"
	$(BIN)/python -m pip install --quiet -e ".[onnx,train,dev]"
	touch $(STAMP)

setup: $(STAMP)

# pdftoppm (poppler-utils) renders the PDF case report in Testing/Python/test_report.py.
system-deps:
	@command -v pdftoppm >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq poppler-utils >/dev/null; \
	  else echo "please install poppler-utils (pdftoppm), e.g. sudo apt-get install poppler-utils"; exit 1; fi; }

demo: setup
	$(BIN)/python -m MedSegAILib.demo --output demo-output

test: setup system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 $(PYTEST_ARGS)

test-fast: setup system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

models: setup
	$(BIN)/python training/recipes/build_models.py all

bench: setup
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf demo-output .pytest_cache
