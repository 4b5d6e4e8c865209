#!/usr/bin/env bash
# Data-parallel generation: each process generates its share of the prompts, only the main
# process writes files (to OUT_DIR, default ./generated, relative to the current folder). On a GPU machine: NUM_PROCESSES=8 MODEL=/path/to/flux BACKEND=flash.
# Without GPUs it runs the same way on CPU processes (gloo), with a tiny random-weight pipeline.
#
#   bash examples/multi_gpu_generate.sh [OUT_DIR]
set -euo pipefail
OUT="$(realpath -m "${1:-generated}")"  # relative to where it is run, before the cd below
cd "$(dirname "$0")/.."
NUM_PROCESSES="${NUM_PROCESSES:-2}"
BACKEND="${BACKEND:-sdpa}"
if [ -n "${MODEL:-}" ]; then SRC=(--model "$MODEL"); else SRC=(--tiny sd --steps 2 --height 64 --width 64); fi
LAUNCH=(--num_processes "$NUM_PROCESSES" --num_machines 1 --mixed_precision no --dynamo_backend no)
if [ "$NUM_PROCESSES" -gt 1 ]; then LAUNCH+=(--multi_gpu); fi
PYTHON="${PYTHON:-python}"
"$PYTHON" -m accelerate.commands.launch "${LAUNCH[@]}" scripts/generate.py "${SRC[@]}" \
  --backend "$BACKEND" --out "$OUT" \
  --prompt "a lighthouse at dusk" --prompt "a red fox in the snow" \
  --prompt "a bowl of ramen" --prompt "a city at night, rain"
