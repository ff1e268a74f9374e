#!/usr/bin/env bash
# The one script to run on a GPU machine (`OUT=results_dir bash benchmarks/gpu_check.sh`): build the extension with the device's own torch, install
# offline peers, `pytest -m gpu`, compute-sanitizer memcheck + racecheck on a small GPU test subset, then the
# full benchmarks. Every stage logs under $OUT and the run goes on after a failure; the exit status is the
# number of failed stages. Prints a short table last.
#
# Files under $OUT (at most 7: the device tool copies back 8): summary.txt (the stage table), gpu_check.log (every
# stage's output in order) and the benchmark's <device>-<date>.{json,md,png} (<...>-partial.{json,md} when the time
# ran out mid-run); with a GPU also roofline-measured.{json,md} (the committed roofline predictions with the
# measured column). Per-stage logs stay in $LOGDIR on the machine.
#
# Environment (all optional):
#   OUT                       where logs and results go (default: /tmp/gpu_check_out)
#   LOGDIR                    per-stage logs (default: /tmp/gpu_check_logs)
#   PYTHON                    interpreter (default: python3 — the device image has no venv)
#   TORCH_CUDA_ARCH_LIST      default 9.0 (H100/H200)
#   GPU_CHECK_STAGES          subset and order of: peers build test bench sanitize (default: all five, in that
#                             order: the benchmark before the slow sanitizer runs). A warm machine
#                             keeps the in-place build, so a second call can run e.g. GPU_CHECK_STAGES=bench.
#   GPU_CHECK_SKIP_BUILD=1    never compile (a dry run on a machine whose in-place build others share)
#   GPU_CHECK_DEADLINE        seconds the whole script may take (default 570: the device tool's 600 s per
#                             command minus a margin); each stage's timeout is cut to what is left
#   PEER_DIR                  wheels/sdists from `make peers` (default: .peers/dist if present)
#   SANITIZER_TESTS           test files for compute-sanitizer (default: the MSDA CUDA and assignment tests)
#   SANITIZER_K               pytest -k expression to keep the sanitized subset small (default: leaves out
#                             torch.compile and opcheck tests, which mostly exercise the host under a slow tool)
#   BENCH_ARGS                extra arguments for `python -m benchmarks` (default: none on GPU,
#                             "--quick --suites msda" without one)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
STAGES=${GPU_CHECK_STAGES:-peers build test bench sanitize}
DEADLINE=${GPU_CHECK_DEADLINE:-570}
START=$(date +%s)
LOGDIR=${LOGDIR:-/tmp/gpu_check_logs}
mkdir -p "$LOGDIR"
rm -f "$LOGDIR"/*.log
LOG=$OUT/gpu_check.log
: >"$LOG"
SUMMARY=$OUT/summary.txt
FAILED=0
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

remaining() { echo $((DEADLINE - ($(date +%s) - START))); }

# run_stage NAME TIMEOUT_S CMD...: runs CMD with its output in $LOGDIR/NAME.log (appended to $OUT/gpu_check.log),
# under a timeout cut to the time left; records ok / FAILED (rc) / TIMEOUT in the summary.
run_stage() {
    local name=$1 limit=$2
    shift 2
    local left
    left=$(remaining)
    if ((left < 20)); then
        note "$(printf '%-12s SKIPPED (deadline: %ss left)' "$name" "$left")"
        FAILED=$((FAILED + 1))
        return 1
    fi
    ((limit > left - 10)) && limit=$((left - 10))
    local t0 rc log=$LOGDIR/$name.log
    t0=$(date +%s)
    echo "### $name: $* (timeout ${limit}s)" >"$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    cat "$log" >>"$LOG"
    local dt=$(($(date +%s) - t0))
    if ((rc == 0)); then
        note "$(printf '%-12s ok        %4ss' "$name" "$dt")"
    elif ((rc == 124 || rc == 137)); then
        note "$(printf '%-12s TIMEOUT   %4ss  (see gpu_check.log)' "$name" "$dt")"
        FAILED=$((FAILED + 1))
    else
        note "$(printf '%-12s FAILED    %4ss  rc=%s (see gpu_check.log)' "$name" "$dt" "$rc")"
        FAILED=$((FAILED + 1))
    fi
    return "$rc"
}

# --- environment
HAVE_GPU=0
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    HAVE_GPU=1
fi
note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
note "python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1)"
if ((HAVE_GPU)); then
    note "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
else
    note "gpu: none (degraded dry run: GPU stages are skipped)"
fi
note "stages: $STAGES"

# --- peers: offline installs of what the benchmark compares against (never required). `make peers` fills
# .peers/dist on a machine with the registry; carry .peers/dist (about 11 MB) to the device, not .peers/build.
PEER_DIR=${PEER_DIR:-}
[[ -z $PEER_DIR && -d $ROOT/.peers/dist ]] && PEER_DIR=$ROOT/.peers/dist
stage_peers() {
    if [[ -n $PEER_DIR ]] && compgen -G "$PEER_DIR/*" >/dev/null; then
        # --target keeps the image's site-packages untouched; sdists (dcnv4, lapjv) compile here against its
        # torch. The transformers wheel is not installed: benchmarks/peers.py builds the original op from it.
        mkdir -p /tmp/gpu_check_peers
        export PYTHONPATH=/tmp/gpu_check_peers${PYTHONPATH:+:$PYTHONPATH}
        local installs=()
        for f in "$PEER_DIR"/*; do [[ $(basename "$f") == transformers-* ]] || installs+=("$f"); done
        run_stage peers 300 "$PY" -m pip install --no-index --no-build-isolation --no-deps \
            --target /tmp/gpu_check_peers "${installs[@]}"
        # The original Deformable-DETR op (as HF transformers ships it), JIT-built into .peers/build.
        DEFORMABLE_DETR_PEERS=$(dirname "$PEER_DIR")
        export DEFORMABLE_DETR_PEERS  # the bench stage loads the same build
        run_stage original 240 "$PY" -m benchmarks.peers build
    else
        note "$(printf '%-12s skipped   (no PEER_DIR / .peers/dist: run make peers; peers will read "not installed")' peers)"
    fi
}

# --- build: in place, with this machine's torch (extensions built elsewhere do not load here)
stage_build() {
    if [[ ${GPU_CHECK_SKIP_BUILD:-0} == 1 ]]; then
        note "$(printf '%-12s skipped   (GPU_CHECK_SKIP_BUILD=1)' build)"
    else
        export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
        run_stage build 400 "$PY" setup.py build_ext --inplace
    fi
    run_stage import 60 "$PY" -c "
import deformable_detr as dd
from deformable_detr._extension import load_error
print('extension error:', load_error())
print('cpu backends:', dd.available_backends('cpu'))
import torch
if torch.cuda.is_available():
    b = dd.available_backends('cuda'); print('cuda backends:', b)
    assert 'cuda' in b, 'the CUDA backend did not build/load'
"
}

# --- GPU tests
stage_test() {
    # Some test modules import packages the device image lacks (transformers, pycocotools): their collection
    # errors must not abort the GPU tests of the other modules. rc 5 = nothing collected (fine without a GPU).
    run_stage pytest-gpu 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs --durations=15 \
        --continue-on-collection-errors tests
    local rc=$?
    if ((rc == 5 && HAVE_GPU == 0)); then FAILED=$((FAILED - 1)); fi
    grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped)' "$LOGDIR/pytest-gpu.log" | tail -15 | tee -a "$SUMMARY"
}

# --- compute-sanitizer on a small GPU subset
stage_sanitize() {
    SAN=$(command -v compute-sanitizer || true)
    [[ -z $SAN && -x /usr/local/cuda/bin/compute-sanitizer ]] && SAN=/usr/local/cuda/bin/compute-sanitizer
    files=()
    for f in ${SANITIZER_TESTS:-tests/test_msda_cuda.py tests/test_assignment.py}; do
        [[ -f $f ]] && files+=("$f")
    done
    if ((HAVE_GPU == 0)); then
        note "$(printf '%-12s skipped   (no GPU)' sanitize)"
    elif [[ -z $SAN ]]; then
        note "$(printf '%-12s FAILED    (compute-sanitizer not found)' sanitize)"
        FAILED=$((FAILED + 1))
    elif ((${#files[@]} == 0)); then
        note "$(printf '%-12s skipped   (none of the sanitizer test files exist)' sanitize)"
    else
        kargs=()
        SANITIZER_K=${SANITIZER_K-not compile and not opcheck}
        [[ -n $SANITIZER_K ]] && kargs=(-k "$SANITIZER_K")
        # Without the caching allocator every tensor is its own cudaMalloc, so an out-of-bounds access lands
        # outside any allocation and memcheck sees it instead of reading a neighbour in the same pool block.
        for tool in memcheck racecheck synccheck; do
            run_stage "$tool" 180 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
                "$SAN" --tool "$tool" --error-exitcode 99 --print-limit 20 \
                "$PY" -m pytest -m gpu -q -x -p no:cacheprovider --continue-on-collection-errors "${files[@]}" "${kargs[@]}"
            grep -E '^(FAILED|ERROR)|ERROR SUMMARY|RACECHECK SUMMARY|[0-9]+ (passed|failed)' "$LOGDIR/$tool.log" | tail -6 |
                sed "s/^/  $tool: /" | tee -a "$SUMMARY"
        done
    fi
}

# --- benchmarks: JSON + markdown + PNG land directly in $OUT (<stem>-partial.{json,md} if the time ran out)
stage_bench() {
    if [[ -z ${BENCH_ARGS+x} ]]; then
        if ((HAVE_GPU)); then BENCH_ARGS=""; else BENCH_ARGS="--quick --suites msda"; fi
    fi
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
    run_stage bench 420 "$PY" -m benchmarks --no-progress --out "$OUT" $BENCH_ARGS
    # The committed roofline predictions (results/roofline-*.json) gain the measured column and the ratio.
    bench_json=$(ls -t "$OUT"/*.json 2>/dev/null | grep -v roofline | head -1)
    if ((HAVE_GPU)) && [[ -n $bench_json ]]; then
        "$PY" -m benchmarks.bench_static_roofline "$bench_json" "$OUT" >"$LOGDIR/roofline.log" 2>&1 ||
            note "roofline-measured failed (see gpu_check.log)"
        cat "$LOGDIR/roofline.log" >>"$LOG"
    fi
}

for stage in $STAGES; do
    case $stage in
    peers | build | test | bench | sanitize) "stage_$stage" ;;
    *) note "unknown stage '$stage' in GPU_CHECK_STAGES (choose from: peers build test bench sanitize)" ;;
    esac
done

echo
# The short table `python -m benchmarks` prints, then the stage table: last, so that a cut-off tail still shows it.
if [[ -f $LOGDIR/bench.log ]]; then
    sed -n '/^| suite | case/,$p' "$LOGDIR/bench.log" | tail -150
fi
echo "files under $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo "================ gpu_check: $FAILED failed stage(s), $(($(date +%s) - START)) s ================"
cat "$SUMMARY"
exit "$FAILED"
