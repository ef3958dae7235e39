# cnnserve developer commands. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REPOSITORY ?= model_repository
GRPC_PORT ?= 8500
METRICS_PORT ?= 9090
HTTP_PORT ?= 8000
PYTEST_ARGS ?=
# Models to serve, in `cnnserve serve --models` syntax: NAME, NAME:VERSION[+VERSION...] or NAME:all,
# comma-separated, e.g. `make serve MODELS=lenet5,resnet50`. Empty: every model in the repository.
MODELS ?=

comma := ,
# The model names MODELS selects (versions dropped, each name once), space-separated.
model_names = $(sort $(foreach item,$(subst $(comma), ,$(MODELS)),$(firstword $(subst :, ,$(item)))))
# Of those, the ones with no version in the repository yet: what `serve` builds with `export demo`.
missing_models = $(strip $(foreach name,$(model_names),$(if $(wildcard $(REPOSITORY)/$(name)/*/metadata.json),,$(name))))
commas = $(subst $(eval) ,$(comma),$(strip $(1)))

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Every extra: the server, the gradient workers, the exporter (make serve, make demo) and the
	# test tools. torch is capped below 2.14 in pyproject: pip takes the local 2.13 CPU wheel here.
	$(PY) -m pip install --quiet -e '.[serve,worker,export,dev]'
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Create .venv and install cnnserve with every extra and the dev tools

$(REPOSITORY)/.demo-complete: | $(STAMP)
	$(PY) -m export demo --repository $(REPOSITORY)
	touch $@

# The marker means "the whole demo set is built": a build of some models (MODELS=...) writes none.
.PHONY: demo
demo: $(STAMP) ## Build (or verify) the demo model repository in ./model_repository; MODELS=a,b: only those
ifeq ($(strip $(MODELS)),)
	$(PY) -m export demo --repository $(REPOSITORY)
	touch $(REPOSITORY)/.demo-complete
else
	$(PY) -m export demo --repository $(REPOSITORY) --models $(call commas,$(model_names))
endif

# MODELS=...: only the selected models that are not in the repository yet are built (a model of
# your own already there is served as it is), and only the selected ones are loaded.
.PHONY: serve
serve: $(if $(strip $(MODELS)),$(STAMP),$(REPOSITORY)/.demo-complete) ## Build the demo models if missing, then start the server; MODELS=lenet5,resnet50: only those
	$(if $(missing_models),$(PY) -m export demo --repository $(REPOSITORY) --models $(call commas,$(missing_models)))
	$(VENV)/bin/cnnserve serve --repository $(REPOSITORY)$(if $(strip $(MODELS)), --models '$(strip $(MODELS))') --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) --http-port $(HTTP_PORT)

.PHONY: test
test: $(STAMP) ## Run the default test suite (everything but slow and gpu tests)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

.PHONY: test-all
test-all: $(STAMP) ## Run every test, slow ones included (gpu tests skip without CUDA)
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: describe
describe: $(STAMP) ## Print the architecture comparison table
	$(PY) -m export describe

.PHONY: train
train: $(STAMP) ## Train LeNet-5 on the UCI digits
	$(PY) -m export train lenet5

.PHONY: protos
protos: $(STAMP) ## Regenerate the committed gRPC stubs from protos/
	$(PY) tools/gen_protos.py

.PHONY: lint
lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check export service tests bench
	$(VENV)/bin/mypy export service bench

.PHONY: bench
bench: $(STAMP) ## Benchmarks against in-process baselines; prints ratios
	$(PY) -m bench

.PHONY: soak
soak: $(STAMP) ## Soak: 10,000 mixed requests at concurrency 8, checks errors/RSS/p99 drift (long; not in CI)
	$(PY) -m bench.soak $(SOAK_ARGS)

.PHONY: device-wheels
device-wheels: $(STAMP) ## Fetch the wheels bench/device_check.sh installs on a lent GPU (.devwheels/; prints the device calls)
	bash bench/device_wheels.sh

.PHONY: clean
clean: ## Remove caches (keeps .venv and the model repository)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
