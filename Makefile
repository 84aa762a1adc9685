VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: test demo data bench lint docs site-check notebooks package clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,docs]'
	touch $(DOCS_STAMP)

FASHION_MNIST := /usr/share/datasets/fashion-mnist

# Two workers: most of a test's time is compiling, on one core.
test: $(STAMP) data
	$(PY) -m pytest -q -n 2 --durations=15

demo: $(STAMP) data
	$(PY) experiments/demo.py

# The offline data: Debian's dataset-fashion-mnist, installed when apt can.
data:
	@test -d $(FASHION_MNIST) || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
		echo "Could not install dataset-fashion-mnist; see README (Data)."

bench: $(STAMP)
	$(PY) benchmarks/adjoints.py
	$(PY) benchmarks/exactness.py

# Ruff, then pyright at its standard level (configured in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright

# MathJax from the npm registry, copied into the site so that its pages render
# math offline and request nothing from outside it.
MATHJAX := docs/_static/mathjax
$(MATHJAX)/tex-mml-chtml.js:
	npm install --silent --no-save --no-audit --no-fund --prefix $(VENV)/npm mathjax@3.2.2
	mkdir -p $(MATHJAX)
	cd $(VENV)/npm/node_modules/mathjax/es5 && \
		cp -r tex-mml-chtml.js input output ui a11y $(CURDIR)/$(MATHJAX)/

# The site, into site/. Strict: a broken cross-reference fails the build.
docs: $(DOCS_STAMP) $(MATHJAX)/tex-mml-chtml.js
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Pages of the built site opened in headless Chromium with the network off: their
# math renders and they request nothing (needs Debian's chromium).
site-check: docs
	$(PY) docs/_offline_check.py

# The notebooks' sources are the percent-format .py files beside them: write each
# .ipynb from its source, execute it in place, and format both.
# `make notebooks NOTEBOOKS=notebooks/01_quickstart.py` runs one.
NOTEBOOKS := $(wildcard notebooks/[0-9]*.py)
notebooks: $(STAMP) data
	$(VENV)/bin/ruff format $(NOTEBOOKS)
	$(VENV)/bin/jupytext --to ipynb --update $(NOTEBOOKS)
	$(VENV)/bin/jupytext --set-kernel python3 --execute $(NOTEBOOKS:.py=.ipynb)
	$(VENV)/bin/ruff format $(NOTEBOOKS:.py=.ipynb)

# A wheel and an sdist into dist/, then the wheel installed into a fresh virtual
# environment outside the checkout, where it must solve and differentiate.
package: $(STAMP)
	rm -rf dist
	$(PY) -m build
	$(PY) -m pytest -q -m package tests/test_package.py

clean:
	rm -rf $(VENV) site dist $(MATHJAX)
