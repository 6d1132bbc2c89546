"""Memory-lean state: ``state_dtype=torch.bfloat16`` stores the matrix rules' momentum in bf16,
rounded stochastically (docs/usage.md, "state_dtype").

The rounding (``reference.stochastic_round_bf16`` with bits from ``reference.sr_bits``) is
checked on its own (exact on bf16 values, unbiased, the special values, the hash against
Python ints); the momentum pass kernel against its eager twin bit for bit (Triton's
interpreter); the optimizers: both backends keep the same bf16 momentum bit for bit, bf16 state
stays close to float32 state, checkpoints resume bit for bit and convert between dtypes,
invalid settings are refused naming the parameter, and the momentum takes 2 bytes per element.
"""

from __future__ import annotations

import copy
import io
import math
import os
import warnings

import pytest
import torch

import trasmuon
from trasmuon import reference as ref

CLASSES = (trasmuon.TrasMuon, trasmuon.NorMuon, trasmuon.Muon, trasmuon.NAMO, trasmuon.NAMOD)
MASK32 = 0xFFFFFFFF


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def bitwise() -> bool:
    from trasmuon_kernels.testing import bitwise_twins

    return bitwise_twins()[0]


needs_interpreter = pytest.mark.skipif(not interpreting(), reason="CPU tensors through Triton's interpreter")


def bits16(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


# --------------------------------------------------------------------------------------
# The rounding and its random bits
# --------------------------------------------------------------------------------------
def test_hash_is_murmur3_fmix32_on_all_32_bits():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, MASK32, 12345678]
    got = ref.fmix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [ref.fmix32_int(v) for v in values]
    assert all(0 <= v <= MASK32 for v in got)
    # The published constants: fmix32(1) of MurmurHash3.
    assert ref.fmix32_int(1) == 0x514E28B7


def test_exact_for_bf16_values():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 64, generator=gen) * 10.0 ** torch.randint(-30, 30, (64, 64), generator=gen))
    x = x.to(torch.bfloat16).float()
    for stream in (0, 1, 0xFFFFFFFF):
        out = ref.stochastic_round_bf16(x, ref.sr_bits(x.shape, stream))
        assert torch.equal(out.float(), x)


@pytest.mark.parametrize("value", [1.0 + 2.0**-10, -(3.0 + 2.0**-9 + 2.0**-12), 1e-3 / 3, -7.1e30,
                                   1e-39 / 3])
def test_unbiased_and_two_valued(value):
    """Over 2^16 elements and 4 streams the mean of the rounded values is the float32 value
    within 6 standard deviations; every result is one of the two bf16 neighbours."""
    x = torch.full((256, 256), value, dtype=torch.float32)
    lo = x.to(torch.bfloat16).float()[0, 0].item()
    exact = torch.tensor(value, dtype=torch.float32).item()
    ulp = abs(math.nextafter(lo, math.copysign(math.inf, exact - lo)) - lo) if exact != lo else 0.0
    # the bf16 neighbours of x: round toward zero and away from zero
    toward = torch.tensor(exact).view(torch.int32).bitwise_and(~0xFFFF).view(torch.float32).item()
    away_bits = torch.tensor(exact).view(torch.int32) + 0x10000
    away = away_bits.bitwise_and(~0xFFFF).view(torch.float32).item()
    means = []
    for stream in (0, 7, 0x9E3779B9, MASK32):
        out = ref.stochastic_round_bf16(x, ref.sr_bits(x.shape, stream)).double()
        assert set(out.unique().tolist()) <= {toward, away}
        means.append(out.mean().item())
    p = (exact - toward) / (away - toward)
    sigma = abs(away - toward) * math.sqrt(p * (1 - p) / x.numel())
    for mean in means:
        assert abs(mean - exact) <= 6 * sigma + 1e-300, (mean, exact, sigma)
    del ulp


