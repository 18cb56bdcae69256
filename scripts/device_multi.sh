#!/usr/bin/env bash
# One device call on a machine with >= 2 GPUs: build, the multi-GPU EP runs
# (bench/ep.py under torchrun, tests/test_ep.py), compute-sanitizer over every
# kernel, the GPU test files, a per-kernel profile of fused_moe. Logs go to
# $OUT/logs.tar.gz (few files come back from the device).
#   bash scripts/device_multi.sh [pytest files...]
set -uo pipefail
OUT=${OUT:-/tmp/pcg_out}; mkdir -p "$OUT/logs"; L=$OUT/logs
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PCG_BUILD_TESTS=1 MAX_JOBS=32 PCG_CUDA_ARCHS=${PCG_CUDA_ARCHS:-9.0a}
py=python3
ngpu=$($py -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi topo -m > "$L/topo.txt" 2>&1; head -5 "$L/topo.txt"
$py -c 'import torch; n=torch.cuda.device_count(); print("gpus", n, "p2p", [torch.cuda.can_device_access_peer(0, j) for j in range(1, n)])'
t0=$(date +%s)
$py -m pip install -q --no-build-isolation --no-deps -e . > "$L/build.log" 2>&1 || { tail -60 "$L/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
deadline=$(( t0 + ${BUDGET_S:-560} ))  # leave time to pack the logs
step() {  # step NAME SECONDS CMD...: run with a time limit, log, print the tail
  local name=$1 limit=$2; shift 2
  local s=$(date +%s)
  local left=$(( deadline - s - 10 ))
  if [ "$left" -lt 20 ]; then echo "== $name skipped (out of time)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" > "$L/$name.log" 2>&1
  echo "== $name rc=$? $(( $(date +%s) - s )) s"; tail -${TAIL:-4} "$L/$name.log"
}
if [ "$ngpu" -ge 2 ]; then
  TAIL=40 step ep_bench 240 torchrun --nproc-per-node "$ngpu" bench/ep.py --out "$OUT" ${EP_ARGS:-}
fi
step test_ep 240 $py -m pytest -q -x tests/test_ep.py -k "cuda or opcheck or capture"
TAIL=12 step memcheck 150 compute-sanitizer --tool memcheck $py scripts/sanitize_kernels.py
TAIL=12 step racecheck 150 compute-sanitizer --tool racecheck $py scripts/sanitize_kernels.py
for f in "$@"; do
  step "pytest_$(basename "$f" .py)" 200 $py -m pytest -q "$f"
done
grep -hE "^(FAILED|ERROR)" "$L"/pytest_*.log 2>/dev/null | head -30
[ -n "${PROFILE:-}" ] && TAIL=40 step profile 120 $py bench/profile_moe.py
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$L"
