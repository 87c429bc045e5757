# Sourced by the GPU profile scripts (lm_gpu.sh, gpu_2.sh) after they set LOG, LIMIT and PY.
# run TAG CMD...: CMD's output into $LOG, each line tagged, then its exit status; at most $LIMIT seconds.
run() {
    local tag=$1; shift
    echo "[$tag] start $(date +%T): $*" >> "$LOG"
    timeout "$LIMIT" "$@" 2>&1 | sed -u "s/^/[$tag] /" >> "$LOG"
    echo "[$tag] exit ${PIPESTATUS[0]} at $(date +%T)" >> "$LOG"
}
# versions: the GPU, its driver and the Python packages named (module names), into $LOG
versions() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1
    local m
    for m in torch "$@"; do
        $PY -c "import $m; print('$m', $m.__version__)" >> "$LOG" 2>&1
    done
    $PY -c "import torch; print('cuda', torch.cuda.is_available())" >> "$LOG" 2>&1
}
