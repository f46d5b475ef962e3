# make test: set up .venv (if needed), lint (ruff, mypy), run the fast tier of the tests (no
#   `slow` tests, fewer Hypothesis examples): about 2 minutes on 2 cores.
# make test FULL=1: the same checks and the whole suite (what .ci/run does).
# make demo: set up .venv (if needed), run the main job: train FCOS-OTA on Color Boxes (CPU).
#   Run again, it continues an interrupted run (--resume) or reports the finished one; `make
#   clean` (or a new DEMO_OUT) starts over. The README has the measured times.
# make figure1: the UOT paper's Figure 1 regimes, printed.
# make docs: the sphinx site, tutorials executed, warnings as errors (docs/_build/html), then
#   docs/check_build.py (math offline, no code line wider than the page, readable figures; in
#   headless Chromium, installed by scripts/chromium.sh where it can be, no code block scrolls).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

DEMO_DATA ?= data/colorboxes-demo
DEMO_OUT ?= runs/demo

.PHONY: test demo figure1 bench lint docs clean

$(STAMP): pyproject.toml constraints/ci.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints/ci.txt -e '.[dev]'
	touch $(STAMP)

LINTED := uotmatch detectors tests benchmarks docs
ifeq ($(FULL),1)
PYTEST_ARGS ?=
HYPOTHESIS_PROFILE ?= full
else
PYTEST_ARGS ?= -m "not slow"
HYPOTHESIS_PROFILE ?= fast
endif
export HYPOTHESIS_PROFILE

lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check --quiet $(LINTED)
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	test -f $(DEMO_DATA)/annotations/instances_val.json || \
		$(PY) -m detectors.data.colorboxes --out $(DEMO_DATA) --train 400 --val 100 --size 128
	$(PY) -m detectors.fcos.train --data $(DEMO_DATA) --assigner ota --epochs 6 --lr 0.02 \
		--eval-every 0 --out $(DEMO_OUT) --resume

figure1: $(STAMP)
	$(PY) docs/examples/figure1.py

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html
	$(PY) docs/check_build.py docs/_build/html $$(scripts/chromium.sh || echo --no-browser)

bench: $(STAMP)
	$(PY) benchmarks/bench_solver.py
	$(PY) benchmarks/bench_assigners.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis $(DEMO_DATA) $(DEMO_OUT) \
		docs/_build docs/auto_tutorials
