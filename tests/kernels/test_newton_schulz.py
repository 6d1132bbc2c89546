"""Parity of the Triton Newton–Schulz launcher (trasmuon_kernels/newton_schulz.py).

Criterion. The float64 iteration ``reference.newton_schulz(x, schedule, eps, float64)`` on
the same (bf16-representable) input is the truth. The kernel's relative Frobenius error
against it must be no worse than K_RATIO times that of torch's own bf16 chain
(``reference.newton_schulz(..., bfloat16)``: bmm/baddbmm, one bf16 rounding per product;
on the CPU the reference computes each product in fp32 on the bf16 operands and rounds it).

Why K_RATIO = 1.5. The kernels perform the same roundings as torch's chain (fp32
accumulation, one round-to-nearest-even per product; under the interpreter the bf16
rounding is emulated bit for bit, see _ns_jit.py), minus one: the normalized input is never
rounded (the normalization is folded into the first products). Their errors are therefore
the same size but not the same numbers: a different fp32 summation order flips single bf16
roundings, and NS amplifies early perturbations along small singular directions (up to
prod(a) ~ 490x over the 5 default steps), so the ratio of two equally good bf16 chains
fluctuates per matrix. Measured under the interpreter over 8 seeds, on stacks so that each
error aggregates several matrices: ratios 0.53-1.00 for 1x7 (x16), 0.91-0.99 for
33x17/17x33 (x4), 0.89-0.97 for 31x47 (x3), 0.88-0.94 for 65x129; the worst shape seen,
2x16 (x16), reached 1.21 (1.32 in an earlier run). On the inputs of
test_parity_with_torch_bf16_chain: 1.036 (2x1x7, 2x7x1), 1.054 (2x33x17), 0.938
(2x17x33), 0.971 (65x129), 0.875 (129x65), 0.935 (3x31x47), 0.962 (3x47x31).
1.5 leaves margin for that scatter while structural errors are far outside
it: a 1% change of b in the last step gives a ratio of ~4.8, the schedule shifted by one
step ~3.9, reversed ~88 (test below); a missing term or a wrong mirror gives errors of
order 1 and the interpreter's bf16 garbage ~1e9. NS contracts perturbations of its early
steps (a 1% change of the first step's b moves the 5-step ratio to only ~1.3), so this
end-to-end criterion is not where small coefficient slips are caught: the product kernels
are each compared elementwise with float64 in test_gram.py / test_ns_apply.py, where any
coefficient error shows at the 2^-7 level. Every kernel error is also held to the bf16
chain tolerance of the table (2e-2).

Tests about plumbing (buffers, layouts, arguments) run 1 or 2 steps (2 exercises the
ping-pong buffer) to keep the interpreter time down.

Bitwise assertions. Here none compares a kernel with an eager twin: they compare the kernel
with itself (one matrix and the stack, a preallocated workspace, a replay, a given
``fro_sumsq`` computed by the same reduction kernel and config, a strided stack, a tuned
config run again, ``torch.compile`` with the aot_eager backend) or with exact zeros. The
kernels use no atomics and the compared runs launch the same kernels with the same configs,
so these hold compiled on a GPU too. The one exception, an fp32 input against its bf16
rounding (two kernel specializations), goes through ``assert_matches_twin``.
"""

from __future__ import annotations

import math

import pytest
import torch

from trasmuon import reference as ref
from trasmuon_kernels import newton_schulz as ns_mod
from trasmuon_kernels._launch import device_props
from trasmuon_kernels.fro_sumsq import fro_sumsq
from trasmuon_kernels.newton_schulz import (
    NSConfig,
    newton_schulz,
    newton_schulz_workspace,
)
from trasmuon_kernels.testing import TOLERANCES, assert_matches_twin, poison, relative_fro_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K_RATIO = 1.5
EPS = 1e-8
DEFAULT = ref.ns_schedule(ref.TRASMUON_NS_COEFFICIENTS, 5)


def bf16_input(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16).to(DEVICE)


def run(x, schedule=DEFAULT, *, steps=None, **kwargs):
    """The kernel on ``schedule`` (cut or extended to ``steps`` by ``reference.ns_schedule``,
    as the fused step resolves it) into a poisoned output."""
    if steps is not None:
        schedule = ref.ns_schedule(schedule, steps)
    out = poison(*x.shape, dtype=torch.bfloat16, device=DEVICE)
    got = newton_schulz(x, schedule, EPS, out=out, **kwargs)
    assert got is out
    assert not out.isnan().any(), "NaN in the output (an unwritten element?)"
    return out


