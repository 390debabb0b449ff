#!/bin/bash
# An export read by another framework: for each form of the model, a short tiny run is exported with
# `hydra-ckpt export`, `hydra-eval --text` gives our loss on a text, and bench/hydra_torch.py (the
# model written in PyTorch from the export's metadata alone) must reproduce it within 1e-5
# (relative; both sides compute in fp32 or better on the same fp32 weights). Cases: every path on;
# the curriculum's first stage (the export's metadata says which paths are on); FIRST_TOKEN
# routing with the PARALLEL workspace write, SILU experts, a shared expert and no controller; the
# paper's SSM (one state per channel, no convolution); the Transformer baseline. The SSD form is
# refused by the reader (exit 3). Gates start at 1 so that every path's output weighs in the loss.
# Skipped (exit 77) where PyTorch is not installed (CI); run on the GPU machine.
#
#   tests/launch/torch_export_test.sh BIN_DIR
set -uo pipefail
bin=${1:?usage: torch_export_test.sh BIN_DIR}
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}
"$python" -c "import torch" 2> /dev/null || { echo "SKIPPED: no PyTorch for $python"; exit 77; }
work=$(mktemp -d /tmp/hydra-torch-test.XXXXXX)
[ -n "${HYDRA_TEST_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
printf 'F QGO=fk\nC xkcdq|xkcdq\nR ab:7 cd:2 ef:9 ?cd:2\nH c>k,x>w,a>c,k>q,w>e ?a=q\nM 3 7 11 15 19\nP a>b,b>c ' > "$work/text.txt"
quick=(--config "$root/configs/tiny.pbtxt" --quiet --set train.steps=2 --set train.seq_len=64
       --set train.batch_size=2 --set train.eval_batches=1 --set model.block.ssm_gate_init=1
       --set model.block.sga_gate_init=1 --set model.block.moe_gate_init=1
       --set model.block.memory_gate_init=1)
failed=0
# case NAME EXPECTED_PYTHON_EXIT [hydra-train --set ...]
case_() {
  local name=$1 want=$2
  shift 2
  local run="$work/$name"
  if ! "$bin/hydra-train" "${quick[@]}" --out "$run" "$@" > "$run.log" 2>&1; then
    echo "FAILED: $name: hydra-train: $(tail -n 3 "$run.log")"; failed=1; return
  fi
  "$bin/hydra-ckpt" export "$run" --out "$run.safetensors" > /dev/null || { failed=1; return; }
  local loss
  loss=$("$bin/hydra-eval" "$run" --text "$work/text.txt" --json - |
         "$python" -c "import json, sys; print(json.load(sys.stdin)['loss'])") || { failed=1; return; }
  "$python" "$root/bench/hydra_torch.py" "$run.safetensors" --text "$work/text.txt" \
    --expect "$loss" --tolerance 1e-5 > "$run.torch" 2>&1
  local rc=$?
  if [ "$rc" != "$want" ]; then
    echo "FAILED: $name: hydra_torch.py exit $rc, expected $want: $(tail -n 3 "$run.torch")"
    failed=1
  else
    echo "ok: $name (ours $loss): $(tail -n 1 "$run.torch")"
  fi
}
case_ every-path 0 --set 'curriculum={}'
case_ first-stage 0 --set 'curriculum={stage {name: "backbone" steps: 2 sga: false moe_routing: false workspace: false pkm: false}}'
case_ first-token-parallel-silu-shared 0 --set 'curriculum={}' --set model.moe.router_input=FIRST_TOKEN \
  --set model.workspace.write=PARALLEL --set model.moe.expert=SILU --set model.moe.shared_expert=true \
  --set model.block.controller=false
case_ paper-ssm 0 --set 'curriculum={}' --set model.ssm.d_state=1 --set model.ssm.conv_width=0
case_ transformer 0 --set 'curriculum={}' --set model.kind=TRANSFORMER
case_ ssd-refused 3 --set 'curriculum={}' --set model.ssm.form=SSD --set model.ssm.head_dim=16
exit $failed
