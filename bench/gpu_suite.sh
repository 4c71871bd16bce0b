#!/usr/bin/env bash
# The GPU suite: every GPU-only check and the full benchmark, results in one folder.
#
#   bash bench/gpu_suite.sh OUTDIR
#
# Needs only the repository and a CUDA machine with torch and triton installed (no network, no pip
# install): it runs from the repository root with PYTHONPATH set to it. Steps, each bounded by a
# timeout and logged in OUTDIR/steps.log; a failing step does not stop the next one:
#   env      versions, GPU, git revision                          -> env.txt
#   aot      python -m sspo_kernels.aot (CPU only: runs in the background during the tests)
#                                                                  -> aot.txt
#   pytest   pytest -m gpu tests/                                  -> pytest_gpu.log, pytest_gpu.xml
#   launches python -m bench.launches --time                     -> launches.json, launches.log
#   bench    python -m bench.run --suite gpu                       -> bench/ (CSV, JSON, table, plots), bench.log
#   summary  all of the above in one page                          -> SUMMARY.md
# Worst case about 9.5 minutes (the step timeouts below); typically much less.

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
# a private Triton cache, so the first-call column includes compilation the same way on every run
export TRITON_CACHE_DIR="$OUT/triton_cache"

PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-210}
AOT_TIMEOUT=${AOT_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-270}
LAUNCH_TIMEOUT=${LAUNCH_TIMEOUT:-90}

STEPS="$OUT/steps.log"
: > "$STEPS"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$STEPS"; }

# run_step NAME TIMEOUT_S LOGFILE CMD...: run CMD with a timeout, output to LOGFILE, status to steps.log
run_step() {
    local name=$1 limit=$2 logfile=$3
    shift 3
    local start=$SECONDS
    log "start $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$logfile" 2>&1
    local rc=$?
    local what="exit $rc"
    [ $rc -eq 124 ] && what="TIMED OUT after ${limit}s"
    log "end   $name: $what, $((SECONDS - start))s"
    echo "$name: $what, $((SECONDS - start))s" >> "$OUT/status.txt"
    return 0
}

: > "$OUT/status.txt"
log "repository $REPO, python $PY, output $OUT"

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "git: $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "host: $(uname -a)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
    "$PY" - <<'EOF' 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
for mod in ("pytest", "matplotlib", "liger_kernel"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except ImportError:
        print(mod, "not installed")
EOF
} > "$OUT/env.txt" 2>&1
log "env written"

# The AOT compile uses the CPU only; overlapping it with the GPU tests saves a minute or two.
log "start aot in the background (timeout ${AOT_TIMEOUT}s)"
AOT_START=$SECONDS
( env -u TRITON_INTERPRET TRITON_CACHE_DIR="$OUT/triton_cache_aot" \
    timeout --kill-after=10 "$AOT_TIMEOUT" "$PY" -m sspo_kernels.aot > "$OUT/aot.txt" 2>&1
  echo $? > "$OUT/aot.rc" ) &
AOT_PID=$!

run_step pytest "$PYTEST_TIMEOUT" "$OUT/pytest_gpu.log" \
    "$PY" -m pytest -m gpu tests/ -q -rs -p no:cacheprovider --continue-on-collection-errors \
    --junitxml "$OUT/pytest_gpu.xml"

wait "$AOT_PID"
AOT_RC=$(cat "$OUT/aot.rc" 2>/dev/null || echo "?")
rm -f "$OUT/aot.rc"
AOT_WHAT="exit $AOT_RC"
[ "$AOT_RC" = 124 ] && AOT_WHAT="TIMED OUT after ${AOT_TIMEOUT}s"
log "end   aot: $AOT_WHAT, $((SECONDS - AOT_START))s since its start"
echo "aot: $AOT_WHAT, $((SECONDS - AOT_START))s (overlapped with pytest)" >> "$OUT/status.txt"

# Launch counts per option set, the segment step alone (fused vs composed) and a CUDA-graph replay of
# forward + backward against eager calls (bf16, N = 8192, V = 151,936).
run_step launches "$LAUNCH_TIMEOUT" "$OUT/launches.log" "$PY" -m bench.launches --time --out "$OUT"

# The Triton and fused-linear paths at the sizes of the issues; the torch backend is left out (it
# is the CPU path; its chunks are sized for a CPU cache). The AOT report is the step above.
run_step bench "$BENCH_TIMEOUT" "$OUT/bench.log" \
    "$PY" -m bench.run --suite gpu --device cuda --out "$OUT/bench" --aot off --launches off \
    --paths baseline triton triton-inplace baseline-linear fused-linear

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
    echo "## pytest -m gpu tests/ (last lines)"
    echo
    echo '```'
    tail -n 15 "$OUT/pytest_gpu.log" 2>/dev/null
    echo '```'
    echo
    echo "## python -m sspo_kernels.aot"
    echo
    echo '```'
    cat "$OUT/aot.txt" 2>/dev/null
    echo '```'
    echo
    echo "## Launch counts and segment-step / CUDA-graph timings (python -m bench.launches --time)"
    echo
    echo '```'
    cat "$OUT/launches.log" 2>/dev/null
    echo '```'
    echo
    echo "## Benchmark (bench/table.txt; CSV, JSON and plots in bench/)"
    echo
    echo '```'
    if [ -f "$OUT/bench/table.txt" ]; then cat "$OUT/bench/table.txt"; else tail -n 40 "$OUT/bench.log"; fi
    echo '```'
} > "$OUT/SUMMARY.md"
rm -rf "$OUT/triton_cache" "$OUT/triton_cache_aot"
log "done: $OUT/SUMMARY.md"
