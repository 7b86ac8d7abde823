#!/usr/bin/env bash
# Everything phi2tutor can only measure on a CUDA GPU, in one command of at most ~8 minutes:
#   1. benchmarks/memory_phi2.py at Phi-2's full 2.7B shape: peak allocated and reserved beside the planner,
#      training tokens/s (the 4 GB config's settings);
#   2. benchmarks/attention_overflow.py: fp16 attention at Phi-2's magnitudes, stock eager and SDPA against
#      phi2tutor's fp32-score attention, on this GPU's kernels;
#   3. benchmarks/train_throughput.py --device cuda --qlora: phi2tutor fit against transformers Trainer +
#      peft with the 4 GB config's settings (nf4-double, fp16 compute, 16-mixed, checkpointing, paged 8-bit
#      AdamW, micro-batch 1 x 512);
#   4. `phi2tutor doctor`, where it exists.
# Each check has its own time limit; its full output goes to a log file. Machine-readable lines on stdout:
#   GPU_CHECK check=device name=... capability=... total_mb=... torch=... cuda=...
#   GPU_CHECK check=<name> rc=<exit code> seconds=<s> log=<file> <the check's RESULT key=value pairs>
#   GPU_CHECK status=done failed=<n> seconds=<s>
# Without a CUDA device it stops at once: "GPU_CHECK status=no_cuda ..." and exit code 3.
#
#   bash benchmarks/gpu_check.sh                 # PYTHON=... to choose the interpreter (default .venv/bin/python)
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
started=$(date +%s)

device=$("$PY" - <<'EOF' 2>/dev/null
import sys
try:
    import torch
except ImportError:
    print("torch is not installed"); sys.exit(1)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no CUDA device"); sys.exit(1)
p = torch.cuda.get_device_properties(0)
name = p.name.replace(" ", "_")
print(f"name={name} capability={p.major}.{p.minor} total_mb={p.total_memory / 2**20:.0f} torch={torch.__version__} cuda={torch.version.cuda}")
EOF
)
if [ $? -ne 0 ]; then
    echo "GPU_CHECK status=no_cuda message=\"${device:-python failed}: run benchmarks/gpu_check.sh on a machine with an NVIDIA GPU and a CUDA build of torch\""
    exit 3
fi
echo "GPU_CHECK check=device $device"

log_dir=${GPU_CHECK_LOG_DIR:-$(mktemp -d -t phi2tutor-gpu-check-XXXXXX)}
mkdir -p "$log_dir"
failed=0

run_check() {  # run_check NAME TIME_LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local log="$log_dir/$name.log" begin=$(date +%s) rc result
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    result=$(grep '^RESULT ' "$log" | tail -n 1)
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    [ "$rc" -eq 124 ] && result="timed_out_after_s=$limit ${result#RESULT }"
    echo "GPU_CHECK check=$name rc=$rc seconds=$(($(date +%s) - begin)) log=$log ${result#RESULT }"
}

run_check memory_phi2 240 "$PY" benchmarks/memory_phi2.py --shape phi2 --device cuda --steps 4 --no_breakdown
run_check attention_overflow 45 "$PY" benchmarks/attention_overflow.py --device cuda
run_check train_throughput 120 "$PY" benchmarks/train_throughput.py --device cuda --qlora --batch_size 1 \
    --max_length 512 --steps 20 --warmup_steps 3 --repeats 2
if "$PY" -m phi2tutor.cli doctor --help >/dev/null 2>&1; then
    run_check doctor 45 "$PY" -m phi2tutor.cli doctor --config configs/phi2-qlora-4gb.yaml
else
    echo "GPU_CHECK check=doctor rc=skipped reason=phi2tutor_doctor_not_available"
fi
echo "GPU_CHECK status=done failed=$failed seconds=$(($(date +%s) - started)) logs=$log_dir"
[ "$failed" -eq 0 ]
