#!/usr/bin/env bash
# Developer build into a private folder: scripts/dev_build.sh [BUILD_DIR]
# Then: PCG_LIBRARY=$BUILD_DIR/libpcg_ops.so PYTHONPATH=python pytest tests/...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build/dev}
py=${PYTHON:-python3}
# CMake >= 3.31 knows nvcc's C++20 dialect; prefer the one next to $py (pip cmake).
cmake=$(dirname "$(command -v "$py")")/cmake
[ -x "$cmake" ] || cmake=cmake
mkdir -p "$(dirname "$build")"
mapfile -t args < <("$py" "$root/scripts/cmake_args.py")
"$cmake" -S "$root" -B "$build" "${args[@]}" -DCMAKE_BUILD_TYPE=Release > "$build.configure.log" 2>&1 || { cat "$build.configure.log"; exit 1; }
"$cmake" --build "$build" -j "${JOBS:-2}"
echo "built $build/libpcg_ops.so"
