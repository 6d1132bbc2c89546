"""The GPU path, compiled for an H200 (sm_90) on every commit, without a GPU.

``bench/compile_report.py --variants`` compiles one launch of every kernel/constexpr variant
that a Triton optimizer step (and the package's other launchers) issue with the configs an
H200 gets, for the models of bench/shapes.py: it steps each model once with the rules' own
programs, every launch captured instead of run, and compiles with the installed Triton's own
argument specialization (a compile-only driver; nothing runs). It runs in a subprocess because
the kernels must be real ``JITFunction``s (this suite sets TRITON_INTERPRET=1), and once with
the test environment's Triton (3.9) and once with Triton 3.6, the GPU image's, from a small
venv that shares this one's packages (``.ci/run`` builds it; see docs/benchmarks.md); the
second run compiles the first run's job list (``--jobs``).

The rules (``compile_report.check``): every matrix product uses wgmma, every kernel fits two
blocks per SM, memory passes use 16-byte global loads, nothing spills or uses local memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compile_report import MATRIX_PRODUCTS, MEMORY_PASSES, VECTOR_KERNELS, check  # noqa: E402

# A Python whose first triton is 3.6 (default: the venv .ci/run builds), and whether it
# must exist (.ci/run sets it: in CI the 3.6 check may not be skipped).
TRITON36_PYTHON_ENV = "TRASMUON_TRITON36_PYTHON"
REQUIRE_TRITON36_ENV = "TRASMUON_REQUIRE_TRITON36"
DEFAULT_TRITON36_PYTHON = ROOT / ".venv" / "triton-3.6" / "bin" / "python"
BUILD_HINT = "build it with `.ci/run triton-venv 3.6.0` (next to the main .venv)"


def _compile_report(python: str, tmp_path: Path, jobs: list[str]) -> dict:
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [python, str(ROOT / "bench" / "compile_report.py"), *jobs, "--quiet", "--json", str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False,
    )
    # Exit status 1 means rule violations: reported by the tests below, with details.
    assert out.exists(), f"compile_report failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def job_list(tmp_path_factory) -> Path:
    """Where the installed Triton's run saves its compile jobs, which the 3.6 run compiles
    again (the list does not depend on the Triton version; stepping the models is most of a
    run's time)."""
    return tmp_path_factory.mktemp("sm90-jobs") / "jobs.pickle"


@pytest.fixture(scope="module")
def report_installed(tmp_path_factory, job_list) -> dict:
    return _compile_report(sys.executable, tmp_path_factory.mktemp("sm90-installed"),
                           ["--variants", "--save-jobs", str(job_list)])


@pytest.fixture(scope="module")
def report_triton36(tmp_path_factory, report_installed, job_list) -> dict:
    python = Path(os.environ.get(TRITON36_PYTHON_ENV, DEFAULT_TRITON36_PYTHON))
    if not python.exists():
        if os.environ.get(REQUIRE_TRITON36_ENV):
            pytest.fail(f"{REQUIRE_TRITON36_ENV} is set but there is no Triton 3.6 Python at {python}; {BUILD_HINT}")
        pytest.skip(f"no Triton 3.6 Python at {python} (not required outside CI); {BUILD_HINT}")
    return _compile_report(str(python), tmp_path_factory.mktemp("sm90-triton36"), ["--jobs", str(job_list)])


@pytest.fixture(params=["installed", "triton-3.6"])
def report(request) -> dict:
    return request.getfixturevalue("report_installed" if request.param == "installed" else "report_triton36")


def test_versions(report_installed, report_triton36):
    import triton

    assert report_installed["triton"] == triton.__version__
    assert report_triton36["triton"].startswith("3.6.")


def test_every_kernel_and_product_variant_is_compiled(report):
    kernels = {row["kernel"] for row in report["variants"]}
    assert kernels >= set(MATRIX_PRODUCTS) | set(MEMORY_PASSES) | set(VECTOR_KERNELS)
    products = {(row["kernel"], tuple(k for k in ("HAS_BIAS", "HAS_SUMSQ", "ROW_SUMSQ")
                                      if row["config"].get(k)))
                for row in report["variants"] if row["kernel"] in MATRIX_PRODUCTS}
    # Gram (first step with the norm folded in, later steps), polynomial, update (first,
    # middle, last with row sums).
    assert products >= {("_sym_gram_kernel", ()), ("_sym_gram_kernel", ("HAS_SUMSQ",)),
                        ("_sym_gram_kernel", ("HAS_BIAS",)), ("_ns_apply_kernel", ()),
                        ("_ns_apply_kernel", ("HAS_SUMSQ",)), ("_ns_apply_kernel", ("ROW_SUMSQ",))}
    # Wide and tall matrices (Z or Z^T read in place) compile to different kernels.
    gram_sites = [row["sites"] for row in report["variants"] if row["kernel"] == "_sym_gram_kernel"]
    assert len(gram_sites) >= 5
    big = [row for row in report["variants"] if row["kernel"] in MATRIX_PRODUCTS
           and (row["config"].get("BLOCK"), row["config"].get("BLOCK_M")) in ((128, None), (None, 128))]
    assert big, "no 128x128 product among the H200 configs"


def test_sm90_rules(report):
    problems = check(report)
    assert not problems, f"Triton {report['triton']}:\n" + "\n".join(problems)
