"""Memory pass 1 (trasmuon_kernels.momentum_energy) against its eager twin
``reference.momentum_energy_pass_`` and a float64 evaluation of the same inputs.

Exactness: the momentum update and the rounded Newton-Schulz input X are judged against float64
with the table, and are bit-identical to the eager twin (same fma-form lerp as ATen's CPU kernel,
round-to-nearest-even bf16) where ``trasmuon_kernels.testing.bitwise_twins()`` holds (Triton's
interpreter with a single-rounding ``tl.fma``, Triton 3.9; torch 2.11 and 2.13), through
``assert_matches_twin``. The sums (column energies, ||X||_F^2) are judged against float64 with the
float32 tolerance of the table. The other bitwise assertions compare the kernel with itself
(layouts, pointer tables, splits: the same arithmetic in the same order), which holds anywhere.
"""

from __future__ import annotations

import pytest
import torch

from trasmuon import reference as ref
from trasmuon_kernels._common import PassConfig, TensorBucket, default_config
from trasmuon_kernels._launch import H200
from trasmuon_kernels.momentum_energy import column_energy, momentum_energy_pass_
from trasmuon_kernels.testing import assert_close_to_reference, assert_matches_twin, poison

# These check bit-exactness against the CPU reference under Triton's interpreter, on CPU
# tensors; on a GPU machine the compiled kernels' parity is bench/gpu_memory_passes.py's.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter tests on CPU tensors; on a GPU run bench/gpu_memory_passes.py"
)

SHAPES = [(1, 37), (33, 1), (3, 1000), (257, 129)]
COUNTS = [1, 7]
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BETA = 0.95


