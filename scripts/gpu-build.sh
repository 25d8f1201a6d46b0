#!/usr/bin/env bash
# Builds, on a machine with Rust, everything scripts/gpu-check.sh runs on a GPU machine
# without it: the release binary and every test executable, copied into gpu-bin/
# (ignored by git; pass it to the device as a carried path).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-bin}
rm -rf "$out" && mkdir -p "$out/tests"
cargo build --release
cp target/release/lockstep "$out/"
cargo test --workspace --release --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    # Only kernels/nn tests: the end-to-end tests bake in the paths of this checkout.
    pkg = m.get("package_id", "")
    wanted = ("lockstep-kernels" in pkg) or ("lockstep-nn" in pkg) or ("/kernels#" in pkg) or ("/nn#" in pkg)
    if m.get("reason") == "compiler-artifact" and exe and m.get("profile", {}).get("test") and wanted:
        shutil.copy(exe, os.path.join(sys.argv[1], "tests", os.path.basename(exe)))
' "$out"
# Debug info off: the device tool carries at most 64 MiB.
strip --strip-debug "$out/lockstep" "$out"/tests/*
du -sh "$out"
ls -la "$out" "$out/tests"
