#!/usr/bin/env bash
# One device call: build against the machine's torch, run the GPU tests and
# (optionally) benchmarks, leave logs and results in $OUT.
#   bash scripts/device_check.sh [tests|moe|e2e|all] [pytest args...]
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/pcg_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PCG_BUILD_TESTS=1 MAX_JOBS=16 PCG_CUDA_ARCHS=${PCG_CUDA_ARCHS:-9.0a}
py=python3
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
$py -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
if [[ $what == tests || $what == all ]]; then
  ctest --test-dir build/cmake --output-on-failure > "$OUT/ctest.log" 2>&1; echo "ctest rc=$?"; tail -5 "$OUT/ctest.log"
  grep -o "std=[^ ]*" build/cmake/build.ninja | sort | uniq -c
  # one pytest process per file: a crash in one file does not hide the others
  files=("$@"); [ ${#files[@]} -gt 0 ] || files=(tests/test_*.py)
  for f in "${files[@]}"; do
    $py -m pytest -q --timeout 900 "$f" > "$OUT/pytest_$(basename "$f" .py).log" 2>&1
    echo "$f rc=$? $(tail -1 "$OUT/pytest_$(basename "$f" .py).log")"
  done
  cat "$OUT"/pytest_*.log | grep -E "^(FAILED|ERROR)|Error|Fatal" | head -40
fi
if [[ $what == moe || $what == all ]]; then
  $py bench/moe.py --out "$OUT" ${MOE_ARGS:-} 2>&1 | tee "$OUT/moe.log" | tail -80
fi
if [[ $what == e2e || $what == all ]]; then
  $py bench/e2e.py --out "$OUT" ${E2E_ARGS:-} 2>&1 | tee "$OUT/e2e.log" | tail -40
fi
