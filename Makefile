# Two commands matter: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint faults bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(VENV)/.demo-installed: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) examples/run_demo.py

test: $(STAMP)
	$(PY) -m pytest -ra

# Fault-injection and bad-input suite (also part of `make test`), with one line per scenario.
faults: $(STAMP)
	PYTHONPATH=tests $(PY) -m pytest -p faults_report tests/test_faults.py -q

# deploy.sh must stay shellcheck-clean (CI runs this before `make test`).
lint:
	shellcheck deploy.sh

clean:
	rm -rf $(VENV) build *.egg-info executor/*.egg-info .pytest_cache
