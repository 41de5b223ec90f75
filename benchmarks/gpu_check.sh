#!/usr/bin/env bash
# One-shot check of the fused extension on a CUDA machine (no internet needed; uses the torch
# already installed there), sized for a short GPU lease. Phases, in order (each with a timeout,
# the whole run inside $GPU_CHECK_BUDGET seconds):
#
#   build   use a prebuilt resode/_C for this Python if it loads with CUDA kernels
#           (RESODE_GPU_PREBUILT=1, e.g. built elsewhere against the same torch), else build
#           (pip -e ., then setup.py build_ext --inplace)
#   probe   every op called with a bad argument on CUDA tensors must raise (issue 11 item 4);
#           on a crash, a backtrace with cuda-gdb when it is there
#   tests   tests/test_fused_cuda*.py (parity of every CUDA path with the generic engine)
#   bench   benchmarks/fused_vs_generic.py --device cuda (issue 11's targets, side by side)
#   peers   benchmarks/peers.py --device cuda --quick
#   cost    benchmarks/paper_cost.py --device cuda (measured step times of the paper presets;
#           COST_EXPERIMENTS picks the experiments, default tied-depth heun-depth)
#   devprobe  with a prebuilt module: also build the extension HERE (in the background, while the
#           tests run) and repeat the probe against that build (item 4 concerns builds made on
#           the GPU machine)
#
#   bash benchmarks/gpu_check.sh                    # all phases, from the repository root
#   GPU_CHECK_PHASES="build tests" bash benchmarks/gpu_check.sh
#
# Logs go to $OUT (default /tmp/resode_gpu_check), flat, at most 8 files; summary.txt last.
# Env: PYTHON (interpreter with torch; default: first of python3/python that imports torch),
#      TORCH_CUDA_ARCH_LIST (default: the visible GPU's arch), MAX_JOBS (default: nproc),
#      GPU_CHECK_BUDGET (seconds, default 480), BENCH_CONFIGS (fused_vs_generic --configs).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/resode_gpu_check}"
mkdir -p "$OUT"
T0=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-480}"
PHASES="${GPU_CHECK_PHASES:-build probe tests bench peers}"
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { local l=$(( BUDGET - $(elapsed) )); [ "$l" -lt 20 ] && l=20; echo "$l"; }
has() { case " $PHASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# timeout of a phase: at most $1 seconds, no more than the budget leaves with $2 seconds kept
# back for later phases, and at least $3 (default 20)
cap() {
  local l=$(( $(left) - ${2:-0} )) floor=${3:-20}
  [ "$l" -lt "$floor" ] && l=$floor; [ "$l" -gt "$1" ] && l=$1; echo "$l"
}

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3 python; do
    if command -v "$c" >/dev/null && timeout 60 "$c" -c "import torch" 2>/dev/null; then
      PY="$c"; break
    fi
  done
fi
if [ -z "$PY" ]; then echo "gpu_check: no python with torch found" | tee "$OUT/summary.txt"; exit 1; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RESODE_CACHE_DIR="${RESODE_CACHE_DIR:-/tmp/resode_ext_cache}"

timeout 60 "$PY" - <<'EOF' 2>&1 | tee "$OUT/build.log"
import sys, torch, torch.utils.cpp_extension as ce
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-", "CUDA_HOME", ce.CUDA_HOME)
EOF
ext_status() { timeout 150 "$PY" -c "import resode._ext as e; print(e.extension_available())" 2>&1 | tail -1; }

# 1. build
BUILD=skipped
if has build; then
  STATUS=""
  if [ "${RESODE_GPU_PREBUILT:-0}" = 1 ]; then
    STATUS=$(ext_status)
    echo "prebuilt: $STATUS" | tee -a "$OUT/build.log"
  fi
  case "$STATUS" in
    *"cuda=True"*"source='prebuilt'"*) BUILD=prebuilt ;;
    *)
      if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        TORCH_CUDA_ARCH_LIST=$(timeout 60 "$PY" -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "9.0")
      fi
      export TORCH_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-$(nproc)}" RESODE_FORCE_CUDA=1
      rm -f resode/_C*.so
      echo "== pip install --no-build-isolation -e . (arch $TORCH_CUDA_ARCH_LIST)" | tee -a "$OUT/build.log"
      if timeout "$(cap 240)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >>"$OUT/build.log" 2>&1; then
        BUILD=pip
      else
        echo "== pip failed; setup.py build_ext --inplace" | tee -a "$OUT/build.log"
        if timeout "$(cap 200)" "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1; then BUILD=inplace; else BUILD=fail; fi
      fi ;;
  esac
fi
STATUS=$(ext_status)
echo "build: $BUILD after $(elapsed)s; extension: $STATUS" | tee -a "$OUT/build.log"
export RESODE_REQUIRE_EXTENSION=1
DEVBUILD_PID=""
if has devprobe; then  # a second build, made here, for the probe only (out of the source tree)
  ( export RESODE_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    rm -rf /tmp/devpkg && mkdir -p /tmp/devpkg && cp -r resode /tmp/devpkg/ && rm -f /tmp/devpkg/resode/_C*.so
    timeout 300 "$PY" setup.py build_ext --build-lib /tmp/devlib --build-temp /tmp/devtmp \
      >/tmp/devbuild.log 2>&1 && cp /tmp/devlib/resode/_C*.so /tmp/devpkg/resode/ ) &
  DEVBUILD_PID=$!
fi

