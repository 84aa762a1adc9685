VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo data bench lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

FASHION_MNIST := /usr/share/datasets/fashion-mnist

# Two workers: most of a test's time is compiling, on one core.
test: $(STAMP) data
	$(PY) -m pytest -q -n 2

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

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV)
