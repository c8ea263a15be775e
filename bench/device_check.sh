#!/usr/bin/env bash
# One prepared GPU check for the device machine (H100/H200; torch 2.11 cu130, triton 3.6,
# Python 3.12, nvcc 13.0, ninja, pytest, no network). It gets a copy of the working tree (not
# our venv) and an $OUT folder whose files come back. Run from the repository root:
#
#     bash bench/device_check.sh              # on the GPU machine, OUT set by the tool
#     DRY_RUN=1 bash bench/device_check.sh    # here, on CPU: the same steps, flora-bench --quick
#
# Steps, each under `timeout` and logged to $OUT/log.txt (status and seconds per step in
# $OUT/summary.txt), all inside TOTAL_S (default 470 s, i.e. under 8 minutes):
#   1. nvidia-smi                      -> $OUT/nvidia-smi.txt
#   2. python -m flora_kernels info    (versions, device, backends before the build)
#   3. install without deps (FLORA_SKIP_EXT=1 pip install --no-deps --no-build-isolation -e .),
#      falling back to PYTHONPATH=. when that fails
#   3b. Triton: micro-benchmarks at the benchmark shapes (each gemm_ext variant: tiled kernel,
#      persistent TMA kernel (sm_90+), cuBLAS + addmm, forward / dx / dx + dropout bits, vs F.linear /
#      torch.matmul; every other kernel vs its floor; 180 s: the TMA kernel adds its autotune
#      compiles; python -m
#      tools.microbench -> $OUT/triton_microbench.json), then the bf16
#      GPU correctness tests of the Triton backend (pytest -m gpu tests/backends/triton/test_triton_*.py)
#   4. JIT-build the extension: flora_kernels.backends.ext.build_extension(verbose=True)
#      (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0); a failure is logged and the script goes on
#   5. FLORA_TEST_GPU=1 python -m pytest -q -m gpu tests
#   5b. compute-sanitizer --tool memcheck and --tool racecheck over the op-level CUDA tests
#      (tests/backends/ext/test_ext_gpu.py -k ops_match, tests/backends/ext/test_ext_conv_fused.py -k cuda_ops_match_cpu; 90 s each); in a dry run the commands are logged
#   6. flora-bench --device cuda --out/--md/--plot/--csv $OUT/results.*, with --max-minutes set
#      from the time left so it writes its files before the hard timeout
# Files back (<= 8): log.txt, summary.txt, nvidia-smi.txt, triton_microbench.json, results.{json,md,png,csv}.
# Exit status: 0 when every step passed, else 1 (the log says which failed).

set -u -o pipefail
cd "$(dirname "$0")/.."

DRY_RUN="${DRY_RUN:-0}"
TOTAL_S="${TOTAL_S:-470}"
PY="${PYTHON:-python3}"
if [ "$DRY_RUN" = "1" ]; then
    OUT="${OUT:-$PWD/out/device-dry-run}"
    DEVICE=cpu
    BENCH_DEFAULT="--device cpu --quick --threads ${BENCH_THREADS:-1}"
    [ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
else
    DEVICE=cuda
    BENCH_DEFAULT="--device cuda"
fi
: "${OUT:?set OUT to the folder whose files come back}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
T0=$(date +%s)
FAILED=0

left() { echo $((TOTAL_S - ($(date +%s) - T0))); }

# step NAME LIMIT_S COMMAND...: run under timeout (never past TOTAL_S), log, record status.
step() {
    local name="$1" limit="$2"
    shift 2
    local rem
    rem=$(left)
    if [ "$limit" -gt "$((rem - 5))" ]; then limit=$((rem - 5)); fi
    if [ "$limit" -le 5 ]; then
        echo "== $name: SKIPPED (no time left)" | tee -a "$LOG"
        echo "$name SKIPPED 0s (no time left)" >>"$SUMMARY"
        FAILED=1
        return 1
    fi
    echo "== $name (limit ${limit}s, $(date -u +%H:%M:%S)): $*" | tee -a "$LOG"
    local s rc
    s=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local d=$(($(date +%s) - s))
    local verdict=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMEOUT"; elif [ "$rc" -ne 0 ]; then verdict="FAILED rc=$rc"; fi
    echo "== $name: $verdict after ${d}s" | tee -a "$LOG"
    echo "$name $verdict ${d}s" >>"$SUMMARY"
    [ "$verdict" = ok ] || FAILED=1
    return "$rc"
}

echo "device_check: DRY_RUN=$DRY_RUN device=$DEVICE OUT=$OUT python=$PY total budget ${TOTAL_S}s" | tee -a "$LOG"
git rev-parse HEAD >>"$LOG" 2>&1 || true

# 1. the GPU as we find it (read-only queries; never change its settings)
if [ "$DRY_RUN" = "1" ] && ! command -v nvidia-smi >/dev/null; then
    echo "no nvidia-smi here (dry run)" >"$OUT/nvidia-smi.txt"
    echo "nvidia-smi SKIPPED (dry run, none here)" >>"$SUMMARY"
else
    step nvidia-smi 20 bash -c "nvidia-smi >'$OUT/nvidia-smi.txt' 2>&1; nvidia-smi -q -d CLOCK,POWER,PERFORMANCE >>'$OUT/nvidia-smi.txt' 2>&1"
fi

# 2-3. install (no deps, no extension build: the JIT step below builds it), else PYTHONPATH
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY_RUN" = "1" ]; then
    echo "install SKIPPED (dry run: not touching this machine's venv; PYTHONPATH=.)" | tee -a "$LOG"
    echo "install SKIPPED (dry run)" >>"$SUMMARY"
else
    FLORA_SKIP_EXT=1 step install 90 "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e . ||
        echo "install failed: using PYTHONPATH=$PWD" | tee -a "$LOG"
fi
step info 60 "$PY" -m flora_kernels info

# 3b. Triton micro-benchmarks and bf16 correctness (a dry run lists the cases and floors only)
if [ "$DRY_RUN" = "1" ]; then
    step triton-microbench 60 "$PY" -m tools.microbench --dry-run --out "$OUT/triton_microbench.json"
    step triton-bf16-tests 60 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/backends/triton/test_triton_backend.py || true
else
    step triton-microbench 180 "$PY" -m tools.microbench --out "$OUT/triton_microbench.json" || true
    FLORA_TEST_GPU=1 step triton-bf16-tests 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider --timeout=60 tests/backends/triton/test_triton_backend.py tests/backends/triton/test_triton_linear.py tests/backends/triton/test_triton_conv.py tests/backends/triton/test_triton_reconstruct.py || true
fi

# 4. JIT-build the compiled extension (guarded: a failure is logged, the script goes on)
BUILD_PY='import flora_kernels.backends.ext as c
f = getattr(c, "build_extension", None)
if f is None:
    raise SystemExit("flora_kernels.backends.ext has no build_extension() yet")
print("build_extension ->", f(verbose=True))
import flora_kernels as fk
print("backends after build:", fk.available_backends())'
if [ "$DRY_RUN" = "1" ] && [ "${DRY_RUN_BUILD:-0}" != "1" ]; then
    step build-check 60 "$PY" -c 'import flora_kernels.backends.ext as c; f = getattr(c, "build_extension", None); print("build_extension:", "present" if callable(f) else "MISSING"); raise SystemExit(0 if callable(f) else 1)' ||
        echo "(dry run: build_extension not callable; on the GPU machine the build step would log this and go on)" | tee -a "$LOG"
else
    step build-extension 200 "$PY" -c "$BUILD_PY" || echo "extension build failed: continuing without it" | tee -a "$LOG"
fi

# 5. the GPU-marked tests
if [ "$DRY_RUN" = "1" ]; then
    step gpu-tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests || true
else
    FLORA_TEST_GPU=1 step gpu-tests 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider --timeout=60 tests || true
fi

# 5b. the CUDA kernels under compute-sanitizer: memcheck (out-of-bounds / misaligned accesses,
# e.g. a 16-byte vector path taken where it must not be) and racecheck (shared-memory hazards of
# the tiled GEMM), on the op-level tests (every op, NCHW and channels_last, bf16: the mma path).
SANITIZER="$(command -v compute-sanitizer || true)"
for d in "${CUDA_HOME:-/usr/local/cuda}/bin" "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")"; do
    [ -z "$SANITIZER" ] && [ -x "$d/compute-sanitizer" ] && SANITIZER="$d/compute-sanitizer"
