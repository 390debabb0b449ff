# A toy-model run with every path on (one stage), for timing: toy_all.sh PRECISION STEPS BATCH SEQ
set -e
{ sed -n '/^model {/,/^}/p' configs/toy.pbtxt
  echo "train { steps: $2 batch_size: $3 seq_len: $4 eval_batches: 1 log_every: 5 recompute: BLOCK precision: $1"
  echo "  lr { kind: COSINE lr: 0.0006 warmup_steps: 5 min_lr_ratio: 0.1 } optimizer { weight_decay: 0.1 grad_clip: 1.0 } }"
} > /tmp/toy_all_$1.pbtxt
