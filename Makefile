# Two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test gpu-check clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) tools/demo.py

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q tests

gpu-check: $(STAMP)
	$(VENV)/bin/peaknet-gpu-check

clean:
	rm -rf $(VENV) build *.egg-info
