# Quick start:  make demo   (train + evaluate on the built-in synthetic data)
#               make test   (the whole test suite)
# Both create .venv when it is missing.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install torch torchvision
	$(PY) -m pip install -e ".[dev,test]" --config-settings editable_mode=compat
	touch $(STAMP)

# The demo starts anew each time: its run directory is replaced.
demo: $(STAMP)
	rm -rf outputs/demo
	$(PY) tools/train.py experiment=demo hydra.run.dir=outputs/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf outputs .pytest_cache
