#!/usr/bin/env bash
# Decoding speed against the context length: hydra-generate's tokens per second after prompts of
# CONTEXTS tokens, for Hydra (toy, every path on) and transformer-toy, batch 1, greedy, on one
# device. Each model is trained for one step (its weights do not change the cost) with
# model.max_seq_len raised to fit the longest prompt plus the new tokens. A recurrent model's cost
# a token should stay flat; a Transformer's KV-cache attention grows with the context.
#
# Usage: bench/generate.sh BIN_DIR OUT_DIR [MODEL ...]   (MODEL: toy, transformer-toy; default both)
# Environment: CONTEXTS (default "1024 8192 32768"), NEW (new tokens, 256), DEVICE (cuda).
# Writes OUT_DIR/rows.jsonl (one hydra-generate --json object a row, with model and context added)
# and prints a table.
set -uo pipefail
bin=${1:?usage: bench/generate.sh BIN_DIR OUT_DIR [MODEL ...]}
out=${2:?usage: bench/generate.sh BIN_DIR OUT_DIR [MODEL ...]}
shift 2
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(toy transformer-toy)
contexts=${CONTEXTS:-"1024 8192 32768"}
new=${NEW:-256}
device=${DEVICE:-cuda}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
rows="$out/rows.jsonl"
: > "$rows"
longest=0
for c in $contexts; do [ "$c" -gt "$longest" ] && longest=$c; done
max_len=$(( (longest + new + 1023) / 1024 * 1024 ))
# A prompt of letters, digits and spaces, as long as the longest context (the same for every model).
python3 -c "
import random, sys
r = random.Random(7)
sys.stdout.write(''.join(r.choice('abcdefghijklmnopqrstuvwxyz0123456789 ') for _ in range($longest)))
" > "$out/prompt.txt"
for m in "${models[@]}"; do
  run="$out/run-$m"
  rm -rf "$run"
  "$bin/hydra-train" --config "$here/configs/$m.pbtxt" --out "$run" --no-print-config --quiet \
    --set 'curriculum={}' --set train.device="$device" --set train.steps=1 \
    --set train.seq_len=1024 --set train.batch_size=1 --set train.eval_every=0 \
    --set train.eval_batches=1 --set train.save_every=1 --set model.max_seq_len="$max_len" \
    > "$run.log" 2>&1 || { echo "hydra-train $m failed: $(tail -3 "$run.log")"; continue; }
  for c in $contexts; do
    head -c "$c" "$out/prompt.txt" > "$out/prompt-$c.txt"
    if "$bin/hydra-generate" "$run" --prompt-file "$out/prompt-$c.txt" --temperature 0 \
        --max-new-tokens "$new" --json "$out/gen-$m-$c.json" -q > /dev/null 2> "$out/gen-$m-$c.log"; then
      python3 -c "
import json, sys
r = json.load(open('$out/gen-$m-$c.json'))
r.update(model='$m', context=$c, device='$device')
r.pop('samples')
print(json.dumps(r))" >> "$rows"
    else
      echo "hydra-generate $m at $c failed: $(tail -3 "$out/gen-$m-$c.log")"
    fi
  done
done
python3 - "$rows" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| model | context | prompt (s) | prompt tokens/s | decode tokens/s | ms a token |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    ms = 1e3 * r["decode_s"] / max(r["decode_steps"], 1)
    print(f"| {r['model']} | {r['context']} | {r['prefill_s']:.3f} | {r['prompt_tokens'] / r['prefill_s']:,.0f} "
          f"| {r['decode_tokens_per_s']:.1f} | {ms:.2f} |")
PY
