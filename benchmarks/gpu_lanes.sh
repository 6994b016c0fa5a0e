#!/usr/bin/env bash
# Several GPUs of one host: the set-up of gpu_run.sh once, then one lane of gpu_run.sh steps per GPU,
# side by side, each lane pinned to its own share of the CPU cores. A lane is one argument: words with
# '=' set that lane's environment (a "+" in a value stands for a space), the rest are gpu_run.sh steps. Lane N uses
# GPU N (CUDA_VISIBLE_DEVICES=N) and writes /tmp/res/gpuN/ and /tmp/res/gpuN.log. Example (4 GPUs):
#   bash benchmarks/gpu_lanes.sh "DOCS=200 ISO_MODES=session,isolated isolation:520" \
#        "TASKS=200 LOOP_TASKS=80 queue:520" "ENGINE_DOCS=3 engine:300" "TL_MODES=raw+isolated+engine timelines:300"
# Results are packed into $OUT/results.tgz every 30 s, so a call cut off at its limit still returns them.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/res "$OUT"
NO_TAR=1 bash benchmarks/gpu_run.sh || exit 1
ncpu=$(nproc)
per=$(( ncpu / $# ))
pids=()
i=0
for lane in "$@"; do
  vars=() steps=()
  for word in $lane; do
    case $word in *=*) vars+=("${word//+/ }") ;; *) steps+=("$word") ;; esac
  done
  pin=()
  command -v taskset >/dev/null && pin=(taskset -c "$(( i * per ))-$(( (i + 1) * per - 1 ))")
  echo "lane $i: GPU $i, ${pin[*]:-no pinning}, ${vars[*]:-} ${steps[*]}"
  env CUDA_VISIBLE_DEVICES=$i SKIP_SETUP=1 NO_TAR=1 R=/tmp/res/gpu$i "${vars[@]}" \
    "${pin[@]}" bash benchmarks/gpu_run.sh "${steps[@]}" > /tmp/res/gpu$i.log 2>&1 &
  pids+=($!)
  i=$(( i + 1 ))
done
( while sleep 30; do tar czf "$OUT/results.tgz" -C /tmp/res . 2>/dev/null; done ) &
snap=$!
wait "${pids[@]}"
kill $snap
tar czf "$OUT/results.tgz" -C /tmp/res .
for log in /tmp/res/gpu*.log; do echo "##### $log"; grep -v "| INFO \|| DEBUG \|it/s\]\|s/it\]" "$log" | tail -n 25; done
echo "=== lanes done $(date +%T)"
