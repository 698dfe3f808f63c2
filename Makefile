# Two commands on a fresh machine: `make run` and `make test`. Everything they need is
# installed here from hash-pinned lock files (requirements/); nothing is fetched at run time.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ENGINE_VENV := build/vllm-venv
MODEL_DIR := build/models/SmolLM2-135M-Instruct
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run run-fake test test-fast test-slow lint bench engine model lock clean

## make run: a real vLLM (CPU build here, CUDA on a GPU host) serving SmolLM2-135M-Instruct
## behind the signing middleware, with the simulated TEE.
run: engine model
	$(ENGINE_VENV)/bin/tee-inference serve --engine vllm --tee simulated \
		--model $(MODEL_DIR) --host $(HOST) --port $(PORT)

## make run-fake: the same server with the built-in deterministic engine (starts in a second).
run-fake: $(VENV)/.stamp
	$(BIN)/tee-inference serve --engine fake --tee simulated --host $(HOST) --port $(PORT)

## make test: lint, type-check and the default test suite (under ~15 minutes, no engine).
test: $(VENV)/.stamp lint
	$(BIN)/pytest

## make test-slow: the tests that run a real vLLM (CI runs these too).
test-slow: $(VENV)/.stamp engine model
	TEE_INFERENCE_ENGINE_VENV=$(abspath $(ENGINE_VENV)) TEE_INFERENCE_TEST_MODEL=$(abspath $(MODEL_DIR)) \
		$(BIN)/pytest -m slow -p no:cacheprovider

lint: $(VENV)/.stamp
	$(BIN)/ruff check server tests
	$(BIN)/ruff format --check server tests
	$(BIN)/mypy

$(VENV)/.stamp: requirements/dev.txt requirements/build.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r requirements/build.txt -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

engine:
	VLLM_VENV=$(abspath $(ENGINE_VENV)) ./scripts/vllm-env.sh

model: engine
	VLLM_VENV=$(abspath $(ENGINE_VENV)) ./scripts/prepare-model.sh $(abspath $(MODEL_DIR))

## make lock: re-resolve the pinned dependencies (needs pip-tools; review the diff).
lock:
	$(PYTHON) -m piptools compile -q --extra dev --generate-hashes --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links -o requirements/dev.txt pyproject.toml

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
