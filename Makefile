# make test: set up .venv (if needed), lint, run the whole test suite.
# make demo: set up .venv (if needed), run the main job.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test demo bench lint clean

$(STAMP): pyproject.toml constraints/ci.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints/ci.txt -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check uotmatch detectors tests benchmarks

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m uotmatch.figure1

bench: $(STAMP)
	$(PY) benchmarks/bench_solver.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
