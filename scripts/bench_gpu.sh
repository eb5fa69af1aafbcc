#!/usr/bin/env bash
# Benchmark 1 on the GPU machine (device tool): builds the vendored llama.cpp once with CUDA (its shared
# libraries serve llama-cpp-python through LLAMA_CPP_LIB_PATH, and llama-server comes from the same
# build), makes a random-weight 1 B Llama, then runs scripts/bench_llamacpp.py with every layer on the GPU.
# Needs, in $CARRY (a folder of the repo named in the device call's carry; 64 MiB at most travel):
#   llama-src.tar.gz  the llama-cpp-python 0.3.36 sdist, trimmed to what the CUDA build and the GGUF
#                     converter read (its .git, docs, examples and tests dropped; in vendor/llama.cpp: docs,
#                     models, media, benches, tests, examples, pocs, the web UI's sources but for
#                     tools/ui's CMakeLists.txt, sources.cmake, ui.h.in and ui.cpp.in, which the build reads
#                     even without a UI, ggml backends other than CPU and CUDA): about 6 MB
#   whl/              wheels (Python 3.12, manylinux x86_64) of the gateway's and llama_cpp.server's
#                     dependencies that the device image lacks: fastapi, starlette, uvicorn, httptools,
#                     sse-starlette, pydantic(-core, -settings), python-dotenv, annotated-types,
#                     typing-inspection, typing-extensions, tenacity, diskcache, starlette-context
#   tokenizer/        the default model's tokenizer directory (tokenizer.json, tokenizer_config.json)
# llama-cpp-python's Python package comes from the sdist through PYTHONPATH. Re-runnable: finished steps
# are skipped, and steps still running in the background when the call's time is up are waited for.
set -uo pipefail
CARRY=$(cd "${CARRY:?}" && pwd); WORK=${WORK:-/root/gpu}; OUT=${OUT:-/tmp/out}; DEADLINE=$((SECONDS + ${BUDGET_S:-500}))
REPO=$(cd "$(dirname "$0")/.." && pwd)
SRC=$WORK/llama_cpp_python-0.3.36; BUILD=$WORK/build; MODEL=$WORK/model/random-llama-1b-f16.gguf
mkdir -p "$WORK" "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; grep -m1 "model name" /proc/cpuinfo
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site6 "$CARRY"/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site6:$SRC LLAMA_CPP_LIB_PATH=$BUILD/bin PYTHONUNBUFFERED=1
# The libraries are built with the image's /opt/gcc; a Python extension loaded earlier can bring an older
# libstdc++ whose locale facets crash std::regex in llama.cpp's tokenizer: load the compiler's own first.
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6)
[ -d "$SRC" ] || tar -xzf "$CARRY/llama-src.tar.gz" -C "$WORK"

. "$REPO/scripts/device_steps.sh"
run_once build "cmake -S $SRC/vendor/llama.cpp -B $BUILD -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
  -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  && cmake --build $BUILD --target llama llama-server -j $(nproc)"
run_once model "python3 $REPO/scripts/make_random_model.py $CARRY/tokenizer $WORK/model $SRC/vendor/llama.cpp"
wait_for build || exit $?
wait_for model || exit $?
echo "build and model ready after ${SECONDS}s"; ls -la "$BUILD/bin" | head -20
# The scheduler's C steps, as `pip install -e .` would build them (setup.py); the gateway runs from the tree here.
${CC:-gcc} -O3 -fopenmp-simd -Wall -shared -fPIC -o "$REPO/engines/llamacpp/_steps.so" "$REPO/engines/llamacpp/steps.c" || exit 1
cd "$REPO" && python3 scripts/bench_llamacpp.py --model "$MODEL" --llama-server "$BUILD/bin/llama-server" \
  --gpu-layers 99 --threads 8 --ctx 1024 --parallel 16 --reps "${REPS:-3}" --name bench_llamacpp_gpu "$@"
status=$?
cp bench-results/bench_llamacpp_gpu.* "$OUT"/ 2>/dev/null
mkdir -p "$OUT/logs" && cp "$(ls -td /tmp/bench_llamacpp_gpu-* | head -1)"/*.log "$OUT/logs/"
exit $status
