"""Row statistics and the weight update pass (trasmuon_kernels.update) against their eager twins
(``reference.row_sumsq``, ``reference.row_stats_``, ``reference.weight_update_pass_``) and
float64 evaluations of the same inputs; and a whole bucketed TrasMuon step built from the
memory-pass kernels against ``reference.trasmuon_matrix_step_``.

Exactness: the update pass and the v update are bit-identical to the eager twin for every param
dtype. rowscale = 1/(sqrt(v)+eps) is within 2 ulp (1 ulp of sqrt through the reciprocal):
torch's CPU float32 sqrt is MKL VML's vmsSqrt, which is not correctly rounded on this CPU, while
the kernel uses the IEEE square root (what CUDA torch uses); with torch's sqrt swapped for an
IEEE one the kernel is bit-identical.
Sums (row sums of squares, ||O_base||_F, hence eta_hat) are judged with the table's tolerance.
The bit-identities hold where ``trasmuon_kernels.testing.bitwise_twins()`` does (Triton's
interpreter with a single-rounding ``tl.fma``, torch 2.11 / 2.13): ``assert_matches_twin`` then
demands them, and otherwise judges against float64 alone; tests that compare with a twin only
are marked ``needs_bitwise`` and skipped, with the reason, where it does not hold.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trasmuon import reference as ref
from trasmuon_kernels import update as update_mod
from trasmuon_kernels._common import PassConfig, TensorBucket, default_config
from trasmuon_kernels._launch import H200
from trasmuon_kernels.momentum_energy import column_energy, momentum_energy_pass_
from trasmuon_kernels.testing import (
    assert_close_to_reference,
    assert_matches_twin,
    bitwise_twins,
    poison,
)
from trasmuon_kernels.update import EtaFromSumsq, EtaRows, StepRows, StepSize, row_sumsq

from .with_rule import gate_stage_, row_stats_, update_pass_

# Bit-equality with the eager twins holds only where trasmuon_kernels.testing.bitwise_twins()
# says so (Triton's interpreter with a tl.fma that rounds once, torch 2.11 / 2.13); elsewhere
# these tests are skipped with that reason (their compiled parity is bench/gpu_memory_passes.py's).
BITWISE, WHY_NOT_BITWISE = bitwise_twins()
needs_bitwise = pytest.mark.skipif(
    not BITWISE, reason=f"asserts bit-equality with eager twins, not guaranteed here: {WHY_NOT_BITWISE}")

# These check bit-exactness against the CPU reference under Triton's interpreter, on CPU
# tensors; on a GPU machine the compiled kernels' parity is bench/gpu_memory_passes.py's.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter tests on CPU tensors; on a GPU run bench/gpu_memory_passes.py"
)

SHAPES = [(1, 37), (33, 1), (3, 1000), (257, 129)]
COUNTS = [1, 7]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = ["gate", "no-gate", "muon"]


def _max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max().item())


def _ieee_sqrt(self: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (numpy's), in place of MKL's."""
    return torch.from_numpy(np.sqrt(self.detach().cpu().numpy()))


