#!/usr/bin/env bash
# make demo: trains the tiny model on the built-in synthetic tasks through every curriculum stage
# (about two minutes on 2 cores), evaluates, reports, and draws the metrics.
# Usage: launch/demo.sh BUILD_DIR RUN_DIR
set -euo pipefail
build=${1:-build}
run=${2:-runs/demo}
if [ -e "$run" ]; then
  echo "demo: moving the previous demo run to $run.old"
  rm -rf "$run.old"
  mv "$run" "$run.old"
fi
echo "demo: training configs/tiny.pbtxt ($("$build/bin/hydra-params" configs/tiny.pbtxt | awk '/^  \(/{print $1" parameters"}' | tr -d '('))"
"$build/bin/hydra-train" --config configs/tiny.pbtxt --out "$run" --no-print-config
"$build/bin/hydra-plot" "$run"
echo "  resolved config  $run/config.pbtxt"
echo "  plots            $run/plots/*.png (loss, accuracy, sparsity, memory, ...)"
echo "Continue this run for more steps:  $build/bin/hydra-train --config configs/tiny.pbtxt --out $run --resume auto --steps 1000"
