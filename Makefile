# Two commands matter: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint faults bench soak clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# examples/svm.py needs no numpy or scikit-learn here: its electrons install them on the workers.
demo: $(STAMP)
	$(PY) examples/run_demo.py

test: $(STAMP)
	$(PY) -m pytest -ra

# Fault-injection and bad-input suite (also part of `make test`), with one line per scenario: the
# pipeline's faults (test_faults.py) and the worker's own (test_worker.py: lost acknowledgements,
# storage outages, undecodable output, start deadlines).
faults: $(STAMP)
	PYTHONPATH=tests/support $(PY) -m pytest -p faults_report tests/stack/test_faults.py tests/stack/test_worker.py -q

# Event-driven against polling on the local stack, then packing, per-electron overhead and warm VMs
# through Covalent (docs/performance.md): 42 minutes on a 2-core AMD EPYC, bounded by --budget-s;
# writes bench/results/<date>.json and .png files and prints the tables. Not part of `make test`.
# BENCH_ARGS passes options through, e.g. `make bench BENCH_ARGS=--smoke` (python -m bench --help).
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# Hundreds of electrons through Covalent under faults fired at random moments from a seed, then
# every outcome checked (bench/soak.py; docs/reliability.md). At most 20 minutes; not part of
# `make test` (tests/stack/test_soak.py runs a short form). SOAK_ARGS passes options through,
# e.g. `make soak SOAK_ARGS="--seed 7"` (python -m bench.soak --help).
SOAK_ARGS ?=
soak: $(STAMP)
	$(PY) -m bench.soak $(SOAK_ARGS)

# deploy.sh must stay shellcheck-clean (CI runs this before `make test`).
lint:
	shellcheck deploy.sh

clean:
	rm -rf $(VENV) build *.egg-info executor/*.egg-info .pytest_cache