# --------------------------------------------------------------------------------------
# Row sums of squares and the row statistics
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_row_sumsq(shape, count):
    d_out, d_in = shape
    gen = torch.Generator().manual_seed(d_out * 7 + count)
    dtype = PARAM_DTYPES[(d_in + count) % 3]
    ortho = torch.randn(count, d_out, d_in, generator=gen).to(dtype)
    got = row_sumsq(ortho, out=poison(count, d_out, dtype=torch.float32))
    assert_close_to_reference(got, ref.row_sumsq(ortho.double(), torch.float64), what="row sumsq")
    # A pre-transposed Newton-Schulz output (stored (B, d_in, d_out)) read through a .mT view.
    stored_t = ortho.mT.contiguous()
    again = row_sumsq(stored_t.mT, out=poison(count, d_out, dtype=torch.float32))
    assert_close_to_reference(again, ref.row_sumsq(ortho.double(), torch.float64), what="row sumsq (.mT)")


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("count,d_out,d_in", [(1, 257, 129), (7, 33, 20), (3, 1, 1000), (2, 5000, 3)])
def test_row_stats(count, d_out, d_in, lr_kind, monkeypatch):
    gen = torch.Generator().manual_seed(d_out + count)
    ortho = torch.randn(count, d_out, d_in, generator=gen).to(torch.bfloat16)
    rss = ref.row_sumsq(ortho)
    v0 = torch.rand(count, d_out, generator=gen) * 0.1
    v0[:, :1] = 0.0  # a first step: v starts at zero
    lr = 0.02 if lr_kind == "float" else torch.tensor(0.02)
    kw = dict(beta2=0.95, eps=1e-8, scale=0.2, lr=lr)

    v_k = v0.clone()
    rowscale, eta = row_stats_(
        v_k, rss, d_in=d_in, **kw, block=None if d_out < 5000 else 1024,
        rowscale_out=poison(count, d_out, dtype=torch.float32),
        eta_hat_out=poison(count, dtype=torch.float32),
    )
    v_r = v0.clone()
    rowscale_r, _ = ref.row_stats_(v_r, rss, d_in, **kw)
    v64 = v0.double()
    rs64, eta64 = ref.row_stats_(v64, rss.double(), d_in, **dict(kw, lr=0.02))
    assert_matches_twin(v_k, v_r, v64, what="v")
    # 1 ulp of MKL's sqrt becomes at most 2 ulp of the reciprocal (binades can differ).
    if BITWISE:  # a statement about the twins' arithmetic; rowscale is judged against float64 below
        assert _max_ulp(rowscale, rowscale_r) <= 2, "rowscale beyond the MKL sqrt bound"
    # float64 evaluation from the same inputs
    assert_close_to_reference(rowscale, rs64, what="rowscale")
    assert_close_to_reference(eta, eta64, what="eta_hat")
    # With torch's sqrt correctly rounded, rowscale is bit-identical too.
    monkeypatch.setattr(torch.Tensor, "sqrt", _ieee_sqrt)
    v_r = v0.clone()
    rowscale_r, eta_r = ref.row_stats_(v_r, rss, d_in, **kw)
    assert_matches_twin(rowscale, rowscale_r, rs64, what="rowscale (IEEE sqrt)")
    if d_out == 1:  # a one-term sum has no order: eta_hat's own rounding is then bit-exact too
        assert_matches_twin(eta, eta_r, eta64, what="eta_hat")