def test_special_values():
    f32max = torch.finfo(torch.float32).max
    bf16max = torch.finfo(torch.bfloat16).max
    x = torch.tensor([math.inf, -math.inf, math.nan, f32max, -f32max, bf16max, -bf16max,
                      0.0, -0.0, 1e-45, -1e-45] * 64)
    for stream in range(8):
        out = ref.stochastic_round_bf16(x, ref.sr_bits((1, x.numel()), stream).view(-1)).float()
        assert out[0::11].eq(math.inf).all() and out[1::11].eq(-math.inf).all()
        assert out[2::11].isnan().all()
        # finite values never round to inf: they saturate at the largest finite bf16
        for k in (3, 5):
            assert out[k::11].eq(bf16max).all()
        for k in (4, 6):
            assert out[k::11].eq(-bf16max).all()
        assert torch.equal(bits16(out[7::11].bfloat16()), torch.zeros(64, dtype=torch.int16))
        assert out[8::11].eq(0).all() and torch.signbit(out[8::11]).all()
        assert set(out[9::11].tolist()) <= {0.0, torch.tensor(1e-45).bfloat16().float().item(),
                                            float(torch.tensor(0x0001, dtype=torch.int16).view(torch.bfloat16))}
    # NaN is bf16's canonical NaN
    nan = ref.stochastic_round_bf16(torch.tensor([math.nan]), torch.tensor([0]))
    assert bits16(nan).item() == 0x7FC0


def test_bits_of_a_block_are_those_of_the_whole_matrix():
    whole = ref.sr_bits((7, 10), 99)
    block = ref.sr_bits((3, 4), 99, row0=2, col0=5, d_in=10)
    assert torch.equal(block, whole[2:5, 5:9])


# --------------------------------------------------------------------------------------
# The momentum pass kernel against its eager twin
# --------------------------------------------------------------------------------------
def int32_keys(keys):
    return torch.tensor([k - (1 << 32) if k >= 1 << 31 else k for k in keys], dtype=torch.int32)


@needs_interpreter
@pytest.mark.parametrize("shape", [(33, 17), (5, 130), (1, 37), (19, 1)])
@pytest.mark.parametrize("nesterov,source", [(False, "momentum"), (True, "grad"), (True, None)])
def test_momentum_pass_matches_eager_bitwise(shape, nesterov, source):
    from trasmuon_kernels.momentum_energy import momentum_energy_pass_

    gen = torch.Generator().manual_seed(sum(shape))
    count = 3
    keys = [ref.sr_matrix_key(11, i) for i in range(count)]
    m_kernel = (torch.randn(count, *shape, generator=gen) * 0.1).bfloat16()
    m_eager = m_kernel.clone()
    for step in (1, 2, 77):
        g = torch.randn(count, *shape, generator=gen).bfloat16()
        steps = [step, step + 1, step]
        out = momentum_energy_pass_(g, m_kernel, 0.9, nesterov=nesterov, energy_source=source,
                                    sr_keys=int32_keys(keys),
                                    sr_steps=torch.tensor(steps, dtype=torch.float32))
        x, energy, sqnorm = ref.momentum_energy_pass_(
            m_eager, g, 0.9, nesterov=nesterov, energy_source=source,
            rounding=ref.StochasticRounding(keys, steps))
        if bitwise():
            assert torch.equal(bits16(m_kernel), bits16(m_eager))
            assert torch.equal(bits16(out.x), bits16(x))
        else:
            torch.testing.assert_close(m_kernel.float(), m_eager.float(), rtol=2**-7, atol=1e-6)
        if source is not None:
            torch.testing.assert_close(out.energy, energy, rtol=1e-5, atol=0)
        torch.testing.assert_close(out.x_sqnorm, sqnorm, rtol=1e-5, atol=0)


@needs_interpreter
def test_momentum_pass_block_of_a_matrix_rounds_as_the_whole():
    """A block (rows 3.., columns 4..) with its offset gets the whole matrix's bits: the
    rounding does not depend on how a matrix is sharded."""
    from trasmuon_kernels.momentum_energy import momentum_energy_pass_

    gen = torch.Generator().manual_seed(3)
    g = torch.randn(1, 9, 12, generator=gen)
    m = (torch.randn(1, 9, 12, generator=gen) * 0.3).bfloat16()
    whole, block = m.clone(), m[:, 3:, 4:].clone()
    keys, steps = int32_keys([ref.sr_matrix_key(0, 5)]), torch.tensor([4.0])
    momentum_energy_pass_(g, whole, 0.95, energy_source=None, sr_keys=keys, sr_steps=steps)
    momentum_energy_pass_(g[:, 3:, 4:].contiguous(), block, 0.95, energy_source=None,
                          sr_keys=keys, sr_steps=steps, sr_offset=(3, 4), sr_d_in=12)
    assert torch.equal(bits16(block), bits16(whole[:, 3:, 4:]))


