PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test demo demo-text

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt

# two pytest workers with one thread each: the tiny test models barely use a second thread, while two workers
# with two threads each oversubscribe 2 cores (the whole suite: ~8 min this way, ~19 min in one process)
test: install
	$(PY) -m pip install --quiet -r requirements-test.txt
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -n 2 --durations=15

demo: install
	$(PY) demo.py

demo-text: install
	$(PY) demo_text.py
