#!/usr/bin/env bash
# Runs on the lent GPU machine (docs/BENCHMARKS.md says how it is called): set-up, then the named steps.
#   bash benchmarks/gpu_run.sh overhead isolation plugintests timelines engine queue session gputests
# Needs .whl (MinerU's wheels: ../shared/tools/device-wheels.sh .whl, plus pytest's) and .devcarry/corpus.
# Everything is written under /tmp/res and packed into $OUT/results.tgz (the tool returns at most 8 files).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# gpu_lanes.sh runs the set-up once and then this script per GPU with SKIP_SETUP=1 and its own R.
export PYTHONPATH=/tmp/site:$PWD/src
# Not installed as a distribution here, so the pytest11 entry point is absent: load the plugin by name
# (PYTEST_PLUGINS reaches pytester's subprocesses too).
export PYTEST_PLUGINS=mineru_vram.pytest_plugin
MODELS=/tmp/mv-models
CORPUS=/tmp/corpus
R=${R:-/tmp/res}
mkdir -p $R
if [ -z "${SKIP_SETUP:-}" ]; then
  # benchmarks/gpu_setup.sh installed the wheels and started building the models in earlier calls.
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $R/card.txt
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  for i in $(seq 1 120); do [ -f /tmp/models.done ] && break; sleep 2; done
  [ -f /tmp/models.done ] && echo "random models ready" || echo "random models NOT ready (see /tmp/models.log)"
fi
# Each step may be given a time limit as STEP:SECONDS, so one slow step cannot cost the others' results.
for arg in "$@"; do
  step=${arg%%:*}
  limit=600
  [ "$arg" != "$step" ] && limit=${arg#*:}
  echo "=== $step (limit ${limit}s) $(date +%T)"
  T="timeout -k 5 $limit"
  case $step in
    session) $T python3 benchmarks/bench_session.py --models-dir $MODELS --corpus $CORPUS --repeat 2 \
               --out $R/session.json 2>$R/session.err | tail -40 ;;
    overhead) $T python3 benchmarks/bench_session.py --models-dir $MODELS --corpus $CORPUS --repeat ${REPEAT:-3} \
               --modes overhead --out $R/overhead.json 2>$R/overhead.err | tail -30 ;;
    gputests) $T python3 -m pytest -p no:cacheprovider tests/gpu -q -rs --vram-models-dir $MODELS ${GPUTEST_ARGS:-} \
               2>&1 | tee $R/gputests.log | tail -30 ;;
    plugintests) $T python3 -m pytest -p no:cacheprovider tests/gpu/test_plugin_gpu.py tests/gpu/test_engine_gpu.py \
               -q -rs --vram-models-dir $MODELS 2>&1 | tee $R/plugintests.log | tail -30 ;;
    isolation) $T python3 benchmarks/bench_isolation.py --models-dir $MODELS --corpus $CORPUS --docs ${DOCS:-200} \
               --modes ${ISO_MODES:-raw,session,isolated} ${ISO_ARGS:-} \
               --out $R/isolation.json 2>$R/isolation.err | tail -50 ;;
    engine) $T python3 benchmarks/bench_engine.py --models-dir $MODELS --corpus $CORPUS \
               --docs ${ENGINE_DOCS:-0} --cold-docs ${ENGINE_COLD_DOCS:-3} ${ENGINE_ARGS:-} \
               --out $R/engine.json 2>$R/engine.err | tail -50 ;;
    queue) $T python3 benchmarks/bench_queue.py --models-dir $MODELS --corpus $CORPUS --tasks ${TASKS:-200} \
               ${LOOP_TASKS:+--loop-tasks $LOOP_TASKS} --max-pages ${MAXPAGES:-1} --out $R/queue.json 2>$R/queue.err | tail -50 ;;
    warm) $T python3 benchmarks/bench_warm.py --models-dir $MODELS --cycles ${WARM_CYCLES:-50} \
               --iso-cycles ${ISO_CYCLES:-3} --out $R/warm.json 2>$R/warm.err | tail -30 ;;
    llama) for i in $(seq 1 90); do [ -f /tmp/gguf.done ] && break; sleep 2; done
           icd=$(find /usr/local/nvidia /usr/share/vulkan /etc/vulkan /usr/lib -name 'nvidia_icd*.json' 2>/dev/null | head -1)
           echo "vulkan ICD: ${icd:-none found}"; [ -n "$icd" ] && export VK_DRIVER_FILES=$icd
           $T python3 benchmarks/bench_llama_cpp.py --corpus $CORPUS --gguf-dir /tmp/gguf-full --models-dir $MODELS --docs ${LLAMA_DOCS:-3} \
               --cold-docs ${LLAMA_COLD:-2} ${LLAMA_ARGS:-} --out $R/llama.json 2>$R/llama.err | tail -40 ;;
    ray) $T python3 benchmarks/bench_ray.py --models-dir $MODELS --docs ${RAY_DOCS:-200} ${RAY_ARGS:-} \
               --out $R/ray.json 2>$R/ray.err | tail -60 ;;
    ray2) # The two-GPU phase on the cards and cores of RAY2_GPUS / RAY2_CPUS (wider than this lane's),
          # once the GPU tests, which may share one of those cards, are done.
          for i in $(seq 1 ${RAY2_WAIT:-300}); do pgrep -f "pytest.*tests/gpu" >/dev/null || break; sleep 1; done
          pin=(); [ -n "${RAY2_CPUS:-}" ] && pin=(taskset -c "$RAY2_CPUS")
          CUDA_VISIBLE_DEVICES=${RAY2_GPUS:-0,1} $T "${pin[@]}" python3 benchmarks/bench_ray.py --models-dir $MODELS \
               --docs ${RAY_DOCS:-200} --phases ray_2gpu ${RAY2_ARGS:-} --out $R/ray2.json 2>$R/ray2.err | tail -60 ;;
    gc) $T python3 benchmarks/bench_gc.py --models-dir $MODELS --corpus $CORPUS --device cuda:0 --pages ${GC_PAGES:-20} \
               --rounds ${GC_ROUNDS:-2} --out $R/gc.json 2>$R/gc.err | tail -30 ;;
    web) for shape in ${WEB_SHAPES:-isolated session}; do
           $T python3 benchmarks/bench_web.py --models-dir $MODELS --corpus $CORPUS --shape $shape \
               --requests ${WEB_REQUESTS:-1000} --loop-requests ${WEB_LOOP:-200} --max-pages ${MAXPAGES:-1} \
               --out $R/web-$shape.json 2>$R/web-$shape.err | tail -40
         done ;;
    timelines) MODES=${TL_MODES:-raw session isolated engine} $T bash docs/timelines/make_timelines.sh $MODELS $CORPUS \
               $R/timelines > $R/timelines.log 2>&1; tail -5 $R/timelines.log; ls $R/timelines ;;
    *) echo "unknown step $step" ;;
  esac
done
[ -z "${NO_TAR:-}" ] && tar czf $OUT/results.tgz -C $R .
echo "=== done $(date +%T)"
