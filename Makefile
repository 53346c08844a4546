# Every install step the project needs lives here: README and .ci/run call these targets, nothing is
# installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without an NVIDIA driver (no `nvidia-smi`; override with HAS_NVIDIA=yes or HAS_NVIDIA=no),
# install the CPU build of torch first: the pyproject range is then already satisfied and pip never
# downloads gigabytes of CUDA wheels. On PyPI, Linux torch *is* the CUDA build (it pulls ~15 nvidia-*
# packages), so the CPU build comes from TORCH_INDEX_URL, PyTorch's CPU wheel index, added as an *extra*
# index: pip still reads its configured index, mirror or find-links, and prefers `2.13.0+cpu` from any of
# them over PyPI's `2.13.0`. Set TORCH_INDEX_URL to a mirror of that index, or empty to rely on pip's
# configuration alone. An index that does not answer (no internet, only a package mirror) is skipped with a
# note instead of being retried for every package.
TORCH_CPU_PIN ?= torch==2.13.0
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
HAS_NVIDIA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_INDEX_PROBE := import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10)
# Two installs, each with its own stamp: `make run` needs the runtime extras only, everything else (tests,
# lint, benchmarks) the dev toolchain too. The dev install includes the runtime one, so a venv made by
# `make test` serves `make run` as is, and `make test` after `make run` adds the dev extra.
STAMP := $(VENV)/.installed-dev
RUN_STAMP := $(VENV)/.installed-run

.PHONY: install install-run run test test-all lint format clean generate browser check-deploy constraints openapi configuration bench bench-gpu bench-gpu-nf4 test-slow

comma := ,
# $(1): the extras to install (commas as $(comma)).
define pip_install
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ "$(HAS_NVIDIA)" = yes ]; then :; \
	elif [ -n "$(TORCH_INDEX_URL)" ] && $(BIN)/python -c '$(TORCH_INDEX_PROBE)' "$(TORCH_INDEX_URL)" 2>/dev/null; then \
		echo "$(BIN)/python -m pip install -q \"$(TORCH_CPU_PIN)\" --extra-index-url $(TORCH_INDEX_URL)"; \
		$(BIN)/python -m pip install -q "$(TORCH_CPU_PIN)" --extra-index-url "$(TORCH_INDEX_URL)"; \
	else \
		echo "note: CPU wheel index '$(TORCH_INDEX_URL)' not reachable; torch from pip's configured sources"; \
		$(BIN)/python -m pip install -q "$(TORCH_CPU_PIN)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[$(1)]"
endef

$(STAMP): pyproject.toml
	$(call pip_install,api$(comma)worker$(comma)local$(comma)dev)
	touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	test $(STAMP) -nt pyproject.toml || $(MAKE) --no-print-directory _install-run
	touch $(RUN_STAMP)

.PHONY: _install-run
_install-run:
	$(call pip_install,api$(comma)worker$(comma)local)

# Node tools of the checks (Redocly CLI for the OpenAPI lint), pinned by package-lock.json.
NODE_STAMP := node_modules/.installed
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

install: $(STAMP) $(NODE_STAMP)

## The runtime only (`.[api,worker,local]`: no dev toolchain), what `make run` needs.
install-run: $(RUN_STAMP)

## The run command (README): API on :8000 + one worker + webhook worker + private Redis + local storage.
## "ready" is printed once a worker of the served model is loaded and warm.
run: install-run
	$(BIN)/python -m devtools.devstack

## The test command (README, .ci/run): lint, types, then the default suite.
test: install browser lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not gpu and not slow" --durations=25

## The slow suites CI runs after `make test` (-s: their figures go to the log): the 200- and 2,000-job
## bursts, a worker killed mid-batch, the lifecycle fault tests (processes around a job's events killed), the bench
## smoke run, the compile-graph check over every preset. Real inductor compiles (tens of minutes on 2 cores) are
## left to `make test-all`.
test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "slow and not gpu and not inductor" --durations=10 -s

## Everything that runs without a GPU, slow suites and inductor compiles included.
test-all: install lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not gpu"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m api.openapi --check
	$(BIN)/python -m services.settings_reference --check
	$(BIN)/openapi-spec-validator docs/openapi.json
	REDOCLY_TELEMETRY=off REDOCLY_SUPPRESS_UPDATE_NOTICE=true node_modules/.bin/redocly lint --format=summary docs/openapi.json

## Chromium for the playground's browser tests (tests/api/test_playground.py), which use a system Chromium,
## not a Playwright download: Debian/Ubuntu's package. Elsewhere point DARKROOM_CHROMIUM at a Chromium binary.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	command -v chromium >/dev/null 2>&1 || ($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium)

## Re-export docs/openapi.json after changing routes or schemas (the drift test fails until you do).
openapi: install
	$(BIN)/python -m api.openapi

## Re-render docs/operate/configuration.md after changing services/settings.py (the drift test fails until you do).
configuration: install
	$(BIN)/python -m services.settings_reference

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Offline checks of Dockerfiles, compose, k8s manifests, dashboards (also part of `make test`).
check-deploy: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/deploy -q

## Re-pin the image dependencies after changing pyproject.toml.
constraints: install
	$(BIN)/python deploy/docker/freeze_constraints.py > deploy/docker/constraints.txt

## CPU benchmarks (service overhead, API load, Redis cost, the fleet design's Redis primitives) and the
## fleet simulation of both designs; see BENCHMARKS.md.
bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.service --wait-quiet 1.2
	$(BIN)/python -m bench.redis_primitives
	$(BIN)/python -m bench.fleet_sim

## The GPU benchmark (full-size SD3.5-M architecture, random weights) on a CUDA machine.
bench-gpu: install
	$(BIN)/python -m bench.gpu --size full

## The same with the transformer in 4-bit NF4 (DARKROOM_QUANTIZE=nf4): peak memory and s/image of small-GPU mode.
bench-gpu-nf4: install
	$(BIN)/python -m pip install -q -e ".[worker,nf4]"
	$(BIN)/python -m bench.gpu --size full --set quantize=nf4 --out bench/results/gpu-full-nf4.json

## Run the engine alone, e.g. make generate ARGS='"a red fox" --seed 7 -o fox.png'
generate: install
	$(BIN)/python -m worker generate $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
