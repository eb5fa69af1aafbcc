#!/usr/bin/env bash
# Benchmark 2 on a CUDA machine: the gateway's vLLM engine against `vllm serve`, on one GPU, or on two.
#
#   python3 -m venv .venv-vllm-cuda && .venv-vllm-cuda/bin/pip install -e '.[vllm]'   # once: CUDA vLLM
#   make setup && .venv/bin/pip install -e '.[bench]'                                 # once: the client side
#   scripts/bench_vllm_gpu.sh [bench_vllm.py arguments]    # e.g. --concurrency 1,8,16,64 --reps 10
#   scripts/bench_vllm_gpu.sh --multi-gpu [bench_vllm.py arguments]   # 2 GPUs: tensor parallel 2, then data parallel 2
#
# It makes a random-weight 1 B Llama once (scripts/make_random_model.py; throughput does not depend on the
# weights) and runs scripts/bench_vllm.py: both servers from VLLM_PYTHON on the same model, each given
# --gpu-memory-utilization 0.4 (both hold the card at once). Results go to bench-results/ (NAME.json, NAME.md).
# --multi-gpu runs it twice, each server spread the same way over GPUs 0 and 1: --tensor-parallel-size 2 (NAME_tp2),
# then --data-parallel-size 2 (NAME_dp2), at 1/16/64/256 streams with 256 sequences a batch; later arguments win.
#
# Environment (all optional):
#   PYTHON       the gateway's Python, which runs the client and makes the model (default .venv/bin/python)
#   VLLM_PYTHON  a Python with CUDA vLLM and this project installed (default .venv-vllm-cuda/bin/python)
#   WORK         model folder (default ~/.cache/llm-gateway/gpu)
#   MODEL        a Hugging Face model directory to use instead of the random 1 B Llama
#   TOKENIZER    the tokenizer for the random model (default models/SmolLM2-135M-Instruct.Q4_1.gguf, from `make models`)
#   NAME         result name (default bench_vllm_gpu)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
VLLM_PYTHON=${VLLM_PYTHON:-$REPO/.venv-vllm-cuda/bin/python}
WORK=${WORK:-$HOME/.cache/llm-gateway/gpu}
TOKENIZER=${TOKENIZER:-$REPO/models/SmolLM2-135M-Instruct.Q4_1.gguf}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -z "${MODEL:-}" ]; then
  MODEL=$WORK/model/hf
  [ -d "$MODEL" ] || "$PYTHON" "$REPO/scripts/make_random_model.py" "$TOKENIZER" "$WORK/model"
fi
cd "$REPO"
bench() {
  "$PYTHON" scripts/bench_vllm.py --python "$VLLM_PYTHON" --model "$MODEL" --gpu-memory-utilization 0.4 "$@"
}
if [ "${1:-}" != --multi-gpu ]; then
  bench --name "${NAME:-bench_vllm_gpu}" "$@"
  exit
fi
shift
PRESET=(--concurrency 1,16,64,256 --max-num-seqs 256 --start-timeout 600)
bench --tensor-parallel-size 2 "${PRESET[@]}" --name "${NAME:-bench_vllm_gpu}_tp2" "$@"
bench --data-parallel-size 2 "${PRESET[@]}" --name "${NAME:-bench_vllm_gpu}_dp2" "$@"
