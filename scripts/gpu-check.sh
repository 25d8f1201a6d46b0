#!/usr/bin/env bash
# Runs the CUDA tests and the GPU benchmark on a machine with an NVIDIA GPU and no Rust or
# network, from binaries built elsewhere by scripts/gpu-build.sh. Run from the repository
# root: scripts/gpu-check.sh [BIN_DIR]   (default gpu-bin)
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-gpu-bin}
[ -x "$bin/lockstep" ] || { echo "no $bin/lockstep: build it with scripts/gpu-build.sh and copy $bin here" >&2; exit 2; }
nvidia-smi -L || echo "nvidia-smi not found"

# NCCL may exist only inside Python's nvidia-nccl-* package; cudarc loads libnccl.so or
# libnccl.so.<major>, so expose it under those names.
libdir=$(mktemp -d)
nccl=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
paths = site.getsitepackages() + [site.getusersitepackages()]
for p in paths:
    for f in glob.glob(os.path.join(p, "nvidia", "nccl*", "lib", "libnccl.so*")):
        print(f); raise SystemExit
PY
)
if [ -n "$nccl" ]; then
  ln -sf "$nccl" "$libdir/libnccl.so"
  ln -sf "$nccl" "$libdir/libnccl.so.2"
  echo "NCCL: $nccl"
else
  echo "NCCL: not found in Python packages"
fi
export LD_LIBRARY_PATH="$libdir:${LD_LIBRARY_PATH:-}"

status=0
for t in "$bin"/tests/*; do
  echo "== $(basename "$t")"
  "$t" --nocapture --test-threads 1 || status=1
done
echo "== lockstep train configs/mnist-mlp.toml --device cuda"
"$bin/lockstep" train configs/mnist-mlp.toml --device cuda --quiet --out runs/gpu-mnist-mlp || status=1
echo "== lockstep bench mlp --device cuda"
"$bin/lockstep" bench mlp --device cuda --batch 1024 --steps 200 || status=1
exit $status
