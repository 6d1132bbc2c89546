"""The example rule ``muon_rows`` (trasmuon/rules/muon_rows.py: Muon with per-row RMS
normalization) against an independent float64 statement of its formulas; it also runs in the
registry-driven tests (tests/test_fused_backend.py: Triton against eager) and on every
distributed layout (tests/test_layouts.py)."""

from __future__ import annotations

import io
import math

import pytest
import torch

import trasmuon
from trasmuon import reference as ref


def _oracle(w0: torch.Tensor, grads: list[torch.Tensor], *, lr: float, wd: float, momentum: float,
            beta2: float, eps: float) -> torch.Tensor:
    """Steps of the rule in float64, written out from its docstring."""
    w, m = w0.clone(), torch.zeros_like(w0)
    v = torch.zeros(w0.shape[0], dtype=torch.float64)
    d_out, d_in = w0.shape
    factor = math.sqrt(max(1.0, d_out / d_in))  # adjust_lr_fn=None: Muon's "original" scaling
    for g in grads:
        m = momentum * m + (1 - momentum) * g
        x = momentum * m + (1 - momentum) * g  # Nesterov
        o = ref.newton_schulz(x, ref.ns_schedule(ref.MUON_NS_COEFFICIENTS, 5), 1e-7, torch.float64)
        v = beta2 * v + (1 - beta2) * (o * o).mean(dim=1)
        r = lr * factor / (v.sqrt() + eps)
        w = (1 - lr * wd) * w - r[:, None] * o
    return w


@pytest.mark.parametrize("shape", [(7, 12), (12, 7), (1, 9)])
def test_float64_steps_follow_the_formulas(shape):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, dtype=torch.float64, generator=gen)
    grads = [torch.randn(shape, dtype=torch.float64, generator=gen) for _ in range(4)]
    p = torch.nn.Parameter(w0.clone())
    opt = trasmuon.Muon([{"params": [p], "rule": "muon_rows", "beta2": 0.9}], lr=0.02,
                        weight_decay=0.1, eps=1e-7, ns_dtype=torch.float64, backend="eager")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want = _oracle(w0, grads, lr=0.02, wd=0.1, momentum=0.95, beta2=0.9, eps=1e-7)
    torch.testing.assert_close(p.detach(), want, rtol=1e-10, atol=1e-12)


def test_state_and_checkpoints():
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(6, 10, generator=gen))
    opt = trasmuon.TrasMuon([{"params": [p], "rule": "muon_rows"}], lr=0.02)
    p.grad = torch.randn(6, 10, generator=gen)
    opt.step()
    assert set(opt.state[p]) == {"step", "momentum", "row_v"} and opt.state[p]["row_v"].shape == (6,)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    q = torch.nn.Parameter(p.detach().clone())
    loaded = trasmuon.TrasMuon([{"params": [q], "rule": "muon_rows"}], lr=0.02)
    buf.seek(0)
    loaded.load_state_dict(torch.load(buf))
    for o in (opt, loaded):
        o.param_groups[0]["params"][0].grad = torch.ones(6, 10)
        o.step()
    assert torch.equal(p, q)
    with pytest.raises(ValueError, match="beta2"):
        trasmuon.Muon([{"params": [q], "rule": "muon_rows", "beta2": 1.5}])
