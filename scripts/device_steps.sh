#!/usr/bin/env bash
# One device call: build against the machine's torch (or use a library prebuilt
# here from the same sources: scripts/prebuild_device_lib.sh, carry .prebuilt),
# then run the named steps
# in order, each with a time limit, inside an overall budget ($BUDGET_S,
# default 560 s, counted from the start of the build). Logs are packed into
# $OUT/logs.tar.gz (few files come back from the device); JSON/PNG results of
# the benchmarks land in $OUT.
#   bash scripts/device_steps.sh STEP...
# Steps:
#   ep_bench        torchrun bench/ep.py on every GPU ($EP_ARGS)
#   ep_comm, ep_e2e one part of it ($EP_COMM_ARGS / $EP_E2E_ARGS); "ep_comm@A=1,B=2"
#                   runs the comm part again with those environment settings (NCCL tuning)
#   test_ep         tests/test_ep.py GPU/capture/opcheck tests (2-GPU ones need 2 GPUs)
#   memcheck, racecheck   compute-sanitizer over scripts/sanitize_kernels.py
#   tests/X.py      one pytest file, with -q (extra pytest arguments in $PYTEST_ARGS, shell words,
#                   e.g. "-m gpu -k 'a or b'"; another -q there drops the summary line)
#   scripts/X.py    one diagnostic script (a diagnostic that reads the built library)
#   profile         bench/profile_moe.py ($PROFILE_ARGS)
#   ncu             Nsight Compute counters of fused_moe's kernels ($NCU_ARGS: profile_moe.py arguments;
#                   $NCU_KERNELS: kernel-name regex, default moe_)
#   tune            bench/tune_moe.py ($TUNE_ARGS; limit $TUNE_LIMIT_S, default 400 s): rewrites
#                   csrc/moe/fused_moe_tuning.h, copied to $OUT
#   rebuild         build again (e.g. after tune wrote a new table: the sources no longer
#                   match a carried .prebuilt library, so this one compiles)
#   moe             bench/moe.py ($MOE_ARGS)
#   e2e             bench/e2e.py ($E2E_ARGS)
#   split           bench/split_cost.py ($SPLIT_ARGS): where pcg loses time vs one whole graph
#   attn            bench/attention.py ($ATTN_ARGS): one attention split, short kernel vs flash
#   e2e_startup     bench/e2e.py --startup-only (a fresh process; run after e2e)
#   accuracy        bench/accuracy.py ($ACC_ARGS)
#   router          bench/router.py ($ROUTER_ARGS): pcg.wrap router="model" vs "pcg"
#   untuned         bench/untuned.py ($UNTUNED_ARGS)
#   bg:STEP         STEP in the background on the last GPU (one-GPU steps, on a
#                   machine with several), while the next steps use the first
#   wait            wait for the background steps
set -uo pipefail
OUT=${OUT:-/tmp/pcg_out}; mkdir -p "$OUT/logs"; L=$OUT/logs
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PCG_BUILD_TESTS=1 MAX_JOBS=${MAX_JOBS:-32} PCG_CUDA_ARCHS=${PCG_CUDA_ARCHS:-9.0a}
export PCG_CACHE_DIR=${PCG_CACHE_DIR:-/tmp/pcg_cache}
py=python3
ngpu=$($py -c 'import torch; print(torch.cuda.device_count())')
echo "gpus: $ngpu"
t0=$(date +%s)
deadline=$(( t0 + ${BUDGET_S:-560} ))
build() {
  local s=$(date +%s) lib=$PWD/.prebuilt/libpcg_ops.so
  # A library prebuilt here from these very sources (scripts/prebuild_device_lib.sh,
  # carried as .prebuilt) saves the build, if it loads.
  if [ -f .prebuilt/STAMP ] && [ "$(bash scripts/source_stamp.sh)" = "$(cat .prebuilt/STAMP)" ] &&
     PCG_LIBRARY=$lib PYTHONPATH=$PWD/python $py -c "import pcg" > "$L/prebuilt.log" 2>&1; then
    export PCG_LIBRARY=$lib PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
    echo "build: prebuilt library (.prebuilt, stamp $(cat .prebuilt/STAMP))"
    return 0
  fi
  [ -f .prebuilt/STAMP ] && echo "build: .prebuilt is stale or does not load; building"
  unset PCG_LIBRARY
  $py -m pip install -q --no-build-isolation --no-deps -e . > "$L/build.log" 2>&1 || { tail -60 "$L/build.log"; return 1; }
  echo "build: $(( $(date +%s) - s )) s"
}
step() {  # step NAME LIMIT TAIL CMD...
  local name=$1 limit=$2 tl=$3; shift 3
  local s=$(date +%s) left=$(( deadline - $(date +%s) - 10 ))
  if [ "$left" -lt 20 ]; then echo "== $name skipped (out of time)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" > "$L/$name.log" 2>&1
  echo "== $name rc=$? $(( $(date +%s) - s )) s"; tail -"$tl" "$L/$name.log"
}
build || exit 1
ncomm=0
run_step() {
  local st=$1
  case $st in
    ep_bench) [ "$ngpu" -ge 2 ] && step ep_bench 300 40 torchrun --nproc-per-node "$ngpu" bench/ep.py --out "$OUT" ${EP_ARGS:-} ;;
    ep_comm|ep_comm@*) envs=""; tag=ep_comm
               if [ "$st" != ep_comm ]; then
                 envs=${st#ep_comm@}; envs=${envs//,/ }; ncomm=$(( ncomm + 1 )); tag=ep_comm_$ncomm
               fi
               [ "$ngpu" -ge 2 ] && step "$tag" 300 40 env $envs torchrun --nproc-per-node "$ngpu" \
               bench/ep.py --part comm --out "$OUT/$tag" ${EP_COMM_ARGS:-} ;;
    ep_e2e) [ "$ngpu" -ge 2 ] && step ep_e2e 300 40 torchrun --nproc-per-node "$ngpu" bench/ep.py --part e2e \
               --out "$OUT/ep_e2e" ${EP_E2E_ARGS:-} ;;
    test_ep) step test_ep 300 4 $py -m pytest -q tests/test_ep.py -k "cuda or opcheck or capture" ;;
    memcheck|racecheck) step "$st" 150 12 compute-sanitizer --tool "$st" $py scripts/sanitize_kernels.py ;;
    scripts/*.py) step "$(basename "$st" .py)" 300 40 $py "$st" ;;
    tests/*.py) eval "pyargs=(${PYTEST_ARGS:-})"  # shell words: -k "a or b" stays one argument
                step "pytest_$(basename "$st" .py)" 300 4 $py -m pytest -q "$st" "${pyargs[@]}" ;;
    profile) step profile 150 40 $py bench/profile_moe.py ${PROFILE_ARGS:-} ;;
    ncu) step ncu 240 80 ncu --kernel-name "regex:${NCU_KERNELS:-moe_}" --section SpeedOfLight --section Occupancy \
           --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats \
           $py bench/profile_moe.py --plain --iters 1 ${NCU_ARGS:---shapes qwen3 --tokens 1 16384} ;;
    tune) step tune ${TUNE_LIMIT_S:-400} 60 $py bench/tune_moe.py --out-json "$OUT/tune.json" ${TUNE_ARGS:-}; cp csrc/moe/fused_moe_tuning.h "$OUT/" ;;
    rebuild) build ;;
    moe) step moe 400 70 $py bench/moe.py --out "$OUT" ${MOE_ARGS:-} ;;
    e2e) step e2e 400 40 $py bench/e2e.py --out "$OUT" ${E2E_ARGS:-} ;;
    split) step split 200 60 $py bench/split_cost.py --out "$OUT" ${SPLIT_ARGS:-} ;;
    attn) step attn 200 30 $py bench/attention.py --out "$OUT" ${ATTN_ARGS:-} ;;
    e2e_startup) step e2e_startup 200 4 $py bench/e2e.py --out "$OUT" --startup-only ${E2E_ARGS:-} ;;
    accuracy) step accuracy 200 40 $py bench/accuracy.py --out "$OUT" ${ACC_ARGS:-} ;;
    router) step router 300 30 $py bench/router.py --out "$OUT" ${ROUTER_ARGS:-} ;;
    untuned) step untuned 300 60 $py bench/untuned.py --out "$OUT/untuned.json" ${UNTUNED_ARGS:-} ;;
    *) echo "unknown step $st" ;;
  esac
}
for st in "$@"; do
  case $st in
    bg:*) ( export CUDA_VISIBLE_DEVICES=$(( ngpu - 1 )); run_step "${st#bg:}" ) & ;;
    wait) wait ;;
    *) run_step "$st" ;;
  esac
done
wait
grep -hE "^(FAILED|ERROR)" "$L"/pytest_*.log 2>/dev/null | head -30
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$L"
