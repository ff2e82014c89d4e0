# Two entry points on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: install install-dev demo test test-min gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m domix.demo

test: install
	$(BIN)/python -m pytest -q tests

# the suite on the oldest releases pyproject.toml allows (constraints-min.txt), in its own venv
MIN_VENV ?= .venv-min
test-min:
	test -x $(MIN_VENV)/bin/python || $(PY) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install --disable-pip-version-check -q -c constraints-min.txt -e . "pytest>=8" "ray[default]>=2.9"
	$(MIN_VENV)/bin/python -m pytest -q tests

# domix end to end on a CUDA device in bf16 and fp16, checked and timed (results/gpu-check/gpu-check.json)
gpu-check: install
	$(BIN)/python -m domix.bench.gpu_check --out results/gpu-check

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