# 2. probe: bad calls on CUDA must raise
PROBE=skipped
if has probe; then
  timeout "$(cap 90)" "$PY" -m pytest tests/test_fused_cuda_errors.py tests/test_fused.py \
    -k "raises_on_a_bad_argument" -q -p no:cacheprovider >"$OUT/probe.log" 2>&1
  PROBE=$?
  if [ "$PROBE" != 0 ] && command -v cuda-gdb >/dev/null; then
    PYTHONPATH="tests:$PYTHONPATH" "$PY" -c "import test_fused as t, sys; open('/tmp/bad.py','w').write(t._BAD_CALLS.replace('d = dict(dtype=torch.float64)', 'd = dict(dtype=torch.float64, device=\"cuda\")'))" \
      2>>"$OUT/probe.log" || true
    ( cd tests && timeout 120 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" \
        --args "$(command -v "$PY")" /tmp/bad.py ) >>"$OUT/probe.log" 2>&1
  fi
  echo "probe: rc=$PROBE after $(elapsed)s"
fi

# 3. CUDA tests (no -x: every failure is listed)
TESTS=skipped
if has tests; then
  KEEP=0; has bench && KEEP=120; has peers && KEEP=$(( KEEP + 60 ))
  timeout "$(cap 240 "$KEEP" 90)" "$PY" -m pytest tests/test_fused_cuda.py -q -rf -p no:cacheprovider \
    >"$OUT/test_cuda.log" 2>&1
  TESTS=$?
  echo "tests: rc=$TESTS after $(elapsed)s"
fi

# 3b. the probe against the build made here
DEVPROBE=skipped
if [ -n "$DEVBUILD_PID" ]; then
  wait "$DEVBUILD_PID"
  if ls /tmp/devpkg/resode/_C*.so >/dev/null 2>&1; then
    echo "== devprobe: the build made on this machine" >>"$OUT/probe.log"
    PYTHONPATH="/tmp/devpkg:$PYTHONPATH" timeout "$(cap 60)" "$PY" -m pytest \
      tests/test_fused_cuda_errors.py tests/test_fused.py -k "raises_on_a_bad_argument" -q \
      -p no:cacheprovider >>"$OUT/probe.log" 2>&1
    DEVPROBE=$?
  else
    DEVPROBE=build-failed; tail -30 /tmp/devbuild.log >>"$OUT/probe.log"
  fi
  echo "devprobe: $DEVPROBE after $(elapsed)s"
fi

# 4. benchmark on the GPU (issue 11's configurations)
BENCH=skipped
if has bench; then
  P=""; has peers && P=60
  timeout "$(cap 400 "${P:-0}")" "$PY" benchmarks/fused_vs_generic.py --device cuda --out "$OUT" \
    --steps "${BENCH_STEPS:-7}" \
    --configs ${BENCH_CONFIGS:-narrow_mlp narrow_mlp_bf16 wide_mlp tiny_conv_b256_d64} >"$OUT/bench.log" 2>&1
  BENCH=$?
  echo "bench: rc=$BENCH after $(elapsed)s"
fi

# 5. the peers benchmark on the GPU, quick sizes
PEERS=skipped
if has peers; then
  timeout "$(cap 130)" "$PY" benchmarks/peers.py --device cuda --quick --out /tmp/resode_peers >/tmp/resode_peers.log 2>&1
  PEERS=$?
  cp /tmp/resode_peers/peers.md "$OUT/peers.md" 2>/dev/null || tail -5 /tmp/resode_peers.log
fi

# 5b. measured GPU step times of the paper presets (whatever time is left)
COST=skipped
if has cost; then
  timeout "$(cap 300)" "$PY" benchmarks/paper_cost.py --device cuda --out /tmp/resode_cost \
    --experiments ${COST_EXPERIMENTS:-tied-depth heun-depth} >/tmp/resode_cost.log 2>&1
  COST=$?
  cp /tmp/resode_cost/paper_cost.md "$OUT/paper_cost.md" 2>/dev/null || tail -5 /tmp/resode_cost.log
fi

# 6. summary (last)
{
  echo "================ resode gpu_check summary ($(elapsed)s of $BUDGET) ================"
  echo "build:      $BUILD  $STATUS"
  echo "probe:      rc=$PROBE  $( [ -f "$OUT/probe.log" ] && grep -E 'passed|failed|error' "$OUT/probe.log" | tail -1)"
  echo "devprobe:   $DEVPROBE $( [ -f "$OUT/probe.log" ] && grep -E 'passed|failed|error' "$OUT/probe.log" | tail -1)"
  echo "cuda tests: rc=$TESTS  $( [ -f "$OUT/test_cuda.log" ] && tail -1 "$OUT/test_cuda.log")"
  [ -f "$OUT/test_cuda.log" ] && grep -E '^FAILED|^ERROR' "$OUT/test_cuda.log" | head -30
  echo "benchmark:  rc=$BENCH"
  echo "peers:      rc=$PEERS"
  echo "cost:       rc=$COST"
  [ -f "$OUT/fused_vs_generic_cuda.md" ] && grep -E '^\|' "$OUT/fused_vs_generic_cuda.md"
  [ "$BENCH" != skipped ] && [ ! -f "$OUT/fused_vs_generic_cuda.md" ] && tail -20 "$OUT/bench.log"
  [ -f "$OUT/peers.md" ] && grep -E '^[|]' "$OUT/peers.md" | head -40
  [ -f "$OUT/paper_cost.md" ] && grep -E '^[|]' "$OUT/paper_cost.md" | head -30
} | tee "$OUT/summary.txt"