def errors(out, x, schedule):
    truth = ref.newton_schulz(x.double(), schedule, EPS, torch.float64)
    chain = ref.newton_schulz(x, schedule, EPS, torch.bfloat16)
    return relative_fro_error(out, truth), relative_fro_error(chain, truth)


def assert_parity(out, x, schedule):
    kernel_err, torch_err = errors(out, x, schedule)
    assert kernel_err <= TOLERANCES[torch.bfloat16].fro, f"kernel error {kernel_err:.3e}"
    assert kernel_err <= K_RATIO * torch_err, (
        f"kernel error {kernel_err:.3e} > {K_RATIO} x torch bf16 error {torch_err:.3e}"
    )
    return kernel_err / torch_err


@pytest.mark.parametrize(
    "shape",
    [
        (2, 1, 7),
        (2, 7, 1),
        (2, 33, 17),
        (2, 17, 33),
        (65, 129),
        (129, 65),
        (3, 31, 47),
        (3, 47, 31),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
def test_parity_with_torch_bf16_chain(shape):
    x = bf16_input(*shape, seed=sum(shape))
    out = run(x)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert_parity(out, x, DEFAULT)


@pytest.mark.parametrize(
    "coefficients, steps",
    [
        (ref.MUON_NS_COEFFICIENTS, None),  # one triple: 5 steps
        (ref.MUON_NS_COEFFICIENTS, 1),
        (ref.TRASMUON_NS_COEFFICIENTS, None),  # the default 5
        (ref.TRASMUON_NS_COEFFICIENTS, 7),  # longer than given: repeats the last triple
        (((3.0, -3.2, 1.2), (2.0, -1.5, 0.5)), 4),
    ],
    ids=["muon-triple", "one-step", "default-5", "seven-steps", "custom-repeat"],
)
def test_schedules(coefficients, steps):
    x = bf16_input(12, 20, seed=7)
    n = steps if steps is not None else (5 if ref.is_ns_triple(coefficients) else len(coefficients))
    schedule = ref.ns_schedule(coefficients, n)
    out = run(x, schedule)
    assert_parity(out, x, schedule)


@pytest.mark.parametrize("which", ["last-b-1pct", "shifted"])
def test_wrong_schedule_fails_parity(which):
    # The criterion has teeth (see the module docstring for what it can and cannot see).
    x = bf16_input(12, 20, seed=7)
    a, b, c = DEFAULT[-1]
    wrong = (
        (*DEFAULT[:-1], (a, b * 1.01, c)) if which == "last-b-1pct" else (*DEFAULT[1:], DEFAULT[-1])
    )
    kernel_err, torch_err = errors(run(x, wrong), x, DEFAULT)
    assert kernel_err > 2 * K_RATIO * torch_err


def test_zero_matrices_give_zeros():
    x = bf16_input(2, 9, 14, seed=8)
    x[1] = 0.0
    rsq = poison(2, 9, dtype=torch.float32, device=DEVICE)
    out = run(x, row_sumsq_out=rsq)  # all 5 default steps
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(rsq[1], torch.zeros_like(rsq[1]))
    assert out[0].abs().sum() > 0 and rsq[0].min() > 0
    tall = run(torch.zeros(14, 9, dtype=torch.bfloat16, device=DEVICE), steps=2)
    assert torch.equal(tall, torch.zeros_like(tall))


def test_zero_steps_is_the_normalized_input():
    x = bf16_input(2, 6, 11, seed=9)
    out = run(x, steps=0)
    want = ref.newton_schulz(x.double(), (), EPS, torch.float64)
    assert relative_fro_error(out, want) <= 2**-8  # one bf16 rounding


def test_row_sumsq_out():
    x = bf16_input(2, 21, 40, seed=10)
    rsq = poison(2, 21, dtype=torch.float32, device=DEVICE)
    out = run(x, row_sumsq_out=rsq, steps=2)
    assert (
        relative_fro_error(rsq, ref.row_sumsq(out.double(), torch.float64))
        <= TOLERANCES[torch.float32].fro
    )
    tall_x = bf16_input(40, 21, seed=11)
    tall_rsq = poison(40, dtype=torch.float32, device=DEVICE)
    tall = run(tall_x, row_sumsq_out=tall_rsq, steps=2)
    assert (
        relative_fro_error(tall_rsq, ref.row_sumsq(tall.double(), torch.float64))
        <= TOLERANCES[torch.float32].fro
    )


def test_single_matrices_equal_the_stack():
    x = bf16_input(2, 10, 19, seed=12)
    cfg = ns_mod.default_config(2, 10, 19, device_props(DEVICE))
    stack = run(x, config=cfg, steps=2)
    for b in range(2):
        assert torch.equal(run(x[b], config=cfg, steps=2), stack[b])


def test_tall_is_the_transpose_of_wide():
    x = bf16_input(30, 13, seed=13)
    tall = run(x, steps=2)
    wide = run(x.mT.contiguous(), steps=2)
    assert relative_fro_error(tall, wide.mT.double()) <= TOLERANCES[torch.bfloat16].fro / 4


def test_fp32_input_is_rounded_on_load():
    """An fp32 input gives the bf16 input's result: bit for bit where the twins are bitwise
    (the interpreter; compiled, the fp32 specialization is another kernel binary, and for
    larger shapes another first-step config), always within the chain tolerance of float64."""
    g = torch.Generator().manual_seed(14)
    x32 = torch.randn(11, 17, generator=g).to(DEVICE)
    xb = x32.to(torch.bfloat16)
    truth = ref.newton_schulz(xb.double(), DEFAULT[:2], EPS, torch.float64)
    assert_matches_twin(run(x32, steps=2), run(xb, steps=2), truth, chain=True,
                        what="NS of an fp32 input")


def test_fp32_input_takes_the_first_step_configs():
    """From a 4-byte input, the first Gram and update run their own configs (H200: half the
    BLOCK_K, a 128x64 update tile: no spills, two blocks per SM); the later steps and a bf16
    input run the shared ones. Under the interpreter, with small explicit configs."""
    import dataclasses

    from trasmuon_kernels._launch import H200, INTERPRETER, record_launches

    big = ns_mod.default_config(1, 4096, 4096, H200, input_itemsize=4)
    assert big.first_gram.block_k == 32 and big.gram.block_k == 64
    assert (big.first_apply.block_n, big.first_apply.block_k) == (64, 32) and big.apply.block_n == 128
    plain = ns_mod.default_config(1, 4096, 4096, H200)
    assert plain.first_gram is None and plain.first_apply is None
    assert ns_mod.default_config(1, 40, 24, INTERPRETER, input_itemsize=4).first_gram is None

    g = torch.Generator().manual_seed(17)
    x32 = torch.randn(2, 24, 40, generator=g).to(DEVICE)
    base = ns_mod.default_config(2, 24, 40, device_props(DEVICE))
    cfg = dataclasses.replace(
        base, first_gram=dataclasses.replace(base.gram, block_k=16),
        first_apply=dataclasses.replace(base.apply, block_n=16, block_k=16))
    with record_launches() as records:
        out = run(x32, steps=2, config=cfg)
    products = [dict(r.meta) for r in records if r.name in ("_sym_gram_kernel", "_ns_apply_kernel")]
    assert products[0]["BLOCK_K"] == 16 and products[2]["BLOCK_N"] == 16  # step 1
    assert products[3]["BLOCK_K"] == base.gram.block_k  # step 2
    assert_parity(out, x32.to(torch.bfloat16), DEFAULT[:2])


def test_fro_sumsq_argument():
    x = bf16_input(2, 11, 17, seed=15)
    base = run(x, steps=2)
    assert torch.equal(run(x, fro_sumsq=fro_sumsq(x), steps=2), base)
    # e.g. from the momentum pass: fp32 sums in another order.
    other = run(x, fro_sumsq=(x.float() ** 2).sum((-2, -1)), steps=2)
    assert_parity(other, x, DEFAULT[:2])


def test_preallocated_workspace_and_leading_dims():
    x = bf16_input(2, 1, 9, 20, seed=16)
    base = run(x.reshape(2, 9, 20), steps=2).reshape(x.shape)
    ws = newton_schulz_workspace(x.shape, DEVICE, steps=2)
    for t in (ws.x, ws.gram, ws.poly, ws.fro, ws.partials):
        t.fill_(float("nan"))
    rsq = poison(2, 1, 9, dtype=torch.float32, device=DEVICE)
    assert torch.equal(run(x, workspace=ws, row_sumsq_out=rsq, steps=2), base)
    assert torch.equal(run(x, workspace=ws, steps=2), base)  # reused, still the same
    assert not rsq.isnan().any()


def test_stack_beyond_int32_offsets():
    """Offsets of a stack spanning more than 2^31 elements are computed in int64.

    The input and output are strided views whose matrices lie 2^30 + 3 elements apart, so
    matrix 2 starts past element 2^31 while every stride fits in int32 (an int32 product
    would wrap to a negative offset). The 4.3 GB buffers are only reserved, not touched:
    the kernels read and write the 3 small matrices in place (the interpreter passes CPU
    storages through without copying them).
    """
    m, n, batch, stride_b = 5, 9, 3, 2**30 + 3
    try:
        xbuf = torch.empty(stride_b * (batch - 1) + m * n, dtype=torch.bfloat16, device=DEVICE)
        obuf = torch.empty_like(xbuf)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve 2 x 4.3 GB of address space here")
    x = xbuf.as_strided((batch, m, n), (stride_b, n, 1))
    out = obuf.as_strided((batch, m, n), (stride_b, n, 1))
    vals = bf16_input(batch, m, n, seed=17)
    x.copy_(vals)
    out.fill_(float("nan"))
    rsq = poison(batch, m, dtype=torch.float32, device=DEVICE)
    assert x.storage_offset() + 2 * x.stride(0) > 2**31
    newton_schulz(x, DEFAULT[:2], EPS, out=out, row_sumsq_out=rsq)
    want_rsq = poison(batch, m, dtype=torch.float32, device=DEVICE)
    want = newton_schulz(vals, DEFAULT[:2], EPS, row_sumsq_out=want_rsq)
    assert torch.equal(out.clone(), want)
    assert torch.equal(rsq, want_rsq)


def test_autotune_is_opt_in(monkeypatch):
    monkeypatch.delenv(ns_mod.AUTOTUNE_ENV, raising=False)
    ns_mod.clear_tuned_configs()
    x = bf16_input(1, 6, 20, seed=18)
    run(x, steps=1)
    assert ns_mod.tuned_configs() == {}, "tuned without being asked"
    tuned = run(x, autotune=True, steps=1)
    ((key, cfg),) = ns_mod.tuned_configs().items()
    assert key[0] == (1, 6, 20) and isinstance(cfg, NSConfig)
    assert torch.equal(tuned, run(x, config=cfg, steps=1))
    assert_parity(tuned, x, DEFAULT[:1])
    ns_mod.clear_tuned_configs()


def test_torch_compile_fullgraph():
    x = bf16_input(2, 9, 5, seed=19)

    def fn(t, rsq):
        return (
            newton_schulz(
                t * 2.0, ref.ns_schedule(ref.MUON_NS_COEFFICIENTS, 2), EPS, row_sumsq_out=rsq
            ).float()
            + 1.0
        )

    rsq_c = poison(2, 9, dtype=torch.float32, device=DEVICE)
    rsq_e = poison(2, 9, dtype=torch.float32, device=DEVICE)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, rsq_c), fn(x, rsq_e))
    assert torch.equal(rsq_c, rsq_e)


def test_argument_errors():
    x = bf16_input(4, 6, seed=20)
    with pytest.raises(ValueError):
        newton_schulz(x, DEFAULT, EPS, out=x)  # aliasing
    with pytest.raises(ValueError):
        newton_schulz(x, DEFAULT, EPS, out=torch.empty(4, 6, device=DEVICE))  # not bf16
    with pytest.raises(TypeError, match="ns_schedule"):  # one triple is not a schedule
        newton_schulz(x, ref.MUON_NS_COEFFICIENTS, EPS)
    with pytest.raises(TypeError, match=r"schedule\[0\]"):
        newton_schulz(x, [(1.0, 2.0)], EPS)
    with pytest.raises(ValueError):
        newton_schulz(x[0], DEFAULT, EPS)
    with pytest.raises(ValueError):
        newton_schulz(x, DEFAULT, EPS, row_sumsq_out=torch.empty(6, device=DEVICE))
    assert math.isfinite(float(run(x, steps=1).float().sum()))
