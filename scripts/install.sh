#!/usr/bin/env bash
# Create .venv (unless PCG_VENV points elsewhere), install the pinned
# requirements and pcg itself (editable; CMake builds libpcg_ops).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PCG_VENV:-$root/.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
# nvidia-cutlass provides headers only: skip its Python dependencies (cuda-python, scipy, ...).
"$py" -m pip install -q -r <(grep -v '^nvidia-cutlass' "$root/requirements.txt")
"$py" -m pip install -q --no-deps $(grep '^nvidia-cutlass' "$root/requirements.txt")
export PATH="$venv/bin:$PATH"
# Build against the torch just installed (no build isolation: see pyproject.toml).
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$py" -m pip install -q --no-build-isolation --no-deps -e "$root"
"$py" -c "import pcg, torch; print('pcg', pcg.__version__, 'torch', torch.__version__, 'CUDA kernels:', pcg._library.has_cuda_kernels())"
