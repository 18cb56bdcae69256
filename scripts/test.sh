#!/usr/bin/env bash
# Install (with the C++ tests), then run ctest and pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if ! [ -f /usr/include/gtest/gtest.h ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq libgtest-dev) >/dev/null
fi
PCG_BUILD_TESTS=1 bash "$root/scripts/install.sh"
venv=${PCG_VENV:-$root/.venv}
ctest="$venv/bin/ctest"; [ -x "$ctest" ] || ctest=ctest
"$ctest" --test-dir "${PCG_BUILD_DIR:-$root/build/cmake}" --output-on-failure
cd "$root" && "$venv/bin/python" -m pytest -q tests "$@"
