#!/usr/bin/env bash
# Everything a short GPU slot (an H200, under 8 minutes) should run, in one call:
#   1. compiled parity against the eager reference (a failure stops the run before any
#      timing): the Newton-Schulz kernel tests and the prepared-launch tests on CUDA tensors,
#      every memory pass against its eager twin (bench/gpu_memory_passes.py --parity-only),
#      the fused backend against the eager one (tests/test_fused_backend.py);
#   2. Newton-Schulz (5 steps) at 1024..8192 and 4096x11008, a 12x768x3072 stack: ours
#      against the symmetric FLOP floor at the measured bf16 matmul rate and against
#      torch.optim.Muon's chain (bench/gpu_newton_schulz.py);
#   3. the memory passes against a measured device-to-device copy (bench/gpu_memory_passes.py);
#   4. the whole optimizer step of GPT-2 small and Qwen3-0.6B: ours on the Triton backend
#      against torch.optim.Muon + fused AdamW and against our eager backend (bench/gpu_step.py);
#   5. a short table (bench/gpu_summary.py), printed last.
# Every part runs under its own time limit (150 + 90 + 60 + 120 s at most, the parity parts
# side by side); a failing or timed-out part is reported in the table and the next one runs,
# except that failed parity stops the run. Raw results, with the GPU
# name and the torch/triton/CUDA versions, go to $OUT (default bench/results/gpu).
#
# Usage, from the repository root on the GPU machine:  OUT=/some/dir bash bench/run_gpu.sh
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
: > "$OUT/status.tsv"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PY=${PYTHON:-python}

# part NAME SECONDS CMD...: run CMD with a time limit, log to $OUT/NAME.log, record the status.
part() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/status.tsv"
  tail -n 4 "$OUT/$name.log"
  return $rc
}
timed_out() { [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; }

"$PY" - > "$OUT/env.json" <<'EOF' || true
import json, subprocess, sys, torch, triton
env = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
       "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, check=True).stdout.strip()
except (OSError, subprocess.CalledProcessError):
    env["driver"] = "unknown"
print(json.dumps(env))
EOF
cat "$OUT/env.json"

# 1. Parity, the parts side by side (Triton compiles dominate; the machine has the cores).
# The memory-pass kernel tests are interpreter tests (CPU tensors; they skip on a GPU
# machine): their compiled parity is gpu_memory_passes.py's. A failure stops the run before
# any timing; a time-out is reported and the timings still run.
pytest_q=("$PY" -m pytest -x -q -p no:cacheprovider)
part parity_newton_schulz 150 "${pytest_q[@]}" tests/kernels/test_newton_schulz.py & p1=$!
part parity_products 150 "${pytest_q[@]}" tests/kernels/test_ns_jit.py tests/kernels/test_gram.py \
  tests/kernels/test_ns_apply.py tests/kernels/test_fro_sumsq.py tests/kernels/test_launch_plans.py & p2=$!
part parity_memory_passes 150 "$PY" bench/gpu_memory_passes.py --parity-only --out "$OUT/memory_parity.json" & p3=$!
part parity_fused_backend 150 "${pytest_q[@]}" tests/test_fused_backend.py & p4=$!
failed=0
for pid in $p1 $p2 $p3 $p4; do
  wait "$pid"; rc=$?
  if [ $rc -ne 0 ] && ! timed_out $rc; then failed=1; fi
done
if [ $failed -ne 0 ]; then
  echo "compiled parity failed: no timings (logs in $OUT)"
  "$PY" bench/gpu_summary.py "$OUT"
  exit 1
fi

# 2-4. Timings.
part newton_schulz 90 "$PY" bench/gpu_newton_schulz.py --quick --no-compiled-reference \
  --shapes 1024x1024,2048x2048,4096x4096,8192x8192,4096x11008,12x768x3072 \
  --out "$OUT/newton_schulz.json"
part memory_passes 60 "$PY" bench/gpu_memory_passes.py --out "$OUT/memory_passes.json"
part step 120 "$PY" bench/gpu_step.py --budget-s 55 --out "$OUT/step.json"

# 5. The table.
"$PY" bench/gpu_summary.py "$OUT"
