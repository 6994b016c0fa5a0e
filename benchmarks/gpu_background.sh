#!/usr/bin/env bash
# Runs gpu_lanes.sh in the background across calls (docs/BENCHMARKS.md says how it is called). One
# call is at most 10 minutes; a run of lanes that takes longer is started in a session of its own,
# which outlives the call while the machine stays warm, and later calls wait for it and take the
# results back:
#   bash benchmarks/gpu_background.sh start "<lane>" "<lane>" ...   # after gpu_setup.sh; returns at once
#   bash benchmarks/gpu_background.sh wait 570                      # until done or 570 s; results to $OUT
# The background run lives only as long as the machine: it goes back 30 s after a call ends and after
# 30 minutes held (at the end of the call then in flight), whatever runs. So the wait calls must follow
# one another at once, and set-up plus the run must end inside those 30 minutes; run H lost two
# 1,000-request web runs to a few minutes' pause between calls and to the 30-minute mark.
set -u
case ${1:-} in
  start)
    shift
    rm -f /tmp/lanes.done
    setsid nohup bash -c 'OUT=/tmp/out bash benchmarks/gpu_lanes.sh "$@" > /tmp/lanes.log 2>&1; touch /tmp/lanes.done' \
      lanes "$@" > /dev/null 2>&1 &
    sleep 5
    echo "lanes started $(date +%T)"; cat /tmp/lanes.log ;;
  wait)
    limit=${2:-570}
    for i in $(seq 1 "$limit"); do [ -f /tmp/lanes.done ] && break; sleep 1; done
    [ -f /tmp/lanes.done ] && echo "=== lanes finished" || echo "=== still running after ${limit}s $(date +%T)"
    for log in /tmp/res/gpu*.log; do
      echo "##### $log"; grep -v "| INFO \\|| DEBUG \\|it/s\\]\\|s/it\\]" "$log" | tail -n 15
    done
    tar czf "$OUT/results.tgz" -C /tmp/res . ;;
  *) echo "usage: $0 start LANE... | wait SECONDS"; exit 2 ;;
esac
