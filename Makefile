# Two commands do everything on a fresh machine: `make run` and `make test` (both set up first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# llama-cpp-python compiles llama.cpp on install. A native build uses CPU instructions (AMX) that
# crash on some hosts, so build portable AVX2/AVX-512 code; pip's wheel cache keeps it to one build.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

# Debian's docker-compose validates the compose profiles without a Docker engine (tests/test_deploy.py).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
LOAD_TEST_URL ?= http://127.0.0.1:8000/v1
LOAD_TEST_ARGS ?= --requests 32 --concurrency 8

.PHONY: setup models run test clean compose-tool load-test

setup: $(STAMP) models

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --progress-bar off -e '.[test]'
	touch $@

models: $(STAMP)
	$(PY) scripts/fetch_model.py

run: setup
	$(VENV)/bin/llm-gateway serve

test: setup compose-tool
	$(PY) -m pytest

compose-tool:
	@command -v docker-compose >/dev/null || $(SUDO) apt-get install -y -qq docker-compose >/dev/null 2>&1 \
		|| ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq docker-compose) >/dev/null 2>&1 \
		|| echo "docker-compose could not be installed: the compose tests will skip"

# Against a running gateway (`make run` in another terminal, or LOAD_TEST_URL=...).
load-test: setup
	$(PY) scripts/load_test.py --url $(LOAD_TEST_URL) $(LOAD_TEST_ARGS)

clean:
	rm -rf $(VENV) models .pytest_cache
