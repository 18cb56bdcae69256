#!/usr/bin/env bash
# Copy the CUTLASS headers pcg needs into third_party/cutlass (git-ignored), for
# machines without a package index (the GPU machine): CMake prefers that folder.
#   PYTHON=/path/to/python bash scripts/vendor_cutlass.sh
# Source: the nvidia-cutlass wheel (requirements.txt) of $PYTHON, or
# CUTLASS_SRC=<dir holding include/ and tools/util/include/>.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
src=${CUTLASS_SRC:-}
if [ -z "$src" ]; then
  # find_spec: no import (the package's __init__ needs optional dependencies).
  src=$("$py" -c "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(os.path.dirname(s.origin), 'source') if s else '')")
fi
if [ -z "$src" ] || [ ! -f "$src/include/cutlass/cutlass.h" ]; then
  echo "vendor_cutlass: no CUTLASS headers found (pip install --no-deps nvidia-cutlass==4.2.0.0, or set CUTLASS_SRC)" >&2
  exit 1
fi
dst=$root/third_party/cutlass
rm -rf "$dst"
mkdir -p "$dst/tools/util"
cp -r "$src/include" "$dst/include"
cp -r "$src/tools/util/include" "$dst/tools/util/include"
# Record the source version (the wheel's version when it came from one).
ver=$("$py" -c "import importlib.metadata as m; print(m.version('nvidia-cutlass'))" 2>/dev/null || echo unknown)
echo "nvidia-cutlass $ver from $src" > "$dst/VERSION"
echo "vendored CUTLASS headers into $dst ($(du -sh "$dst" | cut -f1))"
