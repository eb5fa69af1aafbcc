#!/usr/bin/env bash
# Benchmark 2 on the GPU machine (device tool): the gateway's vLLM engine against `vllm serve`, with vLLM
# 0.25.0 installed from the wheels that ../shared/gpu/prepare_vllm_wheels.sh packs into .whl/p1..pN, on a
# random-weight 1 B Llama (scripts/make_random_model.py).
# 1. Stage the wheels, one call per part, back to back while the machine stays warm:
#      STAGE=.whl/pK bash scripts/bench_vllm_gpu.sh          (carry [".whl/pK"])
# 2. Then run (carry the folder holding tokenizer/, the default model's tokenizer directory):
#      CARRY=.dev-gpu bash scripts/bench_vllm_gpu.sh [bench_vllm.py arguments]
#    It installs vLLM and makes the model once, starts scripts/bench_vllm.py detached (it outlives the call)
#    and waits for it until BUDGET_S; if it is still running then, call step 2 again to keep waiting.
#    The result files are copied to $OUT. Wheels in $CARRY/whl (what the gateway imports beyond the image and
#    vLLM's wheels: pydantic-settings, python-dotenv, tenacity; py-spy for --profile-seconds) are installed too.
#    STAGE and CARRY together stage that part first, then run.
set -uo pipefail
STAGED=/root/stage; WORK=${WORK:-/root/vllm}; OUT=${OUT:-/tmp/out}; DEADLINE=$((SECONDS + ${BUDGET_S:-540}))
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${STAGE:-}" ]; then
  mkdir -p "$STAGED" && cp "$STAGE"/* "$STAGED"/ && echo "staged $(ls "$STAGED" | wc -l) files" || exit 1
  [ -n "${CARRY:-}" ] || exit 0
fi
CARRY=$(cd "${CARRY:?}" && pwd)
mkdir -p "$WORK" "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
if [ ! -e "$WORK/installed" ]; then
  cd "$STAGED" || exit 1
  if ls vllm.whl.part.* > /dev/null 2>&1; then
    cat vllm.whl.part.* > vllm-0.25.0-cp38-abi3-manylinux_2_28_x86_64.whl && rm vllm.whl.part.*
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STAGED"/*.whl $(ls "$CARRY"/whl/*.whl 2>/dev/null) || exit 1
  touch "$WORK/installed"
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
cd "$REPO" || exit 1

. "$REPO/scripts/device_steps.sh"
run_once model "python3 scripts/make_random_model.py $CARRY/tokenizer $WORK/model"
wait_for model || exit $?
step=${STEP:-bench}  # another STEP name runs the benchmark again on the same machine
run_once "$step" "python3 scripts/bench_vllm.py --python python3 --model $WORK/model/hf --name bench_vllm_gpu $*"
wait_for "$step"; status=$?
grep -E "^rep|^cpu|^py-spy|^\|" "$WORK/$step.log" | tail -n 80
name=bench_vllm_gpu; prev=""; for a in "$@"; do [ "$prev" = --name ] && name=$a; prev=$a; done
cp bench-results/"$name".* "$OUT"/ 2>/dev/null
tar czf "$OUT/$name-extra.tgz" -C bench-results $(cd bench-results && ls -d "$name"-* 2>/dev/null) 2>/dev/null
exit $status
