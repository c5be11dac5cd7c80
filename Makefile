# Two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

OM_VENV := .venv-om
OM_STAMP := $(OM_VENV)/.installed

.PHONY: demo test gpu-check clean .venv-om

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) tools/demo.py

test: $(STAMP) $(OM_STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q tests

# OnDA Monitor's peakfinder8 (C), the reference finder of tools/evaluate.py. OM 23.8.3 uses
# np.float_, removed in numpy 2, so it lives in a venv of its own; evaluate.py talks to it through
# files (tools/om_runner.py), never by import.
.venv-om: $(OM_STAMP)

$(OM_STAMP):
	test -x $(OM_VENV)/bin/python || $(PYTHON) -m venv $(OM_VENV)
	$(OM_VENV)/bin/python -m pip install -q --upgrade pip
	$(OM_VENV)/bin/python -m pip install -q 'numpy<2' 'ondamonitor==23.8.3'
	$(OM_VENV)/bin/python -c 'from om.algorithms.crystallography import Peakfinder8PeakDetection'
	touch $(OM_STAMP)

gpu-check: $(STAMP)
	$(VENV)/bin/peaknet-gpu-check

clean:
	rm -rf $(VENV) $(OM_VENV) build *.egg-info
