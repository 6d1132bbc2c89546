"""The sm_90 compile report (bench/compile_report.py) compiles what the rules' own Triton
programs launch: it steps an optimizer over each model's parameters once, with every launch
captured instead of run (``step_launches``). This checks, under the interpreter on a small
model, that the captured launches are exactly those a real step issues (same kernels, grids,
constexprs, in order), each attributed to its bucket; and that the committed reports were
made from the sources as they are."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import trasmuon

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compile_report import RULE_OF, RULES, default_group, report_sources, step_launches  # noqa: E402
from bench.shapes import gpt2  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check on CPU tensors")

# GPT-2's structure at 1 x 24: four matrix shapes (wide, tall, square), AdamW params.
PARAM_SPECS = gpt2(1, 24, vocab=40, ctx=8)


def _signature(launches) -> list[tuple]:
    return [(r.name, r.grid, r.meta) for r in (launch.record() for launch in launches)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", RULES)
def test_the_report_compiles_what_a_step_launches(rule, dtype):
    from trasmuon_kernels._launch import INTERPRETER, record_launches

    captured = step_launches(PARAM_SPECS, dtype, rule, props=INTERPRETER)
    gen = torch.Generator().manual_seed(0)
    matrices, others = [], []
    for shape, count, kind in PARAM_SPECS:
        for _ in range(count):
            p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
            p.grad = torch.randn(shape, generator=gen).to(dtype)
            (matrices if kind == "matrix" else others).append(p)
    opt = trasmuon.TrasMuon([{"params": matrices, "rule": RULE_OF[rule], **default_group(rule)},
                             {"params": others, "rule": "adamw"}], backend="triton")
    with record_launches() as records:
        opt.step()
    assert [(r.name, r.grid, r.meta) for r in records] == _signature(
        [launch for _, launches in captured for launch in launches])
    labels = {label for label, _ in captured}
    matrix_buckets = {f"{len(b.params)}x{b.shape[0]}x{b.shape[1]}" for b in opt._plan.matrices}
    assert labels - {"plan"} == matrix_buckets | {f"adamw {len(others)} params"}
    # Only torch operations (a zeroing, a copy) belong to no bucket.
    assert all(not hasattr(launch, "kernel") for label, launches in captured if label == "plan"
               for launch in launches)


@pytest.mark.parametrize("version", ["3.6.0", "3.9.0"])
def test_the_committed_reports_are_not_stale(version):
    """A kernel, launcher, config, Triton program, shape list or the report script changed
    since the report in bench/results was made: its compiled facts may be wrong. Regenerate
    it (the command is in docs/benchmarks.md)."""
    import json

    path = ROOT / "bench" / "results" / f"compile_report_sm90_triton-{version}.json"
    report = json.loads(path.read_text())
    assert report["triton"] == version
    assert not report["problems"], report["problems"]
    recorded, current = report.get("sources", {}), report_sources()
    changed = sorted(k for k in recorded.keys() | current.keys() if recorded.get(k) != current.get(k))
    assert not changed, f"{path.name} is stale: regenerate it; changed since: {changed}"
