# make help: list the targets. `make train` and `make test` install what is missing first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# the sweep at 5 prompts x 1 seed (110 images, not 440) and no loader workers (2 cores): see README
TINY := +experiment=scribble model=tiny eval=tiny trainer=cpu data.resolution=64 trainer.max_steps=100 \
        callbacks.checkpoint.every_n_train_steps=50 callbacks.preview.every_n_steps=50 \
        data.num_workers=0 eval.num_prompts=5 eval.seeds=[0]

BENCH_OUT ?= outputs/bench
PEER := .peer/diffusers_train_text_to_image_lora.py

.PHONY: help setup train paper bench test lint ui

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## make .venv and install sdft with its dependencies (torch from this disk)

train: setup ## train the scribble LoRA on the tiny offline model, real QuickDraw data, evaluates it (CPU, 2.5 min)
	$(PY) train.py $(TINY) $(ARGS)

paper: setup ## the paper's figures 5-11 into experiments/scribble_paper/results/ (tiny model, CPU, ~4 min; ARGS="model=sd15" on a GPU)
	$(PY) experiments/scribble_paper/paper.py $(ARGS)

bench: setup ## GPU: the diffusers example and sdft side by side; appends a table to bench/RESULTS.md
	test -f $(PEER) || (mkdir -p .peer && cp ../shared/peers/diffusers_train_text_to_image_lora.py $(PEER))
	$(PY) bench/throughput.py run --out $(BENCH_OUT) $(ARGS)
	$(PY) bench/throughput.py report $(BENCH_OUT)/throughput.json --plot $(BENCH_OUT)/loss_curves.png

ui: setup ## the web UI on http://127.0.0.1:7860 (tiny model, CPU, offline; ARGS="model=sd15" on a GPU)
	GRADIO_ANALYTICS_ENABLED=False $(PY) ui.py $(ARGS)

# two workers of one thread each: most of the suite's time is subprocesses starting up, which
# overlap; two threads each would oversubscribe a 2-core machine (OpenMP threads spin)
TEST_WORKERS ?= 2
test: setup ## run the test suite (CPU, offline; ~10 min on 2 cores)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) $(ARGS)

lint: setup ## ruff check and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
