#!/usr/bin/env bash
# A hash of everything the native library is built from (csrc/, the CMake and
# setup files): scripts/prebuild_device_lib.sh writes it next to a prebuilt
# library, scripts/device_steps.sh uses that library only when it matches.
set -euo pipefail
cd "$(dirname "$0")/.."
{ find csrc -type f | LC_ALL=C sort; echo CMakeLists.txt; echo setup.py; echo scripts/cmake_args.py; } |
  while read -r f; do printf '%s  ' "$f"; sha256sum < "$f"; done | sha256sum | cut -c1-16
