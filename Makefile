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
# Debian packages the tests use (not the demo): a real PACS with DICOMweb, the DICOM validator
# dciodvfy, `ip` to bring up the loopback-only network namespace the test PACS runs in, and pdftoppm
# (poppler-utils) to render the PDF case report.
TEST_DEB_PACKAGES := orthanc orthanc-dicomweb dicom3tools iproute2 poppler-utils

.PHONY: setup system-test-deps demo test test-fast models bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TF_PACKAGE)"
	$(BIN)/python -m pip install --quiet -e ".[onnx,train,dev,dicom]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m MedSegAILib.demo --output demo-output

# apt-get as root (CI, containers), else sudo; the Orthanc service is kept from starting on its own
# (policy-rc.d): the tests start their own loopback-only Orthanc and stop it.
system-test-deps:
	@missing=$$(for p in $(TEST_DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing Debian packages for the tests: $$missing"; \
	  policy=/usr/sbin/policy-rc.d; added=; \
	  if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' | $$sudo tee $$policy >/dev/null && $$sudo chmod +x $$policy && added=1; fi; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  status=$$?; [ -n "$$added" ] && $$sudo rm -f $$policy; exit $$status; \
	fi

test: setup system-test-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 $(PYTEST_ARGS)

test-fast: setup system-test-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

models: setup
	$(BIN)/python training/recipes/build_models.py all

bench: setup
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf demo-output .pytest_cache
