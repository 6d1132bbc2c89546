"""NAMO and NAMO-D against an independent float64 oracle, their invariants, options, errors
and checkpoints (docs/rule.md, "NAMO and NAMO-D")."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import trasmuon
from trasmuon import NAMO, NAMOD
from trasmuon import reference as ref

from .namo_oracle import OracleNAMO

SHAPES = [(12, 20), (20, 12), (16, 16), (1, 9), (9, 1)]


def gradients(shape, steps, seed, *, zero_col=False, zero_steps=()):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(1, steps + 1):
        g = torch.randn(shape, dtype=torch.float64, generator=gen)
        if t % 4 == 2 and shape[1] > 2:
            g[:, 1] *= 25.0  # a column burst
        if zero_col:
            g[:, 0] = 0.0
        if t in zero_steps:
            g.zero_()
        out.append(g)
    return out


def run_both(cls, shape, *, steps=12, dtype=torch.float64, seed=0, lr=lambda t: 0.02,
             zero_col=False, zero_steps=(), **kw):
    torch.manual_seed(seed)
    w0 = torch.randn(shape, dtype=torch.float64)
    p = nn.Parameter(w0.to(dtype))
    opt = cls([p], lr=lr(1), ns_dtype=torch.float64, backend="eager", **kw)
    oracle_kw = {k: v for k, v in kw.items() if k in ("betas", "eps", "weight_decay", "nesterov",
                                                      "scale", "weight_decay_mode", "clamp")}
    if cls is NAMOD:
        oracle_kw.setdefault("clamp", 0.75)
    oracle = OracleNAMO(p.detach().double().numpy(), **oracle_kw)
    worst = 0.0
    for t, g in enumerate(gradients(shape, steps, seed + 1, zero_col=zero_col, zero_steps=zero_steps), 1):
        opt.param_groups[0]["lr"] = lr(t)
        p.grad = g.to(dtype)
        opt.step()
        oracle.step(g.to(dtype).double().numpy(), lr(t))
        got = p.detach().double().numpy()
        scale = max(np.linalg.norm(oracle.w), 1e-30)
        worst = max(worst, np.linalg.norm(got - oracle.w) / scale)
        assert np.isfinite(got).all()
    return worst, opt, p, oracle


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cls", [NAMO, NAMOD])
def test_follows_the_float64_oracle(cls, shape):
    worst, *_ = run_both(cls, shape, dtype=torch.float64, lr=lambda t: 0.02 * (1 + 0.5 * math.sin(t)))
    assert worst < 1e-11, worst
    worst32, *_ = run_both(cls, shape, dtype=torch.float32)
    assert worst32 < 1e-6, worst32  # fp32 params and state


@pytest.mark.parametrize("options", [
    dict(nesterov=False), dict(weight_decay_mode="lr"), dict(weight_decay=0.0),
    dict(betas=(0.9, 0.999), eps=1e-6, scale=1.0),
], ids=["no-nesterov", "wd-lr", "no-wd", "betas-eps-scale"])
@pytest.mark.parametrize("cls", [NAMO, NAMOD])
def test_options_follow_the_oracle(cls, options):
    worst, *_ = run_both(cls, (10, 14), **options)
    assert worst < 1e-11, worst


@pytest.mark.parametrize("clamp", [1.0, 0.0, 0.01, 0.5])
def test_namod_clamp_settings(clamp):
    worst, _, _, oracle = run_both(NAMOD, (10, 14), clamp=clamp, steps=6)
    assert worst < 1e-11, worst
    d = oracle.last["d"]
    if clamp == 1.0:  # every column takes the mean scale
        assert np.allclose(d, d.mean(), rtol=1e-12, atol=0)
    if clamp == 0.0:  # no clamp: the columns keep their own scales
        assert d.max() > 1.5 * d.min()


@pytest.mark.parametrize("cls", [NAMO, NAMOD])
def test_zero_columns_and_zero_gradients_give_no_nan_and_no_update(cls):
    worst, *_ = run_both(cls, (8, 12), zero_col=True, zero_steps=(1, 2, 7))
    assert worst < 1e-11
    torch.manual_seed(0)
    q = nn.Parameter(torch.randn(5, 7))
    before = q.detach().clone()
    opt = cls([q], lr=0.1, weight_decay=0.0)
    q.grad = torch.zeros(5, 7)
    opt.step()
    assert torch.equal(q, before)  # alpha = 0 (and d = 0): no update, no NaN
    assert torch.isfinite(opt.state[q]["momentum"]).all()


def test_first_step_size_is_one_plus_beta1_times_lr():
    lr, b1 = 0.01, 0.95
    _, opt, _, oracle = run_both(NAMO, (6, 9), steps=1, lr=lambda t: lr, diagnostics=True)
    # alpha = (1 + b1) lr * sqrt(v) / (sqrt(v) + eps): exact up to eps / sqrt(v) ~ 1e-8 here.
    diag = opt.diagnostics()["group0.param0"]
    assert diag["alpha"] == pytest.approx((1 + b1) * lr, rel=1e-7)
    assert oracle.last["alpha"] == pytest.approx(diag["alpha"], rel=1e-12)


@pytest.mark.parametrize("cls", [NAMO, NAMOD])
def test_step_up_never_exceeds_one(cls):
    # A huge lr saturates the step sizes at 1: the update is O itself, never more.
    _, opt, _, oracle = run_both(cls, (10, 14), steps=5, lr=lambda t: 50.0, diagnostics=True)
    assert np.max(oracle.last["step_up"]) == 1.0
    diag = opt.diagnostics()["group0.param0"]
    assert diag.get("step_up", diag.get("step_up_max")) <= 1.0


def test_namod_diagnostics():
    _, opt, _, oracle = run_both(NAMOD, (10, 14), steps=4, clamp=0.9, diagnostics=True)
    diag = opt.diagnostics()["group0.param0"]
    assert set(diag) == {"d_min", "d_mean", "d_max", "clamped_frac", "step_up_max"}
    assert diag["d_min"] == pytest.approx(oracle.last["d"].min(), rel=1e-9)
    assert 0.0 < diag["clamped_frac"] < 1.0  # clamp 0.9 moves some columns, not all


def test_defaults_and_the_adamw_of_other_params():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    opt = NAMOD(model.parameters())
    group = opt.param_groups[0]
    expected = dict(lr=1e-2, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.1, nesterov=True,
                    ns_coefficients=ref.MUON_NS_COEFFICIENTS, ns_steps=5, scale=0.2,
                    weight_decay_mode="adaptive", clamp=0.75, adamw_betas=(0.9, 0.95),
                    adamw_eps=1e-8)
    for key, value in expected.items():
        assert group[key] == value, key
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    bias = model[0].bias
    assert set(opt.state[bias]) == {"step", "exp_avg", "exp_avg_sq"}
    # The bias took AdamW with betas (0.9, 0.95), eps 1e-8 and the group's lr and decay.
    torch.manual_seed(2)
    b0, g = torch.randn(8), torch.randn(8)
    ours, theirs = nn.Parameter(b0.clone()), nn.Parameter(b0.clone())
    opt = NAMO([ours])
    torch_opt = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(3):
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    assert torch.equal(ours, theirs)


def test_bad_input_names_the_key_or_the_parameter():
    p = nn.Parameter(torch.randn(4, 6))
    for kwargs, key in ((dict(clamp=1.5), "clamp"), (dict(clamp=-0.1), "clamp"),
                        (dict(betas=(0.9, 1.0)), "betas"), (dict(betas=(-0.1, 0.9)), "betas"),
                        (dict(weight_decay_mode="decoupled"), "weight_decay_mode")):
        with pytest.raises(ValueError, match=key):
            NAMOD([p], **kwargs)
    with pytest.raises(ValueError, match=r"'w'.*needs a 2D parameter"):
        NAMO([{"params": [("w", nn.Parameter(torch.randn(4)))], "rule": "namo"}])


@pytest.mark.parametrize("cls", [NAMO, NAMOD])
def test_state_dict_round_trip_resumes_bit_for_bit(cls):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(7, 9), nn.Linear(9, 5))

    def run(model, opt, grads):
        for gs in grads:
            for p, g in zip(model.parameters(), gs, strict=True):
                p.grad = g.clone()
            opt.step()

    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=gen) for p in make().parameters()] for _ in range(8)]
    straight = make()
    run(straight, cls(straight.parameters(), lr=0.02), grads)
    first = make()
    opt = cls(first.parameters(), lr=0.02)
    run(first, opt, grads[:4])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    second = copy.deepcopy(first)
    opt2 = cls(second.parameters(), lr=0.02)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    run(second, opt2, grads[4:])
    for p, q in zip(straight.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)


def test_namo_groups_inside_other_optimizers_take_namo_defaults():
    a, b = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(6, 8))
    opt = trasmuon.TrasMuon([{"params": [a]}, {"params": [b], "rule": "namo_d"}], lr=3e-3)
    group = opt.param_groups[1]
    assert group["lr"] == 3e-3  # given to the constructor
    assert group["betas"] == (0.95, 0.99) and group["weight_decay"] == 0.1  # NAMO-D's own
    assert "clip" not in group and group["clamp"] == 0.75
