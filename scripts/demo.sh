#!/usr/bin/env bash
# Install, then run the demo on the built-in default model (CPU or GPU).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/install.sh"
venv=${PCG_VENV:-$root/.venv}
exec "$venv/bin/python" -m pcg.demo "$@"
