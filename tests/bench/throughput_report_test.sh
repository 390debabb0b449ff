#!/bin/bash
# bench/throughput_report.py on rows with known values: the tables, the ratios, and the targets
# table (each target met or not, against the faster of our Transformers, a row with an error left
# out of the ratios).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/hydra-report.XXXXXX)
trap 'rm -rf "$work"' EXIT
cat > "$work/rows.jsonl" <<'ROWS'
{"model": "toy-parallel", "seq": 512, "batch": 64, "tokens_per_s": 800000, "mfu": 0.08, "peak_mb": 7000}
{"model": "toy-parallel", "seq": 2048, "batch": 16, "tokens_per_s": 700000, "mfu": 0.08, "peak_mb": 7000}
{"model": "toy-parallel", "seq": 8192, "batch": 4, "tokens_per_s": 660000, "mfu": 0.08, "peak_mb": 7000}
{"model": "toy-parallel", "seq": 32768, "batch": 1, "tokens_per_s": 620000, "mfu": 0.07, "peak_mb": 7000}
{"model": "transformer-toy", "seq": 512, "batch": 64, "tokens_per_s": 1600000, "mfu": 0.3, "peak_mb": 8000}
{"model": "transformer-toy", "seq": 2048, "batch": 16, "tokens_per_s": 700000, "mfu": 0.2, "peak_mb": 8000}
{"model": "transformer-toy", "seq": 8192, "batch": 4, "tokens_per_s": 400000, "mfu": 0.2, "peak_mb": 8000}
{"model": "transformer-toy", "seq": 32768, "batch": 1, "error": "exit 1: out of memory"}
{"model": "transformer-toy-cudnn", "seq": 8192, "batch": 4, "tokens_per_s": 600000, "mfu": 0.3, "peak_mb": 8000}
{"model": "torch-transformer", "seq": 8192, "batch": 4, "tokens_per_s": 500000, "mfu": 0.2, "peak_mb": 9000}
{"model": "hydra-1.6b", "seq": 8192, "batch": 4, "tokens_per_s": 50000, "mfu": 0.36, "peak_mb": 110000}
{"model": "hydra-1.6b-recompute", "seq": 8192, "batch": 4, "tokens_per_s": 40000, "mfu": 0.3, "peak_mb": 90000}
{"model": "toy-ssd", "seq": 2048, "batch": 16, "tokens_per_s": 840000, "mfu": 0.09, "peak_mb": 7500}
{"model": "hydra-1.6b-ssd", "seq": 8192, "batch": 4, "tokens_per_s": 56000, "mfu": 0.356, "peak_mb": 118000}
ROWS
python3 "$root/bench/throughput_report.py" "$work/rows.jsonl" --gpu test --date 2000-01-01 --docs "$work" > "$work/out.txt"
fail() { echo "FAILED: $*"; cat "$work/out.txt"; exit 1; }
expect() { grep -qF -- "$1" "$work/out.txt" || fail "missing: $1"; }
expect "| toy-parallel | 800K | 700K | 660K | 620K |"
expect "| toy-parallel / transformer-toy | 0.50 | 1.00 | 1.65 |  |"
expect "| toy-parallel vs transformer-toy >= 1.0x at 2K | 1.00x | yes |"
# at 8K the baseline is the faster Transformer: the one on cuDNN's attention
expect "| toy-parallel vs transformer-toy-cudnn >= 1.5x at 8K | 1.10x | no |"
expect "| toy-parallel / transformer-toy-cudnn |  |  | 1.10 |  |"
expect "| toy-parallel within 25% from 512 to 32K | 22% apart | yes |"
expect "| toy-parallel >= 1.3x PyTorch at 8K | 1.32x | yes |"
expect "| hydra-1.6b >= 35% MFU at 8K (batch 4) | 36.0% | yes |"
# each toy form and each hydra-1.6b 8K row gets its own targets
expect "| toy-ssd vs transformer-toy >= 1.0x at 2K | 1.20x | yes |"
expect "| toy-ssd / transformer-toy |  | 1.20 |  |  |"
expect "| hydra-1.6b-ssd >= 35% MFU at 8K (batch 4) | 35.6% | yes |"
expect "| hydra-1.6b batch 4 at 8K in 80 GB with recompute | 87.9 GiB | no |"
# transformer-toy's 32K row is an error: no ratio and no 32K target
if grep -qF "at 32K |" "$work/out.txt"; then fail "a 32K ratio target from an error row"; fi
[ -s "$work/bench/throughput-test-2000-01-01.json" ] || fail "no JSON rows written"
python3 -c "import json,sys; rows=json.load(open(sys.argv[1])); assert len(rows) == 14" \
  "$work/bench/throughput-test-2000-01-01.json" || fail "the JSON rows differ from the input"
echo "throughput_report: tables, ratios and targets as expected"
