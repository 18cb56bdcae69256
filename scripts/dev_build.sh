#!/usr/bin/env bash
# Developer build into a private folder: scripts/dev_build.sh [BUILD_DIR]
# Then: PCG_LIBRARY=$BUILD_DIR/libpcg_ops.so PYTHONPATH=python pytest tests/...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build/dev}
py=${PYTHON:-python3}
mkdir -p "$(dirname "$build")"
mapfile -t args < <("$py" "$root/scripts/cmake_args.py")
cmake -S "$root" -B "$build" "${args[@]}" -DCMAKE_BUILD_TYPE=Release > "$build.configure.log" 2>&1 || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "${JOBS:-2}"
echo "built $build/libpcg_ops.so"
