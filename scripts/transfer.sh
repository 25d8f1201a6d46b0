#!/usr/bin/env bash
# T37/T38 end to end: train on digits 0-4, then fine-tune on 5-9 with a frozen backbone,
# with LoRA adapters and fully (backbone lr ×0.1), each on WORKERS data-parallel workers, and
# print accuracy, trainable parameters and all-reduced bytes per step for each mode.
# Usage: scripts/transfer.sh [OUT_DIR] [extra --set ...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/transfer}
shift || true
workers=${WORKERS:-2}
bin=${LOCKSTEP:-target/release/lockstep}
cfg=configs/mnist-transfer.toml
"$bin" local --quiet --workers "$workers" "$cfg" --out "$out/base" "$@"
common=(--set 'data.labels=[5,6,7,8,9]' --set "finetune.init_from=$out/base/model.safetensors"
        --set finetune.replace_head=true "$@")
"$bin" local --quiet --workers "$workers" "$cfg" --out "$out/frozen" "${common[@]}" \
  --set 'finetune.freeze=["fc0","fc1"]'
"$bin" local --quiet --workers "$workers" "$cfg" --out "$out/lora" "${common[@]}" \
  --set 'finetune.lora={layers=["fc0","fc1"],rank=8,alpha=16}'
"$bin" local --quiet --workers "$workers" "$cfg" --out "$out/full" "${common[@]}" \
  --set 'finetune.lr_groups=[{layers=["fc0","fc1"],lr_scale=0.1}]'
"$bin" local --quiet --workers "$workers" "$cfg" --out "$out/scratch" --set 'data.labels=[5,6,7,8,9]' "$@"
"$bin" merge-lora "$out/lora/model.safetensors" -o "$out/lora/merged.safetensors"
printf '%-9s %10s %12s %16s\n' mode "test acc" trainable "allreduce B/step"
for mode in base frozen lora full scratch; do
  python3 - "$out/$mode/summary.json" "$mode" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:<9} {100 * s['test_accuracy']:9.2f}% {s['trainable_params']:12d} {s['allreduce_bytes_per_step']:16d}")
PY
done
