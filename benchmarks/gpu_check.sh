#!/usr/bin/env bash
# One-shot check on a lent GPU machine (H100/H200; torch, triton, pytest, pytest-benchmark; no
# network). At most 5 minutes: the stage limits below (BUDGET) add to 290 s, checked by
# tests/test_gpu_check.py; every stage runs under its own `timeout` and writes its results
# (JSON) into $OUT as soon as it ends, so a stage that overruns costs only itself. The run
# records the Triton version (env.json) and keeps the TTGIR of every binary it compiled
# ($OUT/ttgir/, from a Triton cache under $OUT).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # on the GPU machine
#   OUT=/tmp/gc bash benchmarks/gpu_check.sh --dry-run    # on CPU: same stages, tiny sizes
#
# Stages: setup (fastvq.kernels importable from the checkout; carried wheels in .whl/) ->
# preflight (interpreter off, CUDA present, versions) -> CUDA correctness tests (pytest -m cuda)
# -> default configs vs alternatives vs cuBLAS, beside the static model's prediction
# (benchmarks/gpu_configs.py) -> pruned grid (N=65536, D=256, K=16384/65536/262144; bf16 and fp32;
# forward and forward+backward; cuBLAS matmul yardstick; fastvq-torch, naive and
# vector-quantize-pytorch at one K each) -> the EMA layer's training step under bf16 autocast
# against vector-quantize-pytorch and cdist + one-hot, the backward's scatter alone, the forward
# at K = 2^18 and 2^20 (benchmarks/train_step_gpu.py) -> fused soft assignment vs the literal
# N x K softmax, forward + backward, and the fused op alone at K = 2^18
# (benchmarks/soft_assign_gpu.py) -> markdown/PNG report of whatever JSON exists -> issue 28's
# targets, met or not (benchmarks/gpu_targets.py, targets.md).
set -u
cd "$(dirname "$0")/.."

# Stage limits in seconds (sum <= 300; the setup and the TTGIR copy take a few seconds more).
# B_SOFT's 30 s came out of B_CONFIGS (125 -> 95): gpu_configs.py writes its JSON after every
# case, so a cut there loses only its last cases, while the soft-assignment timings had none.
# The H200 run of 2026-11-26 (results/gpu-h200-2026-11-26/run1/stages.tsv) took 16 s in preflight
# (torch's first import on a fresh machine), so its limit is 20 s: at 15 a slow start stopped
# the whole run. B_TRAIN's 25 s and those 5 s came from the grid stages, which that run's limits
# cut anyway (bf16 -5, fp32 -5, peers -15: its vqp cells are what train_step_gpu.py times in
# the issue's form), B_CONFIGS (-5) and B_REPORT (-5; it took 3 s).
B_PREFLIGHT=20 B_CUDA_TESTS=50 B_CONFIGS=90 B_BF16=25 B_FP32=20 B_PEERS=15 B_TRAIN=25 B_SOFT=30
B_REPORT=10 B_TARGETS=5
BUDGET=$((B_PREFLIGHT + B_CUDA_TESTS + B_CONFIGS + B_BF16 + B_FP32 + B_PEERS + B_TRAIN + B_SOFT
    + B_REPORT + B_TARGETS))

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
# The dry run checks code paths on a CPU, where the interpreter and a busy CI machine are slow:
# its limits are the GPU's times DRY_LIMIT_SCALE (a stage's time there measures nothing).
SCALE=1
[ $DRY = 1 ] && SCALE=${DRY_LIMIT_SCALE:-4}
PY=${PYTHON:-python3}  # the GPU image's python3 is the one holding torch; there may be no `python`
# The checkout has kernels/ at the top level (installed as fastvq.kernels by pip): make the
# import work without installing, and take any wheels carried in .whl/ (no network there).
# Only where fastvq is not installed: next to an editable install the link would make a second
# copy of fastvq.kernels importable (seen to hang the DDP tests).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import fastvq.kernels" 2> /dev/null && [ ! -e fastvq/kernels ]; then
    ln -s ../kernels fastvq/kernels
fi
if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
OUT="${OUT:-benchmarks/results/gpu-check-$(date -u +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
export OUT DRY
# Triton's cache under $OUT: the TTGIR of every kernel the run compiles is copied out at the end.
export TRITON_CACHE_DIR="$OUT/triton-cache"
LOG="$OUT/gpu_check.log"
STATUS="$OUT/stages.tsv"
: > "$STATUS"
T0=$(date +%s)

log() { echo "[gpu_check +$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }

# stage NAME SECONDS CMD...: run CMD under `timeout` (SIGINT first so pytest still writes its
# JSON, SIGKILL 10 s later), append "name rc seconds" to stages.tsv.
stage() {
    local name=$1 secs=$2
    shift 2
    local t=$(date +%s)
    secs=$((secs * SCALE))
    log "stage $name (limit ${secs}s): $*"
    timeout -s INT -k 10 "$secs" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t))" >> "$STATUS"
    log "stage $name: rc=$rc ($(($(date +%s) - t))s); tail:"
    tail -n 5 "$OUT/$name.log" | tee -a "$LOG"
    return $rc
}

