# The README's commands. `make serve` and `make test` build .venv through `make install`
# when it is missing; `make install` runs scripts/install.sh, as the Docker images do.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# A different pinned torch, e.g. TORCH=torch==2.13.0; empty: the one scripts/install.sh pins.
TORCH   ?=

.PHONY: install serve test lint models own-classifier families bench bench-parts loadtest soak overload models-bench image clean

$(BIN)/exitserve:
	PYTHON=$(PY) scripts/install.sh --dev --editable $(if $(TORCH),--torch "$(TORCH)") $(VENV)

install: $(BIN)/exitserve

serve: install
	$(BIN)/exitserve serve

# In parallel over every core where pytest-xdist is installed (the dev extras have it).
test: install
	$(BIN)/pytest -q $$($(BIN)/python -c 'import xdist; print("-n auto")' 2>/dev/null)

lint: install
	$(BIN)/ruff check app tests bench devtools locustfile.py
	$(BIN)/ruff format --check app tests bench devtools locustfile.py
	$(BIN)/mypy

# Rebuild the default models (about 10 minutes each on 2 cores). Retrain rarely:
# every committed weight file stays in the history.
models: install
	$(BIN)/exitserve train --data rotten-tomatoes --out models/rt-sentiment-minilm --train-embeddings --seed 1
	$(BIN)/exitserve calibrate models/rt-sentiment-minilm --max-drop 0.01 --max-disagreement 0.03
	$(BIN)/exitserve evaluate models/rt-sentiment-minilm --split test --json --write
	$(BIN)/exitserve train --data bbc-news --out models/bbc-topic-minilm
	$(BIN)/exitserve calibrate models/bbc-topic-minilm --max-drop 0.01 --max-disagreement 0.02
	$(BIN)/exitserve evaluate models/bbc-topic-minilm --split test --json --write

# Serve your own classifier, proved (about 15 minutes): fine-tune MiniLM as a standard
# BertForSequenceClassification, give it exits, compare with the original on the test split.
own-classifier: install
	$(BIN)/python bench/byo_classifier.py finetune --out build/byo/rt-classifier-minilm
	$(BIN)/exitserve add-exits build/byo/rt-classifier-minilm --data rotten-tomatoes --out build/byo/rt-classifier-exits
	$(BIN)/python bench/byo_classifier.py compare build/byo/rt-classifier-minilm build/byo/rt-classifier-exits --out bench/results

# DistilBERT, RoBERTa, XLM-R and a multi-label BERT made with Hugging Face transformers
# (in a separate virtualenv, REF_PY: transformers is never a dependency), given exits
# and served, against transformers' own answers (about 40 minutes on 2 cores).
REF_PY ?= /tmp/refvenv/bin/python
families: install
	$(REF_PY) bench/make_families.py --out build/families
	$(BIN)/python -m bench.families build/families --reference-python $(REF_PY) --out bench/results

# Speed, raw numbers, tables and plots under bench/results/. `bench`: exitserve against
# full depth and two peer servers over HTTP (about 9 minutes on 2 cores); `bench-parts`:
# the engine alone, the int8 candidates, and the HTTP calibrated/full-depth pair.
bench: install
	$(BIN)/python bench/harness.py models/rt-sentiment-minilm --out bench/results

bench-parts: install
	$(BIN)/exitserve bench models/rt-sentiment-minilm --out bench/results
	$(BIN)/python -m bench.quantization models/rt-sentiment-minilm --out bench/results
	$(BIN)/python bench/http_bench.py models/rt-sentiment-minilm --concurrency 1 8 --out bench/results

# Locust headless (locustfile.py) against a server it starts; 16 users for 60 s by default,
# CSV and HTML under bench/results/locust-<date>-<host>*. Fails if any request failed.
# Smaller: make loadtest LOADTEST_ARGS="--users 4 --duration 15"
LOADTEST_ARGS ?=
loadtest: install
	$(BIN)/python bench/loadtest.py models/rt-sentiment-minilm $(LOADTEST_ARGS)

# Overload, bounded in time and on loopback only: measure capacity, then flood the real
# server at 10x for 30 s (about a minute in all). `make soak SOAK_ARGS=--steady`: 10
# minutes at half capacity, watching memory. Results under bench/results/.
SOAK_ARGS ?=
soak: install
	$(BIN)/python -m bench.soak models/rt-sentiment-minilm --out bench/results $(SOAK_ARGS)

# Adaptation to load: static, admission-only and adaptive servers at 1x, 2x and 5x their
# measured capacity, 200 ms target (about 5 minutes). Results under bench/results/.
OVERLOAD_ARGS ?=
overload: install
	$(BIN)/python -m bench.overload models/rt-sentiment-minilm --out bench/results $(OVERLOAD_ARGS)

# Both shipped models in one server: a 3x flood of one and light traffic to the other,
# memory of one and of both, an unload under traffic (about 2 minutes; needs `make
# models`). MODELS_ARGS=--isolation thread measures the one-process server instead.
MODELS_ARGS ?=
models-bench: install
	$(BIN)/python -m bench.models --out bench/results $(MODELS_ARGS)

# The CPU image where no registry can be reached: a debootstrap base image and the local
# torch wheel served to the build (scripts/docker-local.sh; root and a Docker engine).
image:
	scripts/docker-local.sh build exitserve:cpu

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
