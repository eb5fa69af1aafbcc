# Sourced by the GPU benchmark scripts (bench_gpu.sh, bench_vllm_gpu.sh): long steps that outlive one
# device call. Needs WORK (where each step's .started/.log/.done files go) and DEADLINE (in $SECONDS).

run_once() {  # name, command: runs detached so that it outlives this call; writes $WORK/name.done when over
  [ -e "$WORK/$1.started" ] && return; touch "$WORK/$1.started"
  # The subshell sends all of a compound command's output to the log, and an `exit` in it still writes .done.
  setsid bash -c "($2) > $WORK/$1.log 2>&1; echo \$? > $WORK/$1.done" < /dev/null &
}

wait_for() {  # name: 0 when it ended well, 1 when it failed, 3 when this call's time is up first
  while [ ! -e "$WORK/$1.done" ]; do
    if [ $SECONDS -ge $DEADLINE ]; then echo "$1 still running; call again"; tail -n 5 "$WORK/$1.log"; return 3; fi
    sleep 5
  done
  [ "$(cat "$WORK/$1.done")" = 0 ] || { echo "$1 failed"; tail -n 40 "$WORK/$1.log"; return 1; }
}
