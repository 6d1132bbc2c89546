"""The sm_90 compile report (bench/compile_report.py) builds the launches of a step for model
sized buckets without allocating them, by mirroring the Triton programs of the rules. This
checks the mirror against the programs themselves: for every rule, on a small bucket under the
interpreter, the same kernels with the same grids and constexprs in the same order. And it
checks that the committed reports were made from the sources as they are."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import trasmuon

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compile_report import (  # noqa: E402
    RULE_OF,
    RULES,
    adamw_launches,
    default_group,
    launches_for,
    report_sources,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check on CPU tensors")


def _signature(launches) -> list[tuple]:
    out = []
    for launch in launches:
        rec = launch.record()
        out.append((rec.name, rec.grid, rec.meta))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", RULES)
def test_the_report_compiles_what_the_programs_launch(rule, dtype):
    from trasmuon_kernels._launch import INTERPRETER

    bucket = (3, 24, 40)
    count, d_out, d_in = bucket
    params = [torch.nn.Parameter(torch.randn(d_out, d_in).to(dtype)) for _ in range(count)]
    opt = trasmuon.TrasMuon([{"params": params, "rule": RULE_OF[rule], **default_group(rule)}],
                            backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    (b,) = opt._plan.matrices
    prog = b.program
    real = _signature([*prog.pass1, *prog.ns, *prog.post_launches, *prog.finish_launches])
    mirror = _signature(launches_for(bucket, dtype, rule, props=INTERPRETER))
    assert real == mirror


def test_the_report_compiles_the_adamw_launch():
    from trasmuon_kernels._launch import INTERPRETER

    shapes = [(7,), (3, 5), (11,)]
    params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in shapes]
    opt = trasmuon.AdamW(params, backend="triton", betas=(0.9, 0.95), weight_decay=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    (b,) = opt._plan.adamw
    assert _signature(b.program.launches) == _signature(adamw_launches(shapes, torch.bfloat16, props=INTERPRETER))


@pytest.mark.parametrize("version", ["3.6.0", "3.9.0"])
def test_the_committed_reports_are_not_stale(version):
    """A kernel, launcher, config, shape list or the report script changed since the report
    in bench/results was made: its compiled facts may be wrong. Regenerate it (the command is
    in docs/benchmarks.md)."""
    import json

    path = ROOT / "bench" / "results" / f"compile_report_sm90_triton-{version}.json"
    report = json.loads(path.read_text())
    assert report["triton"] == version
    assert not report["problems"], report["problems"]
    recorded, current = report.get("sources", {}), report_sources()
    changed = sorted(k for k in recorded.keys() | current.keys() if recorded.get(k) != current.get(k))
    assert not changed, f"{path.name} is stale: regenerate it; changed since: {changed}"
