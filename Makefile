# Two set-up commands: `make install`, then `make test` (what CI runs, see .ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install test test-all clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Fast offline suite: tiny random models on CPU, no network.
test: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q

# Everything, including tests marked `slow`.
test-all: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m ''

clean:
	rm -rf $(VENV) .pytest_cache
