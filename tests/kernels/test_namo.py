"""NAMO's kernel pieces against their eager twins, judged against float64 evaluations with the
tolerance table: the factor kernel (``trasmuon_kernels.namo`` vs ``reference.namo_factors_``),
the momentum pass's column energies of the Newton-Schulz input, and the update pass with a
decay and a step per matrix or per column."""

from __future__ import annotations

import pytest
import torch

from trasmuon import reference as ref
from trasmuon_kernels.momentum_energy import momentum_energy_pass_
from trasmuon_kernels.namo import WEIGHT_DECAY_MODES, namo_factors_
from trasmuon_kernels.testing import assert_close_to_reference, poison
from trasmuon_kernels.update import DecayPerColumn, DecayPerMatrix, StepSize, update_pass_

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter tests on CPU tensors; on a GPU run bench/gpu_memory_passes.py"
)

CASES = [  # (count, d_out, d_in)
    (1, 9, 1), (3, 12, 37), (2, 1, 130), (4, 33, 5000),
]


def _inputs(count, d_in, seed, zero_col=False):
    gen = torch.Generator().manual_seed(seed)
    gsum = torch.rand(count, d_in, generator=gen) * 3.0
    nsum = torch.rand(count, d_in, generator=gen) * 2.0
    if zero_col:
        gsum[:, 0] = 0.0
        nsum[:, 0] = 0.0
    return gsum, nsum


@pytest.mark.parametrize("mode", ["adaptive", "lr"])
@pytest.mark.parametrize("clamp", [None, 0.75, 1.0, 0.0])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_factors_follow_the_reference(case, clamp, mode):
    count, d_out, d_in = case
    gsum, nsum = _inputs(count, d_in, sum(case), zero_col=d_in > 1)
    shape_v = (count, d_in) if clamp is not None else (count,)
    v0 = torch.rand(shape_v, generator=torch.Generator().manual_seed(5)) * (count > 2)
    steps = torch.tensor([1.0, 7.0, 123.0, 40000.0][:count])
    lr = torch.tensor(0.02)
    kw = dict(betas=(0.95, 0.99), eps=1e-8, weight_decay=0.1, weight_decay_mode=mode, clamp=clamp)
    scale_shape = ref.namo_shape_factor(0.2, d_out, d_in)
    v = v0.clone()
    decay, step = namo_factors_(v, gsum, nsum, steps, lr, scale_shape=scale_shape,
                                bias_eps=ref.NAMO_BIAS_EPS,
                                decay_out=poison(*shape_v, dtype=torch.float32),
                                step_out=poison(*shape_v, dtype=torch.float32), **kw)
    for b in range(count):  # the reference, in float64, one matrix at a time
        v64 = v0[b].double().clone()
        want = ref.namo_factors_(v64, gsum[b].double(), nsum[b].double(), int(steps[b]), 0.02,
                                 scale=0.2, d_out=d_out, d_in=d_in, **kw)
        assert_close_to_reference(v[b], v64, dtype=torch.float32, what="v")
        assert_close_to_reference(step[b], torch.as_tensor(want["step_up"]).double(),
                                  dtype=torch.float32, what="step_up")
        assert_close_to_reference(decay[b], torch.as_tensor(want["decay"], dtype=torch.float64).expand_as(step[b]),
                                  dtype=torch.float32, what="decay")


def test_weight_decay_modes_match_the_rule():
    assert WEIGHT_DECAY_MODES == ref.WEIGHT_DECAY_MODES


def test_factors_of_zero_gradients_are_zero_steps_not_nan():
    zeros = torch.zeros(2, 16)
    for clamp, v in ((None, torch.zeros(2)), (0.75, torch.zeros(2, 16))):
        decay, step = namo_factors_(v, zeros, zeros, torch.tensor([1.0, 2.0]), torch.tensor(0.1),
                                    betas=(0.95, 0.99), eps=1e-8, weight_decay=0.1,
                                    scale_shape=0.8, weight_decay_mode="adaptive", clamp=clamp,
                                    bias_eps=ref.NAMO_BIAS_EPS)
        assert torch.equal(step, torch.zeros_like(step)) and torch.equal(decay, torch.ones_like(decay))


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_pass_reduces_the_column_energies_of_the_input(nesterov):
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(3, 21, 70, generator=gen).bfloat16()
    momentum = torch.randn(3, 21, 70, generator=gen)
    m_ref = momentum.double().clone()
    out = momentum_energy_pass_(grad, momentum, 0.9, nesterov=nesterov, energy_source="grad",
                                input_energy_out=poison(3, 70, dtype=torch.float32))
    g64 = grad.double()
    m_ref = m_ref + 0.1 * (g64 - m_ref)
    n_ref = 0.1 * g64 + 0.9 * m_ref if nesterov else m_ref
    assert_close_to_reference(out.input_energy, (n_ref * n_ref).sum(-2), dtype=torch.float32,
                              what="column energies of N")
    assert_close_to_reference(out.energy, (g64 * g64).sum(-2), dtype=torch.float32,
                              what="column energies of G")


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_pass_with_a_decay_and_a_step_per_matrix_or_column(columns, dtype):
    gen = torch.Generator().manual_seed(4)
    count, d_out, d_in = 3, 17, 45
    w = torch.randn(count, d_out, d_in, generator=gen).to(dtype)
    o = torch.randn(count, d_out, d_in, generator=gen).bfloat16()
    shape = (count, d_in) if columns else (count,)
    decay = 1.0 - 0.1 * torch.rand(shape, generator=gen)
    step = 0.05 * torch.rand(shape, generator=gen)
    want = w.double() * (decay.double()[:, None, :] if columns else decay.double()[:, None, None])
    want = want - o.double() * (step.double()[:, None, :] if columns else step.double()[:, None, None])
    got = w.clone()
    if columns:
        update_pass_(got, o, lr=torch.tensor(0.02), row=StepSize(1.0), col_gate=step, decay=DecayPerColumn(decay))
    else:
        update_pass_(got, o, lr=torch.tensor(0.02), row=StepSize(step), decay=DecayPerMatrix(decay))
    assert_close_to_reference(got, want, what="W")
