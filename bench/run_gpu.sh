#!/usr/bin/env bash
# Everything a short GPU slot (an H200, one command of at most 10 minutes) should run, in one
# call:
#   1. compiled parity against the eager reference (a failure stops the run before any
#      timing): the Newton-Schulz kernel tests and the prepared-launch tests on CUDA tensors,
#      every memory pass against its eager twin (bench/gpu_memory_passes.py --parity-only),
#      the fused backend against the eager one (tests/test_fused_backend.py); beside them, the
#      step's kernels are compiled into Triton's disk cache (bench/gpu_step.py --compile-only),
#      so that no timing part waits for a compile;
#   2. Newton-Schulz (5 steps) at 1024..8192 and 4096x11008, a 12x768x3072 stack: ours
#      against the symmetric FLOP floor at the measured bf16 matmul rate and against
#      torch.optim.Muon's chain (bench/gpu_newton_schulz.py);
#   3. the memory passes against a measured device-to-device copy (bench/gpu_memory_passes.py);
#   4. the whole optimizer step of GPT-2 small and Qwen3-0.6B: ours on the Triton backend,
#      captured by itself (cuda_graph=True) and by hand, against torch.optim.Muon + fused
#      AdamW, pytorch_optimizer's Muon and NorMuon, heavyball's Muon (those two packages from
#      .peers/site, made by bench/fetch_peers.sh where there is network; rows that say "not
#      installed" without it) and against our eager backend (bench/gpu_step.py);
#   5. one GPT-2-small TrasMuon step under torch.profiler: device time per kernel beside its
#      floor (bench/gpu_profile_step.py);
#   6. a short table (bench/gpu_summary.py), printed last.
# Every part runs under its own time limit (120 s for the parity phase, then 120 + 60 + 150 +
# 45 s at most: 495 s in all); a failing or timed-out part is reported in the table and the
# next one runs, except that failed parity stops the run. Every timing script writes its JSON
# as it goes, so a part cut off keeps what it measured, and the timing parts get a budget a
# little under their limit (--budget-s), past which they record what is left as skipped and
# end by themselves. Raw results, with the GPU name and the torch/triton/CUDA versions, go to
# $OUT (default bench/results/gpu).
#
# Usage, from the repository root on the GPU machine:  OUT=/some/dir bash bench/run_gpu.sh
# SMOKE=1: the same parts on the CPU under Triton's interpreter with tiny shapes (the parity
# parts are the test suite's, which CI runs anyway: skipped), to check this script without a
# GPU (tests/test_gpu_scripts.py).
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
: > "$OUT/status.tsv"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The peers' packages where the machine has no network: unpacked wheels (bench/fetch_peers.sh).
for dir in "$PWD"/.peers/*/; do
  [ -d "$dir" ] && [ "$(basename "$dir")" != wheels ] && PYTHONPATH="$PYTHONPATH:${dir%/}"
done
unset TRITON_INTERPRET
PY=${PYTHON:-python}
SMOKE=${SMOKE:-0}
smoke=()
[ "$SMOKE" = 1 ] && smoke=(--interpret-smoke)

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
import importlib.metadata as md, json, subprocess, sys, torch, triton
env = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
       "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for name in ("numpy", "pytorch-optimizer", "heavyball"):  # the peers' and what they import
    try:
        env[name] = md.version(name)
    except md.PackageNotFoundError:
        env[name] = None
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
failed=0
pids=()
if [ "$SMOKE" != 1 ]; then
  part parity_newton_schulz 120 "${pytest_q[@]}" tests/kernels/test_newton_schulz.py & pids+=($!)
  part parity_products 120 "${pytest_q[@]}" tests/kernels/test_ns_jit.py tests/kernels/test_gram.py \
    tests/kernels/test_ns_apply.py tests/kernels/test_fro_sumsq.py tests/kernels/test_launch_plans.py & pids+=($!)
  part parity_memory_passes 120 "$PY" bench/gpu_memory_passes.py --parity-only --out "$OUT/memory_parity.json" & pids+=($!)
  part parity_fused_backend 120 "${pytest_q[@]}" tests/test_fused_backend.py & pids+=($!)
  # (compiles only: its failures are the step part's to report)
  part compile_step 120 "$PY" bench/gpu_step.py --compile-only --budget-s 100 --out "$OUT/compile_step.json" &
  compile_pid=$!
fi
for pid in ${pids[@]+"${pids[@]}"}; do
  wait "$pid"; rc=$?
  if [ $rc -ne 0 ] && ! timed_out $rc; then failed=1; fi
done
[ -n "${compile_pid:-}" ] && wait "$compile_pid"
if [ $failed -ne 0 ]; then
  echo "compiled parity failed: no timings (logs in $OUT)"
  "$PY" bench/gpu_summary.py "$OUT"
  exit 1
fi

# 2-5. Timings.
ns_shapes=(--quick --no-compiled-reference --shapes 1024x1024,2048x2048,4096x4096,8192x8192,4096x11008,12x768x3072)
[ "$SMOKE" = 1 ] && ns_shapes=()
part newton_schulz 120 "$PY" bench/gpu_newton_schulz.py ${smoke[@]+"${smoke[@]}"} ${ns_shapes[@]+"${ns_shapes[@]}"} \
  --budget-s 100 --out "$OUT/newton_schulz.json"
part memory_passes 60 "$PY" bench/gpu_memory_passes.py ${smoke[@]+"${smoke[@]}"} --budget-s 45 \
  --out "$OUT/memory_passes.json"
step_impls=()
[ "$SMOKE" = 1 ] && step_impls=(--impls trasmuon-triton-cudagraph,torch-muon,pto-muon,pto-normuon,heavyball-muon)
part step 150 "$PY" bench/gpu_step.py ${smoke[@]+"${smoke[@]}"} ${step_impls[@]+"${step_impls[@]}"} --budget-s 65 --out "$OUT/step.json"
part profile_step 45 "$PY" bench/gpu_profile_step.py ${smoke[@]+"${smoke[@]}"} --out "$OUT/profile_step.json"

# 6. The table.
"$PY" bench/gpu_summary.py "$OUT"
