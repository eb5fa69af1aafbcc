# Two commands do everything on a fresh machine: `make run` and `make test` (both set up first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# llama-cpp-python compiles llama.cpp on install. A native build uses CPU instructions (AMX) that
# crash on some hosts, so build portable AVX2/AVX-512 code; pip's wheel cache keeps it to one build.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

.PHONY: setup models run test clean

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

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) models .pytest_cache
