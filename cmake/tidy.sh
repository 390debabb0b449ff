#!/usr/bin/env bash
# clang-tidy (Debian's) with the repository's .clang-tidy over the tracked C++ sources (not tests,
# not CUDA: nvcc's warnings cover those), using BUILD_DIR/compile_commands.json. Prints each finding
# and fails when there is one. Usage: cmake/tidy.sh [BUILD_DIR] [FILE...]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
shift || true
command -v clang-tidy > /dev/null || { echo "tidy: clang-tidy is not installed (apt-get install clang-tidy)" >&2; exit 2; }
[ -f "$build/compile_commands.json" ] || { echo "tidy: no $build/compile_commands.json (configure first: make build)" >&2; exit 2; }
if [ $# -gt 0 ]; then
  files=("$@")
else
  mapfile -t files < <(git ls-files '*.cpp' | grep -v '^tests/')
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
printf '%s\n' "${files[@]}" | xargs -P "$(nproc)" -n 4 clang-tidy -p "$build" --quiet > "$out" 2> /dev/null || true
if grep -q ': warning: \|: error: ' "$out"; then
  grep -A3 ': warning: \|: error: ' "$out"
  echo "tidy: $(grep -c ': warning: \|: error: ' "$out") finding(s) in ${#files[@]} files" >&2
  exit 1
fi
echo "tidy: ${#files[@]} files clean"