@needs_interpreter
def test_momentum_pass_refuses_bf16_momentum_without_keys():
    from trasmuon_kernels.momentum_energy import momentum_energy_pass_

    m = torch.zeros(1, 4, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"momentum has dtype torch\.bfloat16.*sr_keys"):
        momentum_energy_pass_(torch.zeros(1, 4, 4), m, 0.9)
    with pytest.raises(TypeError, match="sr_keys"):
        momentum_energy_pass_(torch.zeros(1, 4, 4), m, 0.9, sr_keys=torch.zeros(1, dtype=torch.int64),
                              sr_steps=torch.ones(1))


# --------------------------------------------------------------------------------------
# The optimizers
# --------------------------------------------------------------------------------------
def params(seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(24, 40), (24, 40), (33, 9), (1, 37)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def run(cls, ws, steps: int, backend: str = "eager", seed: int = 0, opt=None, **kw):
    opt = opt or cls(ws, lr=0.02, backend=backend, **kw)
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        for w in ws:
            w.grad = torch.randn(w.shape, generator=gen).to(w.dtype)
        opt.step()
    return opt


@needs_interpreter
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_triton_and_eager_keep_the_same_bf16_momentum(cls):
    ws_e, ws_t = params(), params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt_e = run(cls, ws_e, 3, "eager", state_dtype=torch.bfloat16, seed=5)
        opt_t = run(cls, ws_t, 3, "triton", state_dtype=torch.bfloat16, seed=5)
    for we, wt in zip(ws_e, ws_t, strict=True):
        me, mt = opt_e.state[we]["momentum"], opt_t.state[wt]["momentum"]
        assert me.dtype == mt.dtype == torch.bfloat16
        if bitwise():
            assert torch.equal(bits16(me), bits16(mt))
        rel = float((we - wt).detach().norm() / we.detach().norm())
        assert rel < 1e-3, rel  # (Newton-Schulz differs by its summation order)


@needs_interpreter
def test_triton_bf16_momentum_of_in_out_and_stacked_params():
    """Orientation in_out (the key indexes the (out, in) matrix) and an expert stack (one key
    per expert) on both backends."""
    def build():
        gen = torch.Generator().manual_seed(2)
        a = torch.nn.Parameter(torch.randn(40, 24, generator=gen))
        e = torch.nn.Parameter(torch.randn(3, 8, 12, generator=gen))
        return a, e

    out = []
    for backend in ("eager", "triton"):
        a, e = build()
        groups = [{"params": [a], "orientation": "in_out"}, {"params": [e], "stacked": True}]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = run(trasmuon.TrasMuon, [a, e], 3, backend, opt=trasmuon.TrasMuon(
                groups, lr=0.02, backend=backend, state_dtype=torch.bfloat16, seed=1))
        out.append([opt.state[p]["momentum"] for p in (a, e)])
    for me, mt in zip(*out, strict=True):
        assert me.dtype == torch.bfloat16
        if bitwise():
            assert torch.equal(bits16(me), bits16(mt))


def test_eager_momentum_is_the_reference_rounding():
    """One eager step: the stored momentum is the stochastic rounding of the float32 lerp,
    keyed by the seed, the parameter's index, the step and the element."""
    w = torch.nn.Parameter(torch.zeros(6, 10))
    v = torch.nn.Parameter(torch.zeros(6, 10))
    opt = trasmuon.Muon([v, w], lr=0.01, state_dtype=torch.bfloat16, seed=123)
    g = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    v.grad, w.grad = g.clone(), g.clone()
    opt.step()
    wide = torch.zeros(6, 10).lerp_(g, 1 - 0.95)
    for index, p in enumerate((v, w)):
        want = ref.StochasticRounding(ref.sr_matrix_key(123, index), 1).round(wide)
        assert torch.equal(bits16(opt.state[p]["momentum"]), bits16(want))
    # distinct parameters, distinct bits
    assert not torch.equal(bits16(opt.state[v]["momentum"]), bits16(opt.state[w]["momentum"]))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_bf16_state_stays_close_to_float32_state(cls):
    """A small least-squares problem, 40 steps: the weights moved with bf16 momentum differ
    from those with float32 momentum by under 3% of the distance the float32 run moved, and
    the final losses by under 2%."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, generator=gen)
    target = torch.randn(64, 24, generator=gen)
    results = []
    for sdt in (None, torch.bfloat16):
        w = torch.nn.Parameter(torch.zeros(32, 24))
        opt = cls([w], lr=0.01, state_dtype=sdt, seed=0)
        for _ in range(40):
            loss = ((a @ w - target) ** 2).mean()
            w.grad, = torch.autograd.grad(loss, w)
            opt.step()
        results.append((w.detach().clone(), float(((a @ w - target) ** 2).mean())))
    (w32, l32), (w16, l16) = results
    assert float((w16 - w32).norm() / w32.norm()) < 0.03
    assert abs(l16 - l32) / l32 < 0.02, (l16, l32)


def test_default_is_float32_state_bit_for_bit():
    ws_a, ws_b = params(), params()
    opt_a = run(trasmuon.TrasMuon, ws_a, 3)
    opt_b = run(trasmuon.TrasMuon, ws_b, 3, state_dtype=torch.float32)
    for a, b in zip(ws_a, ws_b, strict=True):
        assert opt_a.state[a]["momentum"].dtype == torch.float32
        assert torch.equal(a, b) and torch.equal(opt_a.state[a]["momentum"], opt_b.state[b]["momentum"])
    assert opt_a.param_groups[0]["seed"] is None  # float32 state rounds nothing


def test_seed_changes_the_bits_and_defaults_to_torch_initial_seed():
    torch.manual_seed(1234)
    opt = trasmuon.TrasMuon(params(), state_dtype=torch.bfloat16)
    assert opt.param_groups[0]["seed"] == 1234
    ws1, ws2, ws3 = params(), params(), params()
    o1 = run(trasmuon.NorMuon, ws1, 2, state_dtype=torch.bfloat16, seed=1)
    o2 = run(trasmuon.NorMuon, ws2, 2, state_dtype=torch.bfloat16, seed=1)
    o3 = run(trasmuon.NorMuon, ws3, 2, state_dtype=torch.bfloat16, seed=2)
    m1, m2, m3 = (o.state[w[0]]["momentum"] for o, w in ((o1, ws1), (o2, ws2), (o3, ws3)))
    assert torch.equal(bits16(m1), bits16(m2)) and not torch.equal(bits16(m1), bits16(m3))


@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=needs_interpreter)])
def test_resume_is_bit_identical(backend):
    kw = dict(state_dtype=torch.bfloat16, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ws = params()
        opt = run(trasmuon.TrasMuon, ws, 3, **kw)
        saved_w = [w.detach().clone() for w in ws]
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        run(trasmuon.TrasMuon, ws, 3, seed=1, opt=opt)
        # a fresh optimizer (another initial seed: the checkpoint's seed wins) from the checkpoint
        torch.manual_seed(999)
        ws2 = [torch.nn.Parameter(w.clone()) for w in saved_w]
        opt2 = trasmuon.TrasMuon(ws2, lr=0.02, **kw)
        buffer.seek(0)
        opt2.load_state_dict(torch.load(buffer, weights_only=True))
        assert opt2.state[ws2[0]]["momentum"].dtype == torch.bfloat16
        run(trasmuon.TrasMuon, ws2, 3, seed=1, opt=opt2)
    for w, w2 in zip(ws, ws2, strict=True):
        assert torch.equal(w, w2)
        assert torch.equal(bits16(opt.state[w]["momentum"]), bits16(opt2.state[w2]["momentum"]))


def test_checkpoints_convert_between_float32_and_bf16_state():
    ws = params()
    opt32 = run(trasmuon.TrasMuon, ws, 2)
    sd32 = copy.deepcopy(opt32.state_dict())
    opt16 = trasmuon.TrasMuon(ws, lr=0.02, state_dtype=torch.bfloat16, seed=3)
    opt16.load_state_dict(sd32)
    # the optimizer keeps its own state_dtype; the momentum is rounded to nearest once
    assert opt16.param_groups[0]["state_dtype"] == torch.bfloat16
    assert opt16.param_groups[0]["seed"] == 3
    for i, w in enumerate(ws):
        m32 = sd32["state"][i]["momentum"]
        assert torch.equal(bits16(opt16.state[w]["momentum"]), bits16(m32.bfloat16()))
        assert opt16.state[w]["row_v"].dtype == torch.float32
    run(trasmuon.TrasMuon, ws, 1, opt=opt16)
    # ... and back: bf16 widens exactly
    sd16 = copy.deepcopy(opt16.state_dict())
    back = trasmuon.TrasMuon(ws, lr=0.02)
    back.load_state_dict(sd16)
    assert back.param_groups[0]["state_dtype"] is None
    for i, w in enumerate(ws):
        assert back.state[w]["momentum"].dtype == torch.float32
        assert torch.equal(back.state[w]["momentum"], sd16["state"][i]["momentum"].float())
    # a group switched to bf16 between steps converts its momentum (never resets it)
    before = {w: back.state[w]["momentum"].clone() for w in ws}
    back.param_groups[0]["state_dtype"] = torch.bfloat16
    run(trasmuon.TrasMuon, ws, 1, opt=back)
    assert back.param_groups[0]["seed"] is not None
    for w in ws:
        m = back.state[w]["momentum"]
        assert m.dtype == torch.bfloat16 and float(m.float().norm()) > 0.5 * float(before[w].norm())


def test_unsupported_state_dtypes_are_refused_naming_the_parameter():
    w = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        trasmuon.TrasMuon([w], state_dtype=torch.float16)
    d = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"parameter 'w64'.*float64.*state_dtype=torch.bfloat16"):
        trasmuon.Muon([{"params": [("w64", d)]}], state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="seed must be"):
        trasmuon.NAMO([w], state_dtype=torch.bfloat16, seed=-1)
    # set on a group later: refused at the step, before anything changes
    opt = trasmuon.NorMuon([d], lr=0.1)
    d.grad = torch.ones_like(d)
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    with pytest.raises(ValueError, match="float64"):
        opt.step()
    assert not opt.state and torch.equal(d, torch.zeros_like(d))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_momentum_takes_two_bytes_per_element(cls):
    ws = params()
    opt = run(cls, ws, 1, state_dtype=torch.bfloat16)
    matrix = sum(w.numel() for w in ws)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
                if k != "step")
    momentum = sum(s["momentum"].numel() * 2 for s in opt.state.values())
    assert all(s["momentum"].dtype == torch.bfloat16 for s in opt.state.values())
    assert momentum == 2 * matrix
    others = [t for s in opt.state.values() for k, t in s.items() if k not in ("step", "momentum")]
    assert all(t.dtype == torch.float32 for t in others)  # per-row/column vectors stay float32
    assert state == 2 * matrix + 4 * sum(t.numel() for t in others)


def test_adamw_params_keep_float32_moments():
    w, b = torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(8))
    opt = trasmuon.TrasMuon([w, b], state_dtype=torch.bfloat16)
    w.grad, b.grad = torch.ones(8, 8), torch.ones(8)
    opt.step()
    assert opt.state[w]["momentum"].dtype == torch.bfloat16
    assert opt.state[b]["exp_avg"].dtype == opt.state[b]["exp_avg_sq"].dtype == torch.float32


# --------------------------------------------------------------------------------------
# FSDP2: the element index is the global one, so a sharded run rounds as one process
# --------------------------------------------------------------------------------------
def _fsdp_bf16_worker(rank: int, world: int, tmp: str) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    from tests.test_distributed import Net, _fully_shard, write_report

    torch.manual_seed(0)
    ref_model = Net()
    model = _fully_shard(copy.deepcopy(ref_model), world)
    kw = dict(lr=0.02, state_dtype=torch.bfloat16, seed=7)
    opt, ref_opt = trasmuon.TrasMuon(model.parameters(), **kw), trasmuon.TrasMuon(ref_model.parameters(), **kw)
    compared = 0
    for step in range(1, 4):
        gen = torch.Generator().manual_seed(step)
        for p, rp in zip(model.parameters(), ref_model.parameters(), strict=True):
            g = torch.randn(rp.shape, generator=gen)
            rp.grad = g.clone()
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g.clone()
        opt.step()
        ref_opt.step()
        for p, rp in zip(model.parameters(), ref_model.parameters(), strict=True):
            if rp.ndim != 2:
                continue
            m, want = opt.state[p]["momentum"], ref_opt.state[rp]["momentum"].float()
            if isinstance(m, DTensor):
                want = distribute_tensor(want, m.device_mesh, m.placements).to_local()
                m = m.to_local()
            assert m.dtype == torch.bfloat16
            assert torch.equal(m.float(), want), (step, tuple(rp.shape))
            compared += 1
    write_report(tmp, {"compared": compared})


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_bf16_momentum_equals_one_process_bit_for_bit(world, tmp_path):
    from tests.test_distributed import read_report, run_workers

    run_workers(_fsdp_bf16_worker, world, tmp_path)
    assert read_report(tmp_path)["compared"] > 0
