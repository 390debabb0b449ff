# Where the toy step's wall time goes: the same steps of the toy model (every path on, batch 16 x 2048)
# with the model's statistics every step or never, and with the memories switched off.
#   bash bench/toy_attribution.sh [PRECISION] [STEPS]     (from the repository root, on a GPU machine;
#   hydra-train from PATH, e.g. the bundle's env.sh, or build/bin)
set -e
P=${1:-BF16_MIXED}
STEPS=${2:-20}
TRAIN=$(command -v hydra-train || echo build/bin/hydra-train)
bash bench/toy_all.sh "$P" "$STEPS" 16 2048
C=/tmp/toy_all_$P.pbtxt
variant() {  # NAME STAGE-FLAGS: the toy config with one stage of those switches
  cp "$C" "/tmp/toy_$1.pbtxt"
  echo "curriculum { stage { name: \"s\" steps: $STEPS seq_len: 2048 batch_size: 16 $2 } }" >> "/tmp/toy_$1.pbtxt"
}
variant nopkm "pkm: false"
variant nows "workspace: false"
variant nomem "workspace: false pkm: false"
run() {  # LABEL CONFIG ARGS...
  local out
  out=$(mktemp -d)
  printf '%-44s ' "$1"
  "$TRAIN" --config "$2" --device cuda --eval-every 0 --save-every 0 --out "$out" "${@:3}" 2>&1 |
    grep -o '[0-9]* tokens/s (median)'
  rm -rf "$out"
}
run "every path, statistics every step" "$C" --set train.stats_every=1
run "every path, no statistics" "$C" --set train.stats_every=100000
run "no PKM" /tmp/toy_nopkm.pbtxt --set train.stats_every=100000
run "no workspace memory" /tmp/toy_nows.pbtxt --set train.stats_every=100000
run "neither memory" /tmp/toy_nomem.pbtxt --set train.stats_every=100000
