#!/usr/bin/env bash
# Everything that needs a GPU, in one call (for a session lent an H100; see docs/benchmarks.md):
# compiled kernel parity, the Triton-backend parity tests, every benchmark suite, the kernel
# scripts, the authors' package if its wheels were carried, and the rendered report.
# Usage (repo root, on the GPU machine): OUT=/some/dir bash bench/run_gpu.sh
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps -e . 2>/dev/null || export PYTHONPATH=$PWD
log() { echo "== $*"; }
log "compiled parity: kernels and the Triton backend against the eager reference"
python -m pytest -q tests/kernels tests/test_fused_backend.py -x 2>&1 | tee "$OUT/gpu_pytest.log" | tail -5
log "benchmark suites"
python -m pytest -q bench --benchmark-only --benchmark-json="$OUT/bench_gpu.json" 2>&1 | tail -3
log "kernel scripts"
python bench/gpu_memory_passes.py --out "$OUT" 2>&1 | tail -15
authors=()
[ -d .authors-venv ] && authors=(--authors-venv .authors-venv)
python bench/gpu_newton_schulz.py --out "$OUT" "${authors[@]}" 2>&1 | tail -15
if [ -d .authors-venv ]; then
  .authors-venv/bin/python bench/authors/bench_authors.py --out "$OUT/authors_step_gpu.json" | tail -5
fi
log "report"
python bench/report.py "$OUT"/bench_gpu.json $( [ -f "$OUT/authors_step_gpu.json" ] && echo "$OUT/authors_step_gpu.json" ) \
  --out docs/benchmarks-gpu.md --title "Benchmarks on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
cp docs/benchmarks-gpu.md "$OUT/" 2>/dev/null || true