# ---- preflight ---------------------------------------------------------------------------------
if [ -n "${TRITON_INTERPRET:-}" ] && [ "${TRITON_INTERPRET}" != "0" ]; then
    if [ $DRY = 1 ]; then
        log "dry run: unsetting TRITON_INTERPRET=$TRITON_INTERPRET"
        unset TRITON_INTERPRET
    else
        log "FAIL: TRITON_INTERPRET=$TRITON_INTERPRET is set; the GPU check needs compiled kernels"
        exit 2
    fi
fi
log "stage budget: ${BUDGET}s in all"
stage preflight $B_PREFLIGHT "$PY" - <<'EOF'
import json, os, platform, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "machine": platform.node()}
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:  # reported, not fatal here: the tests say what breaks
    info["triton"] = f"import failed: {exc}"
for mod in ("vector_quantize_pytorch", "faiss", "pytest_benchmark"):
    try:
        info[mod] = getattr(__import__(mod), "__version__", "present")
    except Exception as exc:
        info[mod] = f"missing ({type(exc).__name__})"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sm=f"{p.major}.{p.minor}")
print(json.dumps(info, indent=1))
json.dump(info, open(os.path.join(os.environ["OUT"], "env.json"), "w"), indent=1)
sys.exit(0 if info["cuda_available"] or os.environ.get("DRY") == "1" else 3)
EOF
PRE=$?
if [ $PRE != 0 ]; then
    log "FAIL: preflight rc=$PRE (no CUDA?); stopping"
    exit 3
fi
command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

# ---- CUDA correctness tests --------------------------------------------------------------------
# rc 5 = no tests collected (dry run on CPU: the cuda tests are skipped, not deselected).
FASTVQ_RESULTS_DIR="$OUT" stage cuda-tests $B_CUDA_TESTS \
    "$PY" -m pytest tests -m cuda -q -p no:cacheprovider --timeout 45 \
    --junitxml "$OUT/cuda-tests.xml"

# ---- default configs vs alternatives vs cuBLAS, with the static model's prediction -----------
if [ $DRY = 0 ]; then
    stage configs $B_CONFIGS "$PY" -m benchmarks.gpu_configs
fi

# ---- pruned benchmark grid ---------------------------------------------------------------------
if [ $DRY = 1 ]; then
    export FASTVQ_BENCH_GRID=gpu-check-dry
else
    export FASTVQ_BENCH_GRID=gpu-check
fi
export FASTVQ_BENCH_CALL_TIMEOUT_S=25
bench() {  # bench NAME SECONDS PROVIDERS DTYPES
    FASTVQ_BENCH_PROVIDERS=$3 FASTVQ_BENCH_DTYPES=$4 stage "$1" "$2" \
        "$PY" -m pytest benchmarks/test_vq.py -q -p no:cacheprovider --timeout 30 \
        --benchmark-json "$OUT/$1.json" --benchmark-columns median,rounds
}
bench bench-bf16 $B_BF16 fastvq-triton,matmul bf16
bench bench-fp32 $B_FP32 fastvq-triton,matmul fp32
bench bench-peers $B_PEERS fastvq-torch,naive,vqp-train bf16,fp32

# ---- the EMA layer's training step vs vqp and cdist + one-hot; scatter; forward at 2^18, 2^20 --
if [ $DRY = 1 ]; then
    TRITON_INTERPRET=1 stage train-step $B_TRAIN "$PY" -m benchmarks.train_step_gpu --dry-run
else
    stage train-step $B_TRAIN "$PY" -m benchmarks.train_step_gpu
fi

# ---- fused soft assignment vs the literal N x K softmax (forward + backward), K = 2^18 --------
# The dry run interprets the kernels on CPU at tiny sizes (this is the only stage that does).
if [ $DRY = 1 ]; then
    TRITON_INTERPRET=1 stage soft-assign $B_SOFT "$PY" -m benchmarks.soft_assign_gpu --dry-run
else
    stage soft-assign $B_SOFT "$PY" -m benchmarks.soft_assign_gpu
fi

# ---- report ------------------------------------------------------------------------------------
JSONS=""
for f in "$OUT"/bench-*.json; do  # a stage killed at its limit may leave an empty file
    [ -s "$f" ] && "$PY" -c "import json,sys; json.load(open(sys.argv[1]))" "$f" 2> /dev/null \
        && JSONS="$JSONS $f"
done
if [ -n "$JSONS" ]; then
    # shellcheck disable=SC2086
    stage report $B_REPORT "$PY" -m benchmarks.report $JSONS --out "$OUT" --name gpu-check
fi
# ---- issue 28's targets, met or not, from this run's JSON (benchmarks/gpu_targets.py) ----------
stage targets $B_TARGETS "$PY" -m benchmarks.gpu_targets "$OUT" --out "$OUT/targets.md"
# ---- TTGIR of the binaries this run compiled ----------------------------------------------------
mkdir -p "$OUT/ttgir"
find "$OUT/triton-cache" -name '*.ttgir' -exec cp {} "$OUT/ttgir/" \; 2> /dev/null
log "kept $(ls "$OUT/ttgir" | wc -l) TTGIR files in $OUT/ttgir"
log "done in $(($(date +%s) - T0))s (budget ${BUDGET}s); stages (name, rc, seconds):"
tee -a "$LOG" < "$STATUS"
