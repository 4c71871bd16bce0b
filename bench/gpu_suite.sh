#!/usr/bin/env bash
# The GPU suite: the GPU tests and the GPU benchmark, results in one folder, one table printed.
#
#   bash bench/gpu_suite.sh OUTDIR
#
# Needs only the repository and a CUDA machine with torch and triton installed (no network, no pip
# install; liger-kernel and matplotlib are optional): it runs from the repository root with PYTHONPATH
# set to it. Steps, each bounded by a timeout and logged in OUTDIR/steps.log; a failing step does not
# stop the next one:
#   env      versions, GPU, git revision                               -> env.txt            (timeout  60 s)
#   aot      python -m sspo_kernels.aot (CPU only, in the background)   -> aot.txt            (timeout 240 s)
#   pytest   pytest -m gpu tests/                                       -> pytest_gpu.log/.xml (timeout 240 s)
#   results  python -m bench.gpu_results (bench/README.md, "GPU suite") -> results.json, table.txt
#                                                                                             (timeout 150 s)
#   summary  all of the above on one page                               -> SUMMARY.md
# Worst case 7.5 minutes (the timeouts of the steps in sequence; the AOT report overlaps them), so a
# rerun fits in a 15-minute GPU session; typically much less. A step that times out gets SIGINT first:
# pytest then still prints its summary and writes its XML for what ran.

set -u

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_suite.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
# a private Triton cache, so the compile times are the same on every run (and count in the budget)
export TRITON_CACHE_DIR="$OUT/triton_cache"
unset TRITON_INTERPRET

ENV_TIMEOUT=${ENV_TIMEOUT:-60}
AOT_TIMEOUT=${AOT_TIMEOUT:-240}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-240}
RESULTS_TIMEOUT=${RESULTS_TIMEOUT:-150}

STEPS="$OUT/steps.log"
: > "$STEPS"
: > "$OUT/status.txt"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$STEPS"; }

# run_step NAME TIMEOUT_S LOGFILE CMD...: run CMD with a timeout, output to LOGFILE, status to steps.log
run_step() {
    local name=$1 limit=$2 logfile=$3
    shift 3
    local start=$SECONDS
    log "start $name (timeout ${limit}s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$logfile" 2>&1
    local rc=$?
    local what="exit $rc"
    [ $rc -eq 124 ] && what="TIMED OUT after ${limit}s"
    log "end   $name: $what, $((SECONDS - start))s"
    echo "$name: $what, $((SECONDS - start))s" >> "$OUT/status.txt"
    return 0
}

log "repository $REPO, python $PY, output $OUT"

env_report() {
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "git: $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "host: $(uname -a)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
    "$PY" - <<'EOF' 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}", p.name, f"{p.total_memory / 2**30:.1f} GiB", "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count)
for mod in ("triton", "pytest", "hypothesis", "matplotlib", "liger_kernel"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except ImportError:
        print(mod, "not installed")
EOF
}
export -f env_report
export REPO PY
run_step env "$ENV_TIMEOUT" "$OUT/env.txt" bash -c env_report

# The AOT compile uses the CPU only; it overlaps the GPU steps and is waited for at the end.
log "start aot in the background (timeout ${AOT_TIMEOUT}s)"
AOT_START=$SECONDS
( env -u TRITON_INTERPRET TRITON_CACHE_DIR="$OUT/triton_cache_aot" \
    timeout --kill-after=10 "$AOT_TIMEOUT" "$PY" -m sspo_kernels.aot > "$OUT/aot.txt" 2>&1
  echo $? > "$OUT/aot.rc" ) &
AOT_PID=$!

# Every CUDA case of the comparison tests and tests/test_gpu.py; --durations shows where the time goes.
# Most of the time is Triton compiling each kernel variant once: with pytest-xdist installed, 4 workers
# compile side by side (PYTEST_WORKERS=0 turns it off).
XDIST=()
if [ "${PYTEST_WORKERS:-4}" != 0 ] && "$PY" -c "import xdist" > /dev/null 2>&1; then
    XDIST=(-n "${PYTEST_WORKERS:-4}")
fi
run_step pytest "$PYTEST_TIMEOUT" "$OUT/pytest_gpu.log" \
    "$PY" -m pytest -m gpu tests/ -q -rfEs -p no:cacheprovider --continue-on-collection-errors \
    --durations=30 --junitxml "$OUT/pytest_gpu.xml" ${XDIST[@]+"${XDIST[@]}"}

# The headline, fused linear, segment step, launch counts and Liger side by side (bench/gpu_results.py);
# results.json is rewritten after each section, so a timeout keeps what was measured.
run_step results "$RESULTS_TIMEOUT" "$OUT/gpu_results.log" \
    "$PY" -m bench.gpu_results --out "$OUT" --pytest-xml "$OUT/pytest_gpu.xml"

wait "$AOT_PID"
AOT_RC=$(cat "$OUT/aot.rc" 2>/dev/null || echo "?")
rm -f "$OUT/aot.rc"
AOT_WHAT="exit $AOT_RC"
[ "$AOT_RC" = 124 ] && AOT_WHAT="TIMED OUT after ${AOT_TIMEOUT}s"
log "end   aot: $AOT_WHAT, $((SECONDS - AOT_START))s since its start"
echo "aot: $AOT_WHAT, $((SECONDS - AOT_START))s (in the background)" >> "$OUT/status.txt"

{
    echo "# GPU suite results"
    echo
    echo '```'
    cat "$OUT/env.txt"
    echo '```'
    echo
    echo "## Steps"
    echo
    echo '```'
    cat "$OUT/status.txt"
    echo '```'
    echo
    echo "## Benchmark (bench/gpu_results.py; every number in results.json)"
    echo
    echo '```'
    if [ -f "$OUT/table.txt" ]; then cat "$OUT/table.txt"; else tail -n 40 "$OUT/gpu_results.log"; fi
    echo '```'
    echo
    echo "## pytest -m gpu tests/ (last lines)"
    echo
    echo '```'
    tail -n 60 "$OUT/pytest_gpu.log" 2>/dev/null
    echo '```'
    echo
    echo "## python -m sspo_kernels.aot"
    echo
    echo '```'
    cat "$OUT/aot.txt" 2>/dev/null
    echo '```'
} > "$OUT/SUMMARY.md"
rm -rf "$OUT/triton_cache" "$OUT/triton_cache_aot"

echo
cat "$OUT/status.txt"
echo
if [ -f "$OUT/table.txt" ]; then cat "$OUT/table.txt"; else echo "no table: see $OUT/gpu_results.log"; tail -n 20 "$OUT/gpu_results.log"; fi
echo
tail -n 1 "$OUT/pytest_gpu.log" 2>/dev/null
log "done: $OUT/results.json, $OUT/SUMMARY.md"
