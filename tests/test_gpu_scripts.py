"""``bench/run_gpu.sh``, dry-run on the CPU (``SMOKE=1``): every timing part of the GPU slot
runs under Triton's interpreter with tiny shapes (the same rows and JSON as on a GPU, times
meaningless), so that a change cannot break the script or its parts unnoticed before the next
GPU slot. The parity parts are the test suite's own tests, which run here anyway."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = {"pto-muon": "pytorch_optimizer", "pto-normuon": "pytorch_optimizer",
         "heavyball-muon": "heavyball"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONWARNINGS="ignore", **extra)
    return env


def test_run_gpu_sh_dry_run(tmp_path):
    env = _env(SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable)
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
    assert set(step) == {"trasmuon-triton-cudagraph", "torch-muon", *PEERS}, step
    for impl, row in step.items():
        # a peer is timed where its package imports, and says it is not installed elsewhere
        if impl in PEERS and importlib.util.find_spec(PEERS[impl]) is None:
            assert row["error"].startswith("not installed: "), row
        else:
            assert "median_ms" in row, row
    profile = json.loads((tmp_path / "profile_step.json").read_text())
    kernels = {row["kernel"]: row for row in profile["kernels"]}
    assert kernels and abs(sum(r["share"] for r in kernels.values()) - 1.0) < 1e-6
    assert profile["rates"]["source"] == "stand-in"
    # every memory pass and NS product of the step matched to its floor, the small ones none
    for name in ("_momentum_energy_kernel", "_update_kernel", "_adamw_kernel", "_sym_gram_kernel",
                 "_ns_apply_kernel"):
        assert kernels[name]["floor_us"] > 0 and kernels[name]["fraction_of_floor"] > 0, kernels[name]
    assert "floor_us" not in kernels["_gate_kernel"]
    summary = (tmp_path / "summary.txt").read_text()
    assert "Whole optimizer step" in summary and "torch.profiler" in summary and "floor us" in summary


def test_budgets_skip_what_is_left(tmp_path):
    """A spent budget: every shape and implementation gets a row saying it was skipped, the
    JSON is complete and the exit status 1 (the part did not run everything)."""
    for script, rows_of in (("gpu_newton_schulz.py", lambda r: r["rows"]),
                            ("gpu_memory_passes.py", lambda r: r["parity"])):
        out = tmp_path / f"{script}.json"
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--interpret-smoke",
                               "--budget-s", "0", "--out", str(out)], env=_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 1, f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        rows = rows_of(json.loads(out.read_text()))
        assert rows and all(row["error"].startswith("skipped: ") for row in rows), rows
        if script == "gpu_newton_schulz.py":  # one row per shape and implementation
            assert len(rows) == len({tuple(r["shape"]) for r in rows}) * len({r["impl"] for r in rows})


def test_peers_step_and_keep_their_gradients():
    """Every installed peer moves the params, and leaves ``p.grad`` in place: the timing
    scripts take repeated steps on the same gradients (heavyball frees them by default)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.common import SMOKE_SPECS, make_params, make_step

    installed = [impl for impl, module in PEERS.items() if importlib.util.find_spec(module)]
    for impl in installed:
        matrices, others = make_params(SMOKE_SPECS, "cpu", torch.float32)
        start = [p.detach().clone() for p in matrices + others]
        step, _ = make_step(impl, matrices, others, compile_peers=False)
        step()
        step()
        for p, p0 in zip(matrices + others, start, strict=True):
            assert p.grad is not None and not torch.equal(p.detach(), p0), impl
