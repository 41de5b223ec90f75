#!/usr/bin/env bash
# One-shot check of the fused extension on a CUDA machine (no internet needed; uses the torch
# already installed there). Builds resode._C with CUDA, runs the CUDA tests and the CPU fused
# tests, runs the benchmark on the GPU and prints a summary table last. Every step has a
# timeout; the whole script stays under ~9 minutes. Logs go to $OUT (default
# /tmp/resode_gpu_check), flat, at most 8 files.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Env: PYTHON (interpreter with torch; default: first of python3/python that imports torch),
#      TORCH_CUDA_ARCH_LIST (default: the visible GPU's arch), MAX_JOBS (default: nproc).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/resode_gpu_check}"
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3 python; do
    if command -v "$c" >/dev/null && timeout 60 "$c" -c "import torch" 2>/dev/null; then
      PY="$c"; break
    fi
  done
fi
if [ -z "$PY" ]; then echo "gpu_check: no python with torch found" | tee "$OUT/summary.txt"; exit 1; fi

timeout 60 "$PY" - <<'EOF' 2>&1 | tee "$OUT/build.log"
import torch, torch.utils.cpp_extension as ce
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-", "CUDA_HOME", ce.CUDA_HOME)
EOF
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(timeout 60 "$PY" -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "9.0")
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# compile the CUDA sources whenever a toolkit is there (CUDA_HOME, nvcc on PATH, /usr/local/cuda)
NVCC=""
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC="$CUDA_HOME/bin/nvcc"
elif command -v nvcc >/dev/null; then NVCC="$(command -v nvcc)"
elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -n "$NVCC" ]; then
  export RESODE_FORCE_CUDA=1  # setup.py finds the toolkit root (nvcc wrappers included)
  echo "nvcc: $NVCC" | tee -a "$OUT/build.log"
else
  echo "nvcc: none found -- the CUDA kernels cannot be built here" | tee -a "$OUT/build.log"
fi
export RESODE_CACHE_DIR="${RESODE_CACHE_DIR:-/tmp/resode_ext_cache}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rm -f resode/_C*.so

# 1. build (editable install; fall back to an in-place build; the JIT build is the last resort,
#    triggered by the first import of the fused stages)
BUILD=fail
echo "== pip install --no-build-isolation --no-deps -e . (arch $TORCH_CUDA_ARCH_LIST)" | tee -a "$OUT/build.log"
timeout 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >>"$OUT/build.log" 2>&1
PIP_RC=$?
if [ "$PIP_RC" = 0 ]; then
  BUILD=pip
elif [ "$PIP_RC" != 124 ]; then  # a timeout would only repeat itself
  echo "== pip failed ($PIP_RC); trying setup.py build_ext --inplace" | tee -a "$OUT/build.log"
  if timeout 180 "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1; then BUILD=inplace; fi
fi
echo "build: $BUILD after $(elapsed)s" | tee -a "$OUT/build.log"
STATUS=$(timeout 150 "$PY" -c "import resode._ext as e; print(e.extension_available())" 2>&1 | tail -1)
echo "extension: $STATUS" | tee -a "$OUT/build.log"

# 2. tests: CUDA parity (refine, drift report, auto included) / bf16 / reverse / torch.compile
#    (inductor, three backward modes), then the CPU fused tests
export RESODE_REQUIRE_EXTENSION=1
timeout 240 "$PY" -m pytest tests/test_fused_cuda.py -q -x -p no:cacheprovider >"$OUT/test_cuda.log" 2>&1
CUDA_RC=$?
timeout 180 "$PY" -m pytest tests/test_fused.py -q -p no:cacheprovider >"$OUT/test_cpu.log" 2>&1
CPU_RC=$?
echo "tests done after $(elapsed)s"

# 3. benchmark on the GPU (narrow MLP, tiny conv b128 d32, the GPU target b256 d64, wide MLP)
LEFT=$(( 420 - $(elapsed) ))
[ "$LEFT" -lt 45 ] && LEFT=45
timeout "$LEFT" "$PY" benchmarks/fused_vs_generic.py --device cuda --out "$OUT" \
  --configs narrow_mlp tiny_conv_b256_d64 tiny_conv wide_mlp >"$OUT/bench.log" 2>&1
BENCH_RC=$?

# 3b. the peers benchmark (issue 6) on the GPU, quick sizes
timeout 130 "$PY" benchmarks/peers.py --device cuda --quick --out /tmp/resode_peers >/tmp/resode_peers.log 2>&1
PEERS_RC=$?
cp /tmp/resode_peers/peers.md "$OUT/peers.md" 2>/dev/null || tail -5 /tmp/resode_peers.log

# 4. summary (last)
{
  echo "================ resode gpu_check summary ($(elapsed)s) ================"
  echo "build:      $BUILD"
  echo "extension:  $STATUS"
  echo "cuda tests: rc=$CUDA_RC  $(tail -1 "$OUT/test_cuda.log")"
  echo "cpu tests:  rc=$CPU_RC  $(tail -1 "$OUT/test_cpu.log")"
  echo "benchmark:  rc=$BENCH_RC"
  echo "peers:      rc=$PEERS_RC"
  [ -f "$OUT/peers.md" ] && grep -E '^[|]' "$OUT/peers.md" | head -40
  if [ -f "$OUT/fused_vs_generic_cuda.md" ]; then
    grep -E '^\|' "$OUT/fused_vs_generic_cuda.md"
  else
    tail -20 "$OUT/bench.log"
  fi
} | tee "$OUT/summary.txt"
