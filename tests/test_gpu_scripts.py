"""``bench/run_gpu.sh``, dry-run on the CPU (``SMOKE=1``): every timing part of the GPU slot
runs under Triton's interpreter with tiny shapes (the same rows and JSON as on a GPU, times
meaningless), so that a change cannot break the script or its parts unnoticed before the next
GPU slot. The parity parts are the test suite's own tests, which run here anyway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_gpu_sh_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    status = dict(line.split("\t")[:2] for line in (tmp_path / "status.tsv").read_text().splitlines())
    assert status == {"newton_schulz": "0", "memory_passes": "0", "step": "0", "profile_step": "0"}, status
    ns = json.loads((tmp_path / "newton_schulz.json").read_text())
    assert {"ours-bf16-in", "torch-muon"} <= {row["impl"] for row in ns["rows"]}
    assert all("error" not in row for row in ns["rows"])
    memory = json.loads((tmp_path / "memory_passes.json").read_text())
    assert memory["parity"] and all(row["within_tolerance"] for row in memory["parity"])
    step = {row["impl"]: row for row in json.loads((tmp_path / "step.json").read_text())["rows"]}
    assert set(step) == {"trasmuon-triton-cudagraph", "torch-muon"}, step
    assert all("median_ms" in row for row in step.values()), step
    profile = json.loads((tmp_path / "profile_step.json").read_text())
    assert profile["kernels"] and abs(sum(r["share"] for r in profile["kernels"]) - 1.0) < 1e-6
    summary = (tmp_path / "summary.txt").read_text()
    assert "Whole optimizer step" in summary and "torch.profiler" in summary
