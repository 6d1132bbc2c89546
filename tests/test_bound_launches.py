"""Bound launchers (``trasmuon_kernels._launch``): after its first call, a prepared launch
hands its arguments straight to the compiled kernel's launcher instead of going through
Triton's dispatch. Checked on the CPU with the stand-in sm_90 driver
(``bench/step_launches.py --dispatch triton``), under the installed Triton (3.9) and under
Triton 3.6 (the GPU image's, from the venv ``.ci/run`` builds): for every rule, one step's
launcher calls are Triton's own dispatch's, call for call (grid, stream, function, packed
metadata, every argument), and under a launch hook every launch goes through Triton's
dispatch again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_compile_sm90 import (
    BUILD_HINT,
    DEFAULT_TRITON36_PYTHON,
    REQUIRE_TRITON36_ENV,
    TRITON36_PYTHON_ENV,
)

ROOT = Path(__file__).resolve().parents[1]
RULES = ("trasmuon", "normuon", "muon", "namo_d", "adamw")


def _python(version: str) -> str:
    if version == "installed":
        return sys.executable
    python = Path(os.environ.get(TRITON36_PYTHON_ENV, DEFAULT_TRITON36_PYTHON))
    if not python.exists():
        if os.environ.get(REQUIRE_TRITON36_ENV):
            pytest.fail(f"{REQUIRE_TRITON36_ENV} is set but there is no Triton 3.6 Python at {python}; {BUILD_HINT}")
        pytest.skip(f"no Triton 3.6 Python at {python} (not required outside CI); {BUILD_HINT}")
    return str(python)


@pytest.mark.parametrize("version", ["installed", "triton-3.6"])
def test_bound_launchers_make_tritons_calls(version, tmp_path):
    out = tmp_path / "dispatch.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [_python(version), str(ROOT / "bench" / "step_launches.py"), "--dispatch", "triton",
         "--model", "gpt2-tiny", "--shrink", "1", "--host-steps", "2", "--rules", *RULES,
         "--json", str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0 and out.exists(), f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    if version == "triton-3.6":
        assert report["triton"].startswith("3.6.")
    for rule in RULES:
        r = report["rules"][rule]
        assert r["triton_launches"] > 0 and r["launcher_calls"] == r["triton_launches"], (rule, r)
        assert r["bound_calls_equal_triton_calls"], (rule, r)
        assert r["launcher_calls_with_the_hook_under_a_launch_hook"] == r["triton_launches"], (rule, r)


def test_what_counts_as_an_installed_hook():
    from triton.knobs import HookChain

    from trasmuon_kernels._launch import _hooked

    chain = HookChain()
    assert not _hooked(None) and not _hooked(chain)
    chain.add(print)
    assert _hooked(chain) and _hooked(print)  # (a bare function: an older Triton's hook)


def test_interpreted_launches_are_never_bound():
    """Under the interpreter a kernel call returns no compiled kernel: every call goes
    through Triton (the interpreter) again."""
    import torch

    from trasmuon_kernels.fro_sumsq import prepare_fro_sumsq

    x = torch.randn(3, 5, 7)
    launches = prepare_fro_sumsq(x)
    for launch in launches:
        launch()
        launch()
        assert not getattr(launch, "_bound", [])