def _inputs(count, d_out, d_in, grad_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(count, d_out, d_in, generator=gen).to(grad_dtype)
    momentum = torch.randn(count, d_out, d_in, generator=gen) * 0.5
    return grad, momentum


def _poisoned_outputs(count, d_out, d_in, ns_dtype=torch.bfloat16, energy=True):
    return dict(
        x_out=poison(count, d_out, d_in, dtype=ns_dtype),
        energy_out=poison(count, d_in, dtype=torch.float32) if energy else None,
        sqnorm_out=poison(count, dtype=torch.float32),
    )


def _float64_pass(momentum, grad, beta, nesterov, energy_source):
    """The same pass evaluated in float64 from the same inputs (momentum is not modified)."""
    m64 = momentum.double()
    x64, e64, _ = ref.momentum_energy_pass_(
        m64, grad.double(), beta, nesterov=nesterov, energy_source=energy_source,
        ns_dtype=torch.float64,
    )
    return m64, x64, e64


def _check_against_reference(res, grad, momentum_before, momentum_after, *, beta, nesterov,
                             energy_source, ns_dtype=torch.bfloat16):
    twin_m = momentum_before.clone()
    x_twin, _, _ = ref.momentum_energy_pass_(
        twin_m, grad, beta, nesterov=nesterov, energy_source=energy_source, ns_dtype=ns_dtype
    )
    # Element-wise stages: against float64 from the same inputs, and bit for bit with the
    # eager twin where that is guaranteed (trasmuon_kernels.testing.bitwise_twins).
    m64, x64, e64 = _float64_pass(momentum_before, grad, beta, nesterov, energy_source)
    assert_matches_twin(momentum_after, twin_m, m64, what="momentum")
    assert_matches_twin(res.x, x_twin, x64, what="Newton-Schulz input")
    if energy_source is None:
        assert res.energy is None
    else:
        assert_close_to_reference(res.energy, e64, what="column energy")
    sq64 = (x_twin.double() ** 2).sum(dim=(-2, -1))  # the norm of the rounded matrix
    assert_close_to_reference(res.x_sqnorm, sq64, what="||X||_F^2")


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
def test_pass_matches_reference(shape, count, grad_dtype):
    d_out, d_in = shape
    grad, momentum = _inputs(count, d_out, d_in, grad_dtype, seed=d_out + count)
    before = momentum.clone()
    # Alternate the options over the grid so every one meets every shape.
    nesterov = (d_out + count) % 2 == 0
    source = ("momentum", "grad")[(d_in + count) % 2]
    res = momentum_energy_pass_(
        grad, momentum, BETA, nesterov=nesterov, energy_source=source,
        **_poisoned_outputs(count, d_out, d_in),
    )
    _check_against_reference(res, grad, before, momentum, beta=BETA, nesterov=nesterov,
                             energy_source=source)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("energy_source", ["momentum", "grad", None])
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_options(nesterov, energy_source, ns_dtype):
    grad, momentum = _inputs(3, 17, 23, torch.bfloat16, seed=5)
    before = momentum.clone()
    res = momentum_energy_pass_(
        grad, momentum, BETA, nesterov=nesterov, energy_source=energy_source, ns_dtype=ns_dtype,
        **_poisoned_outputs(3, 17, 23, ns_dtype, energy=energy_source is not None),
    )
    assert res.x.dtype == ns_dtype
    _check_against_reference(res, grad, before, momentum, beta=BETA, nesterov=nesterov,
                             energy_source=energy_source, ns_dtype=ns_dtype)


@pytest.mark.parametrize("beta", [0.3, 0.9])
def test_large_weight_lerp_branch(beta):
    # 1 - beta >= 0.5 takes torch's other lerp form: end - (end - start) * (1 - w).
    grad, momentum = _inputs(2, 9, 31, torch.float32, seed=11)
    before = momentum.clone()
    res = momentum_energy_pass_(grad, momentum, beta, nesterov=True, **_poisoned_outputs(2, 9, 31))
    _check_against_reference(res, grad, before, momentum, beta=beta, nesterov=True,
                             energy_source="momentum")


def test_zero_columns_and_ties():
    grad, momentum = _inputs(2, 40, 12, torch.float32, seed=3)
    grad[:, :, 3] = 0.0
    momentum[:, :, 3] = 0.0  # an all-zero column: energy exactly 0
    grad[:, :, 7] = grad[:, :, 5]
    momentum[:, :, 7] = momentum[:, :, 5]  # identical columns: tied energies
    res = momentum_energy_pass_(grad, momentum, BETA, **_poisoned_outputs(2, 40, 12))
    assert torch.equal(res.energy[:, 3], torch.zeros(2))
    assert torch.equal(res.energy[:, 7], res.energy[:, 5])


def test_bursty_columns():
    grad, momentum = _inputs(7, 64, 50, torch.bfloat16, seed=4)
    grad[:, :, :3] *= 1000  # a few columns 1e3x the rest: energies 1e6x
    before = momentum.clone()
    res = momentum_energy_pass_(grad, momentum, BETA, energy_source="grad",
                                **_poisoned_outputs(7, 64, 50))
    _check_against_reference(res, grad, before, momentum, beta=BETA, nesterov=False,
                             energy_source="grad")
    assert (res.energy[:, :3].min(dim=1).values > 1e5 * res.energy[:, 3:].max(dim=1).values).all()


@pytest.mark.parametrize("shape", [(257, 129), (12, 40)], ids=["tall", "wide"])
def test_transpose_tall_layout(shape):
    d_out, d_in = shape
    grad, momentum = _inputs(3, d_out, d_in, torch.float32, seed=6)
    m2 = momentum.clone()
    plain = momentum_energy_pass_(grad, momentum, BETA)
    res = momentum_energy_pass_(grad, m2, BETA, transpose_tall=True)
    assert res.x.shape == (3, d_out, d_in)
    assert torch.equal(res.x, plain.x)
    if d_out > d_in:  # stored as the (B, d_in, d_out) matrix Newton-Schulz iterates on
        assert res.x.mT.is_contiguous() and not res.x.is_contiguous()
    else:
        assert res.x.is_contiguous()


def test_pointer_table_lists_match_stack():
    grad, momentum = _inputs(5, 33, 20, torch.bfloat16, seed=7)
    stacked_m = momentum.clone()
    stacked = momentum_energy_pass_(grad, stacked_m, BETA, nesterov=True)
    # Separate allocations, not views of one buffer, so the table holds unrelated addresses.
    grads = [g.clone() for g in grad]
    moms = [m.clone() for m in momentum]
    res = momentum_energy_pass_(grads, moms, BETA, nesterov=True, **_poisoned_outputs(5, 33, 20))
    assert torch.equal(torch.stack(moms), stacked_m)
    assert torch.equal(res.x, stacked.x)
    assert torch.equal(res.energy, stacked.energy)
    assert torch.equal(res.x_sqnorm, stacked.x_sqnorm)
    # A prebuilt bucket (the optimizer's cached table) and a mixed list/stack call.
    bucket = TensorBucket.of(moms, "momentum")
    assert bucket.uses_table and bucket.count == 5 and bucket.table.dtype == torch.int64
    again = momentum_energy_pass_(grad, bucket, BETA, nesterov=True)
    twin = stacked_m.clone()
    ref.momentum_energy_pass_(twin, grad, BETA, nesterov=True, energy_source="momentum")
    m64 = _float64_pass(stacked_m, grad, BETA, True, "momentum")[0]
    assert_matches_twin(torch.stack(moms), twin, m64, what="momentum (prebuilt table)")
    assert again.energy is not None


def test_strided_inputs_and_in_place_view():
    gen = torch.Generator().manual_seed(8)
    # G stored transposed; M a strided window of a larger buffer that must stay untouched.
    grad = torch.randn(3, 21, 17, generator=gen).mT  # (3, 17, 21), column-major matrices
    buffer = torch.randn(3, 40, 50, generator=gen)
    momentum = buffer[:, 5:22, 3:45:2]  # (3, 17, 21), strides (2000, 50, 2)
    outside = buffer.clone()
    before = momentum.clone()
    x_out = poison(3, 21, 17, dtype=torch.bfloat16).mT  # X written through arbitrary strides
    res = momentum_energy_pass_(grad, momentum, BETA, x_out=x_out)
    assert res.x.data_ptr() == x_out.data_ptr()
    _check_against_reference(res, grad, before, momentum, beta=BETA, nesterov=False,
                             energy_source="momentum")
    mask = torch.ones_like(buffer, dtype=torch.bool)
    mask[:, 5:22, 3:45:2] = False
    assert torch.equal(buffer[mask], outside[mask]), "the pass wrote outside the momentum view"


def test_split_reductions_are_deterministic():
    # Several row splits and column blocks per matrix, partial blocks at both edges.
    grad, momentum = _inputs(2, 61, 45, torch.float32, seed=9)
    runs = []
    for _ in range(2):
        m = momentum.clone()
        res = momentum_energy_pass_(grad, m, BETA, config=PassConfig(block_r=8, block_c=32, splits=3),
                                    **_poisoned_outputs(2, 61, 45))
        runs.append(res)
    assert torch.equal(runs[0].energy, runs[1].energy)
    assert torch.equal(runs[0].x_sqnorm, runs[1].x_sqnorm)
    _check_against_reference(runs[0], grad, momentum, m, beta=BETA, nesterov=False,
                             energy_source="momentum")


def test_gpu_default_config_under_interpreter():
    # The config a GPU launch picks (the interpreter's own default uses bigger tiles).
    config = default_config(257, 129, props=H200)
    assert (config.block_r, config.block_c, config.num_warps) == (16, 256, 8)
    grad, momentum = _inputs(2, 257, 129, torch.bfloat16, seed=10)
    before = momentum.clone()
    res = momentum_energy_pass_(grad, momentum, BETA, config=config, **_poisoned_outputs(2, 257, 129))
    _check_against_reference(res, grad, before, momentum, beta=BETA, nesterov=False,
                             energy_source="momentum")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_column_energy_of_o_base(dtype):
    gen = torch.Generator().manual_seed(12)
    ortho = torch.randn(7, 29, 41, generator=gen).to(dtype)
    rowscale = torch.rand(7, 29, generator=gen) * 3 + 0.1
    energy = column_energy(ortho, row_scale=rowscale, out=poison(7, 41, dtype=torch.float32))
    want = ref.update_energy(ortho.double(), rowscale.double(), torch.float64)
    assert_close_to_reference(energy, want, what="update energy")
    plain = column_energy(ortho.mT.contiguous().mT, out=poison(7, 41, dtype=torch.float32))
    assert_close_to_reference(plain, ref.column_energy(ortho.double(), torch.float64))
    split = column_energy(ortho[:2], row_scale=rowscale[:2],
                          config=PassConfig(block_r=8, block_c=32, splits=2))
    want = want[:2]
    assert_close_to_reference(split, want, what="update energy, split rows")


def test_deliberate_errors_are_caught():
    # The checks above can fail: a wrong beta, or an output the kernel did not write.
    grad, momentum = _inputs(1, 9, 13, torch.float32, seed=13)
    before = momentum.clone()
    res = momentum_energy_pass_(grad, momentum, 0.9)
    with pytest.raises(AssertionError, match="momentum"):
        _check_against_reference(res, grad, before, momentum, beta=BETA, nesterov=False,
                                 energy_source="momentum")
    _, _, e64 = _float64_pass(before, grad, 0.9, False, "momentum")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close_to_reference(poison(1, 13, dtype=torch.float32), e64)
    wrong = res.energy.clone()
    wrong[0, 4] *= 1 + 2**-18  # a few ulp: beyond the float32 tolerance
    with pytest.raises(AssertionError, match="elements off"):
        assert_close_to_reference(wrong, e64)


def test_launcher_errors():
    grad, momentum = _inputs(2, 5, 6, torch.float32)
    with pytest.raises(TypeError, match=r"momentum has dtype torch\.bfloat16"):
        momentum_energy_pass_(grad, momentum.bfloat16(), BETA)
    with pytest.raises(TypeError, match=r"grad has dtype torch\.float64"):
        momentum_energy_pass_(grad.double(), momentum, BETA)
    with pytest.raises(ValueError, match="momentum holds 1 matrices"):
        momentum_energy_pass_(grad, momentum[:1], BETA)
    with pytest.raises(ValueError, match="grad must be a 3D stack"):
        momentum_energy_pass_(grad[0], momentum, BETA)
    with pytest.raises(ValueError, match=r"grad\[1\] is \(5, 7\)"):
        momentum_energy_pass_([grad[0], torch.zeros(5, 7)], momentum, BETA)
    with pytest.raises(ValueError, match=r"grad\[1\] has strides"):
        momentum_energy_pass_([grad[0], grad[1].t().contiguous().t()], momentum, BETA)
    with pytest.raises(ValueError, match="grad is an empty list"):
        momentum_energy_pass_([], momentum, BETA)
    with pytest.raises(ValueError, match="column_energy"):
        momentum_energy_pass_(grad, momentum, BETA, energy_source="update")
    with pytest.raises(ValueError, match="x_out has shape"):
        momentum_energy_pass_(grad, momentum, BETA, x_out=torch.empty(2, 6, 5, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="energy_out has dtype"):
        momentum_energy_pass_(grad, momentum, BETA, energy_out=torch.empty(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="momentum is an expanded view"):
        momentum_energy_pass_(grad, torch.zeros(1, 5, 6).expand(2, 5, 6), BETA)
    with pytest.raises(TypeError, match="ns_dtype"):
        momentum_energy_pass_(grad, momentum, BETA, ns_dtype=torch.float64)
    with pytest.raises(ValueError, match=r"config\.block_r must be a power of two"):
        momentum_energy_pass_(grad, momentum, BETA, config=PassConfig(block_r=3, block_c=8))
    with pytest.raises(ValueError, match="row_scale has shape"):
        column_energy(grad, row_scale=torch.ones(2, 4))
    # Every message names the argument; nothing was modified by a rejected call.
    assert torch.equal(momentum, _inputs(2, 5, 6, torch.float32)[1])
