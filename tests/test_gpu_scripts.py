"""The GPU scripts of ``bench/run_gpu.sh``, dry-run on the CPU under the Triton interpreter
(tiny shapes; the same rows and JSON as on a GPU, times meaningless), so that a change cannot
break them unnoticed before the next GPU slot. Each writes its JSON as it goes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--interpret-smoke",
                           "--out", str(out), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{script}: rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(out.read_text())


def test_newton_schulz_script(tmp_path):
    result = _run("gpu_newton_schulz.py", tmp_path / "ns.json")
    impls = {row["impl"] for row in result["rows"]}
    assert {"ours-bf16-in", "torch-muon"} <= impls, impls
    assert all("error" not in row for row in result["rows"])


def test_memory_passes_script(tmp_path):
    result = _run("gpu_memory_passes.py", tmp_path / "mp.json")
    assert result["parity"] and all(row["within_tolerance"] for row in result["parity"])


@pytest.mark.parametrize("impls", ["trasmuon-triton-cudagraph,torch-muon"])
def test_step_script(tmp_path, impls):
    result = _run("gpu_step.py", tmp_path / "step.json", "--impls", impls)
    rows = {row["impl"]: row for row in result["rows"]}
    assert set(rows) == set(impls.split(",")), rows
    assert all("median_ms" in row and "floor_ms" in row for row in rows.values()), rows
