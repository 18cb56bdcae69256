#!/usr/bin/env bash
# Build the CUDA library here for the GPU machine and stage it in .prebuilt/
# (ignored by .gitignore) with a stamp of its sources, so scripts/device_steps.sh skips
# its ~2-minute build (device time) when the sources match:
#   PYTHON=/path/to/python-with-the-device's-torch bash scripts/prebuild_device_lib.sh [BUILD_DIR]
#   then carry ".prebuilt" (and "third_party/cutlass") in the device call.
# The Python must have the device's torch (2.11.0+cu130); the library is built
# for sm_90a with the C++ tests, as device_steps.sh would.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build/device-lib}
py=${PYTHON:-python3}
want=${PCG_DEVICE_TORCH:-2.11.0+cu130}
have=$("$py" -c 'import torch; print(torch.__version__)')
if [ "$have" != "$want" ]; then
  echo "prebuild: $py has torch $have, the device has $want: not staging" >&2
  exit 1
fi
PYTHON=$py PCG_CUDA_ARCHS=9.0a PCG_BUILD_TESTS=1 bash "$root/scripts/dev_build.sh" "$build"
mkdir -p "$root/.prebuilt"
cp "$build/libpcg_ops.so" "$root/.prebuilt/"
bash "$root/scripts/source_stamp.sh" > "$root/.prebuilt/STAMP"
echo "staged $(du -h "$root/.prebuilt/libpcg_ops.so" | cut -f1) in .prebuilt/ (stamp $(cat "$root/.prebuilt/STAMP")); carry .prebuilt"
