#!/usr/bin/env python3
"""Writes the per-step loss trace of a run recorded with `--set train.log_every=1` (and
`--set 'train.blowup.action="off"'`, so the guard cannot change the trajectory) in the form
worker/tests/blowup_traces.rs replays: a header line, then `loss grad_norm` per step.

    scripts/loss-trace.py RUN_DIR CONFIG SEED > worker/tests/loss_traces/NAME.txt
"""
import json
import sys

run_dir, config, seed = sys.argv[1:4]
rows = []
with open(f"{run_dir}/metrics.jsonl") as f:
    for line in f:
        record = json.loads(line)
        if record.get("kind") == "train":
            rows.append((record["step"], record["loss"], record["grad_norm"]))
steps = [s for s, _, _ in rows]
if steps != list(range(1, len(rows) + 1)):
    sys.exit(f"{run_dir}: not one train record per step (run with --set train.log_every=1)")
print(f"# {config} seed={seed} steps={len(rows)}: loss grad_norm per step, from metrics.jsonl")
for _, loss, grad_norm in rows:
    print(f"{loss:.6e} {grad_norm:.6e}")
