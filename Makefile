# Both targets build .venv themselves on a machine with nothing but Python.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Three workers on the CI machine's two cores: a worker waiting on a subprocess (the
# 8-device checks, a notebook's kernel) leaves its core to the third. Measured: 13.1
# minutes of wall time against 15.0 with two workers, for the same CPU time.
PYTEST_ARGS ?= -n 3

.PHONY: test lint docs fuzz demo demo-classify notebooks bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo,bench,docs,lint]'
	touch $(STAMP)

# The suite also builds the documentation site (tests/test_docs_site.py) and installs the
# wheel into a fresh virtual environment (tests/test_packaging.py).
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff's lint rules and pyright's standard mode (pyproject.toml) over the package.
lint: $(STAMP)
	$(BIN)/ruff check jfocal
	$(BIN)/pyright jfocal

# The HTML site in docs/_build/html; warnings are errors.
docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# The property tests of tests/test_fuzz.py with 500 random examples each.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/test_fuzz.py -n 2 -q

# The tiny RetinaNet trained with CE, balanced CE and focal loss; writes
# examples/retinanet/results/ (table, training curves, detections).
demo: $(STAMP)
	$(BIN)/python -m examples.retinanet

# The earlier classification demo: CE vs balanced CE vs focal on long-tailed digits.
demo-classify: $(STAMP)
	$(BIN)/python examples/imbalanced_digits.py

# Executes notebooks/*.py and writes the .ipynb files with their outputs.
notebooks: $(STAMP)
	$(BIN)/python notebooks/run.py

# Timings side by side with optax, a naive loss and a floor kernel; writes
# benchmarks/results.md, results.json and results.png.
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis docs/_build dist
