# make help: list the targets. `make train` and `make test` install what is missing first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TINY := +experiment=scribble model=tiny trainer=cpu data.resolution=64 trainer.max_steps=100 \
        callbacks.checkpoint.every_n_train_steps=50 callbacks.preview.every_n_steps=50

.PHONY: help setup train test lint

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## make .venv and install sdft with its dependencies (torch from this disk)

train: setup ## train the scribble LoRA on the tiny offline model, real QuickDraw data (CPU, ~2 min)
	$(PY) train.py $(TINY) $(ARGS)

test: setup ## run the test suite (CPU, offline)
	$(PY) -m pytest -q $(ARGS)

lint: setup ## ruff check and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
