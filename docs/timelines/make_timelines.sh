#!/usr/bin/env bash
# The timeline picture of each mode (docs/timeline.md), the same documents in one run, on a GPU:
#   bash docs/timelines/make_timelines.sh MODELS_DIR CORPUS_DIR [OUT_DIR]
# MODELS_DIR: a MinerU model tree (mineru_vram.testing.write_random_models writes one offline).
# Writes OUT_DIR/gpu-<mode>.png and OUT_DIR/gpu-<mode>/ (timeline.csv, phases.csv, events.jsonl).
# Environment: DEVICE (default cuda:0), PYTHON (default python3), VLM_DIR (random VLM, written if absent),
# MODES (default "raw session isolated engine").
set -euo pipefail
MODELS=$1
CORPUS=$2
OUT=${3:-docs/timelines}
DEVICE=${DEVICE:-cuda:0}
PY=${PYTHON:-python3}
VLM=${VLM_DIR:-/tmp/mineru-vram-random-vlm}
HERE=$(cd "$(dirname "$0")" && pwd)
DOCS=("$CORPUS/demo2.pdf" "$CORPUS/test.pdf" "$CORPUS/demo3.pdf")
mkdir -p "$OUT"
"$PY" -c "from mineru_vram.testing import write_random_vlm as w; w('$VLM')"
for mode in ${MODES:-raw session isolated engine}; do
  echo "=== $mode"
  "$PY" -m mineru_vram timeline -o "$OUT/gpu-$mode" --device "$DEVICE" --title "$mode: demo2, test, demo3" -- \
    "$PY" "$HERE/timeline_workload.py" --mode "$mode" --models-dir "$MODELS" --vlm-dir "$VLM" \
    --device "$DEVICE" "${DOCS[@]}" || echo "$mode exited with status $?"
  cp "$OUT/gpu-$mode/timeline.png" "$OUT/gpu-$mode.png"
done