done
SAN_TESTS=(-m pytest -q -m gpu -p no:cacheprovider -x tests/backends/ext/test_ext_gpu.py tests/backends/ext/test_ext_conv_fused.py)
for tool in memcheck racecheck; do
    if [ "$tool" = memcheck ]; then sel="(ops_match or cuda_ops_match_cpu) and bfloat16"; else sel="(ops_match and bfloat16 and nchw) or (cuda_ops_match_cpu and bfloat16 and contiguous)"; fi
    if [ -z "$SANITIZER" ]; then
        echo "== sanitizer-$tool: SKIPPED (no compute-sanitizer here); would run: compute-sanitizer --tool $tool --target-processes all --error-exitcode 1 $PY ${SAN_TESTS[*]} -k '$sel'" | tee -a "$LOG"
        echo "sanitizer-$tool SKIPPED 0s (no compute-sanitizer)" >>"$SUMMARY"
        [ "$DRY_RUN" = "1" ] || FAILED=1
    elif [ "$DRY_RUN" = "1" ]; then
        echo "== sanitizer-$tool: SKIPPED (dry run, no GPU); would run: $SANITIZER --tool $tool --target-processes all --error-exitcode 1 $PY ${SAN_TESTS[*]} -k '$sel'" | tee -a "$LOG"
        echo "sanitizer-$tool SKIPPED 0s (dry run)" >>"$SUMMARY"
    else
        FLORA_TEST_GPU=1 step "sanitizer-$tool" 90 "$SANITIZER" --tool "$tool" --target-processes all --error-exitcode 1 \
            "$PY" "${SAN_TESTS[@]}" -k "$sel" || true
    fi
done

# 6. the full benchmark table; --max-minutes keeps it inside the time left (writes its files)
REM=$(left)
MAXMIN=$(awk -v r="$REM" 'BEGIN { m = (r - 45) / 60; if (m < 0.5) m = 0.5; printf "%.1f", m }')
if command -v flora-bench >/dev/null && [ "$DRY_RUN" != "1" ]; then BENCH=(flora-bench); else BENCH=("$PY" -m flora_bench); fi
# shellcheck disable=SC2086
step flora-bench "$REM" "${BENCH[@]}" $BENCH_DEFAULT ${BENCH_ARGS:-} --keep-going --no-progress --max-minutes "$MAXMIN" \
    --out "$OUT/results.json" --md "$OUT/results.md" --plot "$OUT/results.png" --csv "$OUT/results.csv" || true

echo "device_check: done in $(($(date +%s) - T0))s" | tee -a "$LOG"
cat "$SUMMARY" | tee -a "$LOG"
# The last lines of the reply: the summary and the bench table's target verdicts.
sed -n '/^targets (docs\/ARCHITECTURE.md, Performance targets):/,/^elapsed/p' "$LOG" | tail -40
exit "$FAILED"
