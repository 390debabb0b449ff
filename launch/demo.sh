#!/usr/bin/env bash
# make demo: train the tiny model on the built-in synthetic tasks through every curriculum stage,
# evaluate, and report. Usage: launch/demo.sh BUILD_DIR RUN_DIR
set -euo pipefail
build=${1:-build}
run=${2:-runs/demo}
if [ -e "$run/metrics.jsonl" ]; then
  echo "demo: $run holds an earlier demo run; moving it to $run.old"
  rm -rf "$run.old"
  mv "$run" "$run.old"
fi
"$build/bin/hydra-train" --config configs/tiny.pbtxt --out "$run" --report
