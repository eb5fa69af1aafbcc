#!/usr/bin/env bash
# Benchmark 1 on a CUDA machine: the llama.cpp engine against llama-server, every layer on the GPU.
#
#   make setup && .venv/bin/pip install -e '.[bench]'     # once: the gateway, torch/transformers, the bench extra
#   scripts/bench_gpu.sh [bench_llamacpp.py arguments]    # e.g. --concurrency 1,4,8,16 --reps 10
#
# It builds llama.cpp with CUDA once, from the source vendored in the llama-cpp-python sdist the gateway uses
# (shared libraries, which llama-cpp-python loads through LLAMA_CPP_LIB_PATH; llama-server from the same build),
# makes a random-weight 1 B Llama (scripts/make_random_model.py; throughput does not depend on the weights), and
# runs scripts/bench_llamacpp.py. Results go to bench-results/ (NAME.json and NAME.md). Needs cmake, a C++
# compiler and the CUDA toolkit (nvcc). Re-running skips the steps already done.
#
# Environment (all optional):
#   PYTHON      the gateway's Python (default .venv/bin/python)
#   WORK        build and model folder (default ~/.cache/llm-gateway/gpu)
#   CUDA_ARCH   CMAKE_CUDA_ARCHITECTURES (default: this GPU's compute capability, e.g. 90 on an H100/H200)
#   MODEL       a GGUF to use instead of the random 1 B Llama
#   TOKENIZER   the tokenizer for the random model (default models/SmolLM2-135M-Instruct.Q4_1.gguf, from `make models`)
#   REPS, NAME  repetitions (default 3) and result name (default bench_llamacpp_gpu)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
WORK=${WORK:-$HOME/.cache/llm-gateway/gpu}
CUDA_ARCH=${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
TOKENIZER=${TOKENIZER:-$REPO/models/SmolLM2-135M-Instruct.Q4_1.gguf}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

version=$("$PYTHON" -m pip show llama-cpp-python | sed -n 's/^Version: //p')
src=$WORK/llama_cpp_python-$version
build=$WORK/build-$version-cuda$CUDA_ARCH
mkdir -p "$WORK"
if [ ! -d "$src" ]; then
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$WORK"
  tar -xzf "$WORK/llama_cpp_python-$version.tar.gz" -C "$WORK"
fi
if [ ! -x "$build/bin/llama-server" ]; then
  cmake -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
    -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF
  cmake --build "$build" --target llama llama-server -j "$(nproc)"
fi
if [ -z "${MODEL:-}" ]; then
  MODEL=$WORK/model/random-llama-1b-f16.gguf
  [ -f "$MODEL" ] || "$PYTHON" "$REPO/scripts/make_random_model.py" "$TOKENIZER" "$WORK/model" "$src/vendor/llama.cpp"
fi
# If llama.cpp's tokenizer crashes in std::regex, an older libstdc++ was loaded first: set
# LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) before running this script.
cd "$REPO"
LLAMA_CPP_LIB_PATH=$build/bin exec "$PYTHON" scripts/bench_llamacpp.py --model "$MODEL" \
  --llama-server "$build/bin/llama-server" --gpu-layers 99 --threads 8 --ctx 1024 --parallel 16 \
  --reps "${REPS:-3}" --name "${NAME:-bench_llamacpp_gpu}" "$@"