# --------------------------------------------------------------------------------------
# The update pass
# --------------------------------------------------------------------------------------
def _update_inputs(count, d_out, d_in, param_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(count, d_out, d_in, generator=gen).to(param_dtype)
    ortho = torch.randn(count, d_out, d_in, generator=gen).to(torch.bfloat16)
    rowscale = torch.rand(count, d_out, generator=gen) * 2 + 0.5
    eta = torch.rand(count, generator=gen) * 0.01 + 1e-3
    gate = torch.rand(count, d_in, generator=gen) * 0.3 + 0.7
    gate[:, ::3] = 1.0
    return param, ortho, rowscale, eta, gate


def _row_factor_kwargs(mode, rowscale, eta, step_tensor=False):
    if mode == "muon":
        step = 0.037
        return dict(step_size=torch.tensor(step) if step_tensor else step)
    return dict(eta_hat=eta, rowscale=rowscale)


def _float64_update(param, ortho, lr, weight_decay, mode, rowscale, eta, gate):
    """W <- (1 - lr*wd)*W - r*c*O in float64 from the same inputs."""
    lr = float(lr)
    w64 = param.double().clone()
    kw = _row_factor_kwargs(mode, rowscale.double(), eta.double())
    ref.weight_update_pass_(w64, ortho.double(), lr, weight_decay, **kw,
                            col_gate=gate.double() if mode == "gate" else None)
    return w64


def _check_update(param, ortho, *, lr, weight_decay, mode, rowscale, eta, gate, kernel_param,
                  step_tensor=False):
    """Runs the kernel on ``kernel_param`` (a bucket of ``param``'s values) and checks it."""
    col_gate = gate if mode == "gate" else None
    kw = _row_factor_kwargs(mode, rowscale, eta, step_tensor)
    update_pass_(kernel_param, ortho, lr=lr, weight_decay=weight_decay, col_gate=col_gate, **kw)
    got = torch.stack(list(kernel_param)) if isinstance(kernel_param, list) else kernel_param
    twin = param.clone()
    ref.weight_update_pass_(twin, ortho, lr, weight_decay, col_gate=col_gate, **kw)
    want64 = _float64_update(param, ortho, lr, weight_decay, mode, rowscale, eta, gate)
    assert_matches_twin(got, twin, want64, what="updated param")


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_update_shapes(shape, count):
    d_out, d_in = shape
    i = d_out + d_in + count
    param_dtype, mode = PARAM_DTYPES[i % 3], MODES[(i // 3) % 3]
    param, ortho, rowscale, eta, gate = _update_inputs(count, d_out, d_in, param_dtype, seed=i)
    _check_update(param, ortho, lr=0.01, weight_decay=0.1, mode=mode, rowscale=rowscale,
                  eta=eta, gate=gate, kernel_param=param.clone())


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
def test_update_dtypes_and_modes(param_dtype, mode, lr_kind):
    param, ortho, rowscale, eta, gate = _update_inputs(3, 19, 27, param_dtype, seed=1)
    lr = 0.01 if lr_kind == "float" else torch.tensor(0.01)
    for wd in (0.0, 0.1):
        _check_update(param, ortho, lr=lr, weight_decay=wd, mode=mode, rowscale=rowscale,
                      eta=eta, gate=gate, kernel_param=param.clone(),
                      step_tensor=lr_kind == "tensor")


@needs_bitwise
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_update_pointer_table(param_dtype):
    param, ortho, rowscale, eta, gate = _update_inputs(5, 33, 20, param_dtype, seed=2)
    params = [p.clone() for p in param]  # separate allocations
    _check_update(param, ortho, lr=0.01, weight_decay=0.1, mode="gate", rowscale=rowscale,
                  eta=eta, gate=gate, kernel_param=params)
    bucket = TensorBucket.of(params, "param")  # reused table: updates the same tensors again
    before = torch.stack(params)
    update_pass_(bucket, ortho, lr=0.01, eta_hat=eta, rowscale=rowscale)
    twin = before.clone()
    ref.weight_update_pass_(twin, ortho, 0.01, 0.0, eta_hat=eta, rowscale=rowscale)
    assert torch.equal(torch.stack(params), twin)


@needs_bitwise
def test_update_strided_views_and_tiles():
    gen = torch.Generator().manual_seed(3)
    buffer = torch.randn(3, 30, 60, generator=gen).to(torch.bfloat16)
    param = buffer[:, 2:25, 1:59:3]  # (3, 23, 20) window, column stride 3
    outside = buffer.clone()
    ortho = torch.randn(3, 20, 23, generator=gen).to(torch.bfloat16).mT  # pre-transposed O
    _, _, rowscale, eta, gate = _update_inputs(3, 23, 20, torch.float32, seed=4)
    gate_t = gate.t().contiguous().t()  # strided gate
    before = param.clone()
    for config in (PassConfig(block_r=8, block_c=8), default_config(23, 20, props=H200)):
        p = param
        p.copy_(before)
        update_pass_(p, ortho, lr=0.01, weight_decay=0.1, eta_hat=eta, rowscale=rowscale,
                     col_gate=gate_t, config=config)
        twin = before.clone()
        ref.weight_update_pass_(twin, ortho, 0.01, 0.1, eta_hat=eta, rowscale=rowscale, col_gate=gate_t)
        assert torch.equal(p, twin), f"config {config}"
    mask = torch.ones_like(buffer, dtype=torch.bool)
    mask[:, 2:25, 1:59:3] = False
    assert torch.equal(buffer[mask], outside[mask]), "the pass wrote outside the param view"


def test_deliberate_errors_are_caught():
    param, ortho, rowscale, eta, gate = _update_inputs(2, 9, 10, torch.float32, seed=5)
    wrong_gate = gate.clone()
    wrong_gate[0, 1] = 0.5
    kernel_param = param.clone()
    update_pass_(kernel_param, ortho, lr=0.01, weight_decay=0.1, eta_hat=eta, rowscale=rowscale,
                 col_gate=wrong_gate)
    want64 = _float64_update(param, ortho, 0.01, 0.1, "gate", rowscale, eta, gate)
    with pytest.raises(AssertionError, match="elements off"):
        assert_close_to_reference(kernel_param, want64)
    # A skipped weight decay is also seen, in bf16 with bf16's tolerance.
    param16 = param.bfloat16()
    kernel16 = param16.clone()
    update_pass_(kernel16, ortho, lr=0.01, weight_decay=0.0, eta_hat=eta, rowscale=rowscale)
    want16 = _float64_update(param16, ortho, 0.01, 5.0, "no-gate", rowscale, eta, gate)
    with pytest.raises(AssertionError, match="elements off"):
        assert_close_to_reference(kernel16, want16)


def test_launcher_errors():
    param, ortho, rowscale, eta, gate = _update_inputs(2, 9, 10, torch.float32, seed=6)
    kernel_pass = update_mod.update_pass_  # the typed interface itself
    with pytest.raises(TypeError, match="row"):
        kernel_pass(param, ortho, lr=0.01)  # no row factor
    with pytest.raises(TypeError, match="row must be EtaRows, EtaFromSumsq, StepSize or StepRows"):
        kernel_pass(param, ortho, lr=0.01, row=(eta, rowscale))
    with pytest.raises(TypeError, match="rowscale must be a tensor"):
        kernel_pass(param, ortho, lr=0.01, row=EtaRows(eta, None))
    with pytest.raises(ValueError, match="o_base_sumsq has shape"):
        kernel_pass(param, ortho, lr=0.01, row=EtaFromSumsq(eta[:1], rowscale, 1.0, 1e-12))
    with pytest.raises(ValueError, match="rowscale has shape"):
        kernel_pass(param, ortho, lr=0.01, row=StepRows(0.1, rowscale[:, :3]))
    with pytest.raises(TypeError, match="decay must be None, DecayPerMatrix or DecayPerColumn"):
        kernel_pass(param, ortho, lr=0.01, row=StepSize(0.1), decay=torch.ones(2))
    with pytest.raises(ValueError, match="ortho has shape"):
        update_pass_(param, ortho[:, :8], lr=0.01, eta_hat=eta, rowscale=rowscale)
    with pytest.raises(TypeError, match=r"param has dtype torch\.float64"):
        update_pass_(param.double(), ortho, lr=0.01, eta_hat=eta, rowscale=rowscale)
    with pytest.raises(ValueError, match="col_gate has shape"):
        update_pass_(param, ortho, lr=0.01, eta_hat=eta, rowscale=rowscale, col_gate=gate[:, :9])
    with pytest.raises(TypeError, match=r"rowscale has dtype torch\.bfloat16"):
        update_pass_(param, ortho, lr=0.01, eta_hat=eta, rowscale=rowscale.bfloat16())
    with pytest.raises(ValueError, match="lr must be a float or a one-element tensor"):
        update_pass_(param, ortho, lr=torch.ones(2), eta_hat=eta, rowscale=rowscale)
    with pytest.raises(ValueError, match="param is an expanded view"):
        update_pass_(param[:1].expand(2, 9, 10), ortho, lr=0.01, eta_hat=eta, rowscale=rowscale)
    with pytest.raises(ValueError, match="ortho must be a 3D stack"):
        row_sumsq(ortho[0])
    with pytest.raises(ValueError, match="rowsumsq has shape"):
        row_stats_(torch.zeros(2, 9), torch.zeros(2, 8), d_in=10, beta2=0.9, eps=1e-8, scale=0.2, lr=0.1)
    with pytest.raises(ValueError, match="d_in must be an int >= 1"):
        row_stats_(torch.zeros(2, 9), torch.zeros(2, 9), d_in=0, beta2=0.9, eps=1e-8, scale=0.2, lr=0.1)
    with pytest.raises(ValueError, match="eta_hat_out has shape"):
        row_stats_(torch.zeros(2, 9), torch.zeros(2, 9), d_in=3, beta2=0.9, eps=1e-8, scale=0.2,
                   lr=0.1, eta_hat_out=torch.empty(3))


# --------------------------------------------------------------------------------------
# A whole bucketed step: kernels chained, and the eager twins chained
# --------------------------------------------------------------------------------------
GATE_KWARGS = dict(
    warmup_steps=0, clip_period=2, clip_alpha=1.0, clip_min=0.7, clip_trigger=3.0,
    clip_beta=0.9, energy_beta=0.99, energy_quantile=0.5, energy_eps=1e-12,
    schedule_free=True, sf_mix=0.3,
)
STEP_KWARGS = dict(betas=(0.95, 0.95), eps=1e-8, weight_decay=0.1, scale=0.2)


def _fresh_state(count, d_out, d_in):
    state = {
        "momentum": torch.zeros(count, d_out, d_in),
        "row_v": torch.zeros(count, d_out),
    }
    ref.init_gate_state(state, (count,), d_in, True, torch.device("cpu"))
    return state


@needs_bitwise
@pytest.mark.parametrize("energy_source", ["momentum", "update"])
def test_bucketed_step_matches_eager_step(energy_source):
    count, d_out, d_in = 3, 24, 16  # tall: Newton-Schulz works on the transpose
    schedule = ref.ns_schedule(ref.TRASMUON_NS_COEFFICIENTS, 5)
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(count, d_out, d_in, generator=gen).to(torch.bfloat16)
    w_kernel, w_twin, w_ref = w0.clone(), w0.clone(), w0.clone()
    s_kernel, s_twin, s_ref = (_fresh_state(count, d_out, d_in) for _ in range(3))
    b1, b2 = STEP_KWARGS["betas"]
    eps, wd, scale = STEP_KWARGS["eps"], STEP_KWARGS["weight_decay"], STEP_KWARGS["scale"]
    for t in range(1, 4):
        lr = 0.02 / t
        grad = torch.randn(count, d_out, d_in, generator=gen).to(torch.bfloat16)
        grad[:, :, 0] *= 50  # a bursty column

        # The eager oracle: one call per bucket.
        ref.trasmuon_matrix_step_(
            w_ref, grad, s_ref, t, lr, **STEP_KWARGS, nesterov=False, ns_schedule_=schedule,
            ns_dtype=torch.bfloat16, gate_on=True, gate_kwargs=GATE_KWARGS,
            energy_source=energy_source,
        )

        # The eager twins of the kernel stages, chained: bit-identical to the oracle.
        src = energy_source if energy_source != "update" else None
        x, energy, _ = ref.momentum_energy_pass_(s_twin["momentum"], grad, b1, nesterov=False,
                                                 energy_source=src)
        ortho = ref.newton_schulz(x, schedule, eps, torch.bfloat16)
        rowscale, eta = ref.row_stats_(s_twin["row_v"], ref.row_sumsq(ortho), d_in,
                                       beta2=b2, eps=eps, scale=scale, lr=lr)
        if energy_source == "update":
            energy = ref.update_energy(ortho, rowscale)
        gate = ref.gate_stage_(s_twin, energy, t, lr, **GATE_KWARGS)
        ref.weight_update_pass_(w_twin, ortho, lr, wd, eta_hat=eta, rowscale=rowscale, col_gate=gate)
        assert torch.equal(w_twin, w_ref), f"step {t}: eager twins drift from the eager step"
        for key in s_ref:
            assert torch.equal(s_twin[key], s_ref[key]), f"step {t}: twin state {key!r}"

        # The kernels, chained (reference Newton-Schulz in between).
        res = momentum_energy_pass_(grad, s_kernel["momentum"], b1, energy_source=src)
        ortho_k = ref.newton_schulz(res.x, schedule, eps, torch.bfloat16)
        rowscale_k, eta_k = row_stats_(s_kernel["row_v"], row_sumsq(ortho_k), d_in=d_in,
                                       beta2=b2, eps=eps, scale=scale, lr=lr)
        energy_k = res.energy if src else column_energy(ortho_k, row_scale=rowscale_k)
        gate_k = gate_stage_(s_kernel, energy_k, t, lr, **GATE_KWARGS)
        update_pass_(w_kernel, ortho_k, lr=lr, weight_decay=wd, eta_hat=eta_k,
                     rowscale=rowscale_k, col_gate=gate_k)
        assert torch.equal(s_kernel["momentum"], s_ref["momentum"]), f"step {t}: momentum"
        assert_close_to_reference(gate_k, gate.double(), what=f"step {t}: gate")
        assert_close_to_reference(s_kernel["row_v"], s_ref["row_v"].double(), what=f"step {t}: v")
        assert_close_to_reference(w_kernel, w_ref.double(), what=f"step {t}: param")
    assert (w_kernel != w0).any()


def test_row_stats_without_eta_hat():
    # The step's row statistics (with_eta_hat=False): the same v, rowscale and ||O_base||_F^2
    # as with eta_hat, and no eta_hat formed or written anywhere.
    count, d_out, d_in = 2, 23, 17
    gen = torch.Generator().manual_seed(5)
    rss = row_sumsq(torch.randn(count, d_out, d_in, generator=gen).to(torch.bfloat16))
    v0 = torch.rand(count, d_out, generator=gen) * 1e-3
    kw = dict(d_in=d_in, beta2=0.95, eps=1e-8, scale=0.2, lr=0.02)
    outs = []
    for with_eta in (True, False):
        v, sums = v0.clone(), poison(count, 2, dtype=torch.float32)
        rowscale, eta = row_stats_(v, rss, **kw, sumsq_out=sums[:, 0], with_eta_hat=with_eta,
                                   rowscale_out=poison(count, d_out, dtype=torch.float32))
        assert sums[:, 1].isnan().all() and (eta is None) == (not with_eta)
        outs.append((v, rowscale, sums[:, 0].clone()))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="with_eta_hat=False takes no eta_hat_out"):
        row_stats_(v0.clone(), rss, **kw, with_eta_hat=False, eta_hat_out=torch.empty(count))


@needs_bitwise
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_eta_formed_in_the_update_pass(tensor_lr):
    # row_stats_ also writes ||O_base||_F^2 (sumsq_out); the update pass that forms eta_hat
    # from it (o_base_sumsq=...) writes the same bits as the one given row_stats_' eta_hat.
    count, d_out, d_in = 3, 37, 20
    gen = torch.Generator().manual_seed(11)
    ortho = torch.randn(count, d_out, d_in, generator=gen).to(torch.bfloat16)
    rss = row_sumsq(ortho)
    v = torch.rand(count, d_out, generator=gen) * 1e-3
    lr = torch.tensor(0.02) if tensor_lr else 0.02
    sums = poison(count, 2, dtype=torch.float32)
    sumsq = sums[:, 0]  # a strided view, as a caller's reduction buffer
    rowscale, eta = row_stats_(v, rss, d_in=d_in, beta2=0.95, eps=1e-8, scale=0.2, lr=lr,
                               sumsq_out=sumsq)
    assert sums[:, 1].isnan().all()
    assert_close_to_reference(sumsq, ref.o_base_sumsq(rss.double(), rowscale.double()), what="sumsq")
    gate = torch.rand(count, d_in, generator=gen) * 0.3 + 0.7
    w0 = torch.randn(count, d_out, d_in, generator=gen).to(torch.bfloat16)
    given, formed = w0.clone(), w0.clone()
    update_pass_(given, ortho, lr=lr, weight_decay=0.1, eta_hat=eta, rowscale=rowscale, col_gate=gate)
    update_pass_(formed, ortho, lr=lr, weight_decay=0.1, o_base_sumsq=sumsq,
                 eta_scale=0.2 * (d_out * d_in) ** 0.5, eta_eps=ref.ETA_HAT_EPS, rowscale=rowscale,
                 col_gate=gate)
    assert torch.equal(formed, given)
    twin = w0.clone()
    ref.weight_update_pass_(twin, ortho, lr, 0.1, eta_hat=eta, rowscale=rowscale, col_gate=gate)
    assert torch.equal(formed, twin)


@needs_bitwise
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_muon_step_scale(tensor_lr):
    # step_size=lr with step_scale=factor is Muon's lr * factor, rounded as torch rounds it.
    count, d_out, d_in = 2, 23, 20
    gen = torch.Generator().manual_seed(12)
    ortho = torch.randn(count, d_out, d_in, generator=gen).to(torch.bfloat16)
    lr = torch.tensor(0.02) if tensor_lr else 0.02
    factor = ref.muon_lr(1.0, None, d_out, d_in)
    w0 = torch.randn(count, d_out, d_in, generator=gen)
    got, twin = w0.clone(), w0.clone()
    update_pass_(got, ortho, lr=lr, weight_decay=0.1, step_size=lr, step_scale=factor)
    ref.weight_update_pass_(twin, ortho, lr, 0.1, step_size=ref.muon_lr(lr, None, d_out, d_in))
    assert torch.equal(got, twin)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_step_times_rowscale(tensor_lr):
    # StepRows: r_i = step * scale * rowscale_i (one step size times a per-row factor),
    # against float64 and the eager twin (step_size with rowscale).
    count, d_out, d_in = 2, 19, 33
    gen = torch.Generator().manual_seed(13)
    ortho = torch.randn(count, d_out, d_in, generator=gen).to(torch.bfloat16)
    rowscale = torch.rand(count, d_out, generator=gen) + 0.5
    lr = torch.tensor(0.02) if tensor_lr else 0.02
    w0 = torch.randn(count, d_out, d_in, generator=gen)
    got, twin = w0.clone(), w0.clone()
    update_mod.update_pass_(got, ortho, lr=lr, weight_decay=0.1,
                            row=StepRows(poison(count, dtype=torch.float32).fill_(0.03), rowscale))
    ref.weight_update_pass_(twin, ortho, lr, 0.1, step_size=0.03, rowscale=rowscale)
    w64 = w0.double() * (1 - 0.02 * 0.1) - 0.03 * rowscale.double()[:, :, None] * ortho.double()
    assert_matches_twin(got, twin, w64, what="updated param")
