#!/usr/bin/env bash
# The GPU command on the lent GPU machine, from the repository root, with dist/gpu-carry carried (`make gpu-carry`):
#
#   OUT=/some/folder bash benchmarks/gpu_run.sh
#
# 1. setup: the carried wheels checked against this tree and installed offline, each only where the machine lacks it;
#    versions, the device and `pip list` recorded;
# 2. tests: `make test-gpu`'s tests (the cuda-marked tests in tests/gpu, Triton compiled);
# 3. benchmark: benchmarks/gpu.py, its report rewritten after every model (a stopped run leaves what it measured).
#
# Every stage has a time limit (the whole run fits a 600 s command) and runs even when an earlier one failed; the exit
# status is that of the first failure. Written under $OUT: setup.log, tests.log, benchmark.log, gpu.md, gpu.csv,
# summary.txt. FASTKVZIP_GPU_REHEARSAL=1 rehearses it without a GPU: the tests skip (collection still has to pass)
# and the benchmark runs on CPU at tiny shapes. PYTHON picks the interpreter (default python3, the image's).
set -uo pipefail
: "${OUT:?set OUT to the folder for logs and results}"
PYTHON=${PYTHON:-python3}
# Paths made absolute before leaving the caller's folder.
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
case $PYTHON in */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;; esac
cd "$(dirname "$0")/.."

REHEARSAL=${FASTKVZIP_GPU_REHEARSAL:-0}
SETUP_LIMIT_S=${SETUP_LIMIT_S:-60}
TESTS_LIMIT_S=${TESTS_LIMIT_S:-210}
BENCH_LIMIT_S=${BENCH_LIMIT_S:-300}
# The benchmark's model sections (both models): they stop starting runs once it is spent, so its limit also covers
# building the models, the run in progress of each search and the kernel timings.
BENCH_BUDGET_S=${BENCH_BUDGET_S:-180}
export OUT PYTHON REHEARSAL BENCH_BUDGET_S

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET FASTKVZIP_PRESS_KERNELS
status=0
: >"$OUT/summary.txt"

# stage NAME LIMIT_S COMMAND...: COMMAND under a time limit, its output in $OUT/NAME.log, a line in summary.txt.
stage() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s)"
    : >"$OUT/$name.log"
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    [ $rc -eq 124 ] && echo "stopped at the ${limit} s limit" >>"$OUT/$name.log"
    printf '%-10s exit %3d  %4d s  (limit %d s)\n' "$name" "$rc" $((SECONDS - start)) "$limit" | tee -a "$OUT/summary.txt"
    tail -n 15 "$OUT/$name.log"
    [ $rc -eq 0 ] || [ $status -ne 0 ] || status=$rc
}

setup() {
    set -e
    echo "rehearsal: $REHEARSAL; python: $(command -v "$PYTHON")"
    "$PYTHON" --version
    if [ "$REHEARSAL" != 1 ]; then nvidia-smi || true; fi
    "$PYTHON" benchmarks/gpu_carry.py --check
    local names
    names=$("$PYTHON" benchmarks/gpu_carry.py --names)
    # The package itself always from this tree's wheel; the others only where the machine has none.
    "$PYTHON" -m pip install --no-index --no-deps --find-links dist/gpu-carry --force-reinstall fastkvzip-press
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install --no-index --no-deps --find-links dist/gpu-carry $names
    "$PYTHON" -m pip list --disable-pip-version-check
    "$PYTHON" -P -c "import torch, transformers, triton, kvpress, fastkvzip_press as f; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| triton', triton.__version__, \
'| fastkvzip_press', f.__version__, f.__file__)"
}

tests() {  # one line per test (-v), so that a run stopped at its limit still says how far it got
    "$PYTHON" -m pytest -v -rs -p no:cacheprovider --durations=15 -m cuda tests/gpu
}

benchmark() {
    if [ "$REHEARSAL" = 1 ]; then
        "$PYTHON" benchmarks/gpu.py --device cpu --tiny --quiet --budget-s "$BENCH_BUDGET_S" --out "$OUT"
    else
        "$PYTHON" benchmarks/gpu.py --quiet --budget-s "$BENCH_BUDGET_S" --out "$OUT"
    fi
}

export -f setup tests benchmark
stage setup "$SETUP_LIMIT_S" bash -c setup
stage tests "$TESTS_LIMIT_S" bash -c tests
stage benchmark "$BENCH_LIMIT_S" bash -c benchmark
echo "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $status
