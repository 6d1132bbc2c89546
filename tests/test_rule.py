"""The TrasMuon rule step by step: the float64 oracle, invariants, equivalences, gate timing."""

import math

import numpy as np
import pytest
import torch

from trasmuon import NAMO, NAMOD, Muon, NorMuon, TrasMuon
from trasmuon import reference as ref

from .spec_oracle import SpecTrasMuon


def bursty_grads(steps, d_out, d_in, *, seed=0, burst_every=3, burst_cols=(1, 4), factor=30.0,
                 dtype=torch.float64):
    """Gaussian gradients with a few columns scaled up every ``burst_every`` steps."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(1, steps + 1):
        g = torch.randn(d_out, d_in, generator=gen, dtype=dtype)
        if t % burst_every == 0:
            g[:, list(burst_cols)] *= factor
        out.append(g)
    return out


def run(opt_cls, w0, grads, lrs=None, **kw):
    """Run an optimizer on one matrix with given gradients; return weights after each step."""
    p = torch.nn.Parameter(w0.clone())
    opt = opt_cls([p], **kw)
    sched = None
    if lrs is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lrs[min(i, len(lrs) - 1)] / lrs[0])
    history = []
    for g in grads:
        p.grad = g.to(p.dtype).clone()
        opt.step()
        if sched is not None:
            sched.step()
        history.append(p.detach().clone())
    return p, opt, history


ORACLE_CASES = [
    dict(),
    dict(energy_source="grad", nesterov=True, weight_decay=0.1),
    dict(energy_source="update", clip_trigger=None, clip_period=1),
    dict(warmup_steps=3, schedule_free=False, clip_period=2),
    dict(energy_quantile=0.25, clip_alpha=0.2, clip_min=0.5, sf_mix=0.6, betas=(0.9, 0.99)),
    dict(clip=False),
]


@pytest.mark.parametrize("shape", [(6, 11), (11, 6), (1, 9)])
@pytest.mark.parametrize("case", range(len(ORACLE_CASES)))
def test_float64_matches_spec_oracle_step_by_step(shape, case):
    hp = ORACLE_CASES[case]
    torch.manual_seed(case)
    w0 = torch.randn(*shape, dtype=torch.float64)
    grads = bursty_grads(9, *shape, seed=case, burst_cols=(0, shape[1] - 1))
    lrs = [0.02, 0.03, 0.01, 0.05, 0.02, 0.02, 0.04, 0.01, 0.03]
    oracle = SpecTrasMuon(w0.numpy(), **hp)
    p = torch.nn.Parameter(w0.clone())
    opt = TrasMuon([p], lr=lrs[0], ns_dtype=torch.float64, **hp)
    for t, g in enumerate(grads):
        opt.param_groups[0]["lr"] = lrs[t]
        p.grad = g.clone()
        opt.step()
        oracle.step(g.numpy(), lrs[t])
        np.testing.assert_allclose(p.detach().numpy(), oracle.w, rtol=1e-11, atol=1e-13,
                                   err_msg=f"step {t + 1}")
    state = opt.state[p]
    np.testing.assert_allclose(state["momentum"].numpy(), oracle.m, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(state["row_v"].numpy(), oracle.v, rtol=1e-11, atol=1e-15)
    if "c_ema" in state:
        np.testing.assert_allclose(state["c_ema"].numpy(), oracle.c_ema, rtol=1e-12)
        np.testing.assert_allclose(state["energy_ref"].item(), oracle.e_ref, rtol=1e-11)
    # The oracle's gate must actually have acted somewhere, or this case tests nothing new.
    if hp.get("clip", True) and shape[1] >= 8 and hp.get("warmup_steps", 0) < 9:
        assert (oracle.applied < 1).any()


def test_spec_defaults():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    g = TrasMuon([p]).param_groups[0]
    expected = dict(
        lr=1e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.0, ns_steps=5, scale=0.2,
        clip=True, clip_alpha=1.0, clip_min=0.7, clip_trigger=3.0, clip_period=4,
        clip_min_cols=8, energy_beta=0.99, energy_quantile=0.5, energy_eps=1e-12,
        clip_beta=0.9, warmup_steps=0, schedule_free=True, sf_mix=0.3,
        energy_source="momentum", nesterov=False, ns_dtype=torch.bfloat16,
        ns_method="standard", ns_restarts=(2,), ns_blocks=(1, 1),
    )
    for key, value in expected.items():
        assert g[key] == value, key
    assert g["ns_coefficients"] == ref.TRASMUON_NS_COEFFICIENTS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_norm_bound_and_gate_range(dtype):
    """||dW||_F <= scale*lr*sqrt(mn) (Lemma C.2) and c in [c_min, 1], every step."""
    d_out, d_in = 12, 20
    grads = bursty_grads(30, d_out, d_in, seed=3, factor=100.0, dtype=dtype)
    p = torch.nn.Parameter(torch.randn(d_out, d_in, dtype=dtype))
    opt = TrasMuon([p], lr=0.05, clip_period=1, clip_min=0.6, clip_trigger=1.5)
    bound = 0.2 * 0.05 * math.sqrt(d_out * d_in)
    slack = 1e-6 if dtype == torch.float32 else 1e-12
    saw_damping = False
    for g in grads:
        before = p.detach().clone()
        p.grad = g
        opt.step()
        delta = (p.detach() - before).norm().item()
        assert delta <= bound * (1 + slack), (delta, bound)
        c = opt.state[p]["c_last"]
        assert (c >= 0.6 - slack).all() and (c <= 1 + slack).all()
        saw_damping |= bool((c < 1).any())
    assert saw_damping


def test_gate_only_damps_columns_of_the_normuon_update():
    """With the same gradients, TrasMuon's step is NorMuon's step times c_j, column by column
    (the gate never feeds back into M, v or eta_hat)."""
    d_out, d_in = 10, 16
    grads = bursty_grads(13, d_out, d_in, seed=4, factor=50.0)
    w0 = torch.randn(d_out, d_in, dtype=torch.float64)
    kw = dict(lr=0.01, ns_dtype=torch.float64)
    _, opt_t, hist_t = run(TrasMuon, w0, grads, **kw)
    _, _, hist_n = run(NorMuon, w0, grads, **kw)
    prev = w0
    gates = []
    p = opt_t.param_groups[0]["params"][0]
    # Replay to read the applied gate per step.
    q = torch.nn.Parameter(w0.clone())
    opt_q = TrasMuon([q], **kw)
    for t, g in enumerate(grads):
        q.grad = g.clone()
        opt_q.step()
        gates.append(opt_q.state[q]["c_last"].clone())
        dt = hist_t[t] - prev
        dn = hist_n[t] - (hist_n[t - 1] if t else w0)
        torch.testing.assert_close(dt, dn * gates[-1][None, :], rtol=1e-12, atol=1e-15)
        prev = hist_t[t]
    assert p is not None and any((c < 1).any() for c in gates)


def test_clip_off_is_normuon_bit_for_bit():
    grads = bursty_grads(12, 9, 14, seed=5, dtype=torch.float32)
    w0 = torch.randn(9, 14)
    _, _, a = run(TrasMuon, w0, grads, lr=0.02, clip=False, weight_decay=0.1)
    _, _, b = run(NorMuon, w0, grads, lr=0.02, weight_decay=0.1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_warmup_covering_the_run_is_normuon_bit_for_bit():
    grads = bursty_grads(12, 9, 14, seed=6, dtype=torch.float32)
    w0 = torch.randn(9, 14)
    _, opt, a = run(TrasMuon, w0, grads, lr=0.02, warmup_steps=12)
    _, _, b = run(NorMuon, w0, grads, lr=0.02)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    state = next(iter(opt.state.values()))
    assert float(state["sf_lr2_sum"]) == 0.0  # no schedule-free accumulation in warmup
    assert torch.equal(state["c_ema"], torch.ones(14))


def test_too_few_columns_means_no_gate_and_normuon():
    grads = bursty_grads(6, 9, 7, seed=7, dtype=torch.float32)
    w0 = torch.randn(9, 7)
    _, opt, a = run(TrasMuon, w0, grads, lr=0.02)  # clip_min_cols = 8 > 7
    _, _, b = run(NorMuon, w0, grads, lr=0.02)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert "c_ema" not in next(iter(opt.state.values()))


def test_gate_ema_moves_only_at_t1_and_multiples_of_the_period():
    grads = bursty_grads(14, 8, 12, seed=8, burst_every=1, factor=40.0)
    p = torch.nn.Parameter(torch.randn(8, 12, dtype=torch.float64))
    opt = TrasMuon([p], lr=0.01, clip_period=4, warmup_steps=0)
    moved = []
    for t, g in enumerate(grads, start=1):
        before = opt.state[p]["c_ema"].clone() if opt.state[p] else torch.ones(12, dtype=torch.float64)
        p.grad = g
        opt.step()
        if not torch.equal(opt.state[p]["c_ema"], before):
            moved.append(t)
    assert moved == [1, 4, 8, 12]


def test_gate_timing_after_warmup():
    grads = bursty_grads(13, 8, 12, seed=9, burst_every=1, factor=40.0)
    p = torch.nn.Parameter(torch.randn(8, 12, dtype=torch.float64))
    opt = TrasMuon([p], lr=0.01, clip_period=3, warmup_steps=4)
    moved, applied_one = [], []
    for t, g in enumerate(grads, start=1):
        before = opt.state[p]["c_ema"].clone() if opt.state[p] else torch.ones(12, dtype=torch.float64)
        p.grad = g
        opt.step()
        if not torch.equal(opt.state[p]["c_ema"], before):
            moved.append(t)
        applied_one.append(bool((opt.state[p]["c_last"] == 1).all()))
    assert moved == [6, 9, 12]
    assert applied_one[:4] == [True] * 4  # c = 1 during warmup
    assert not all(applied_one[5:])


def test_trigger_leaves_quiet_columns_at_one_and_continuous_mode_does_not():
    d_out, d_in = 8, 32
    g = torch.randn(d_out, d_in, dtype=torch.float64)
    g[:, [3, 17]] *= 100.0
    for trigger in (3.0, None):
        p = torch.nn.Parameter(torch.zeros(d_out, d_in, dtype=torch.float64))
        opt = TrasMuon([p], lr=0.01, schedule_free=False, clip_beta=0.0, clip_trigger=trigger,
                       clip_alpha=0.05, clip_min=0.1)
        p.grad = g
        opt.step()
        c = opt.state[p]["c_ema"]  # clip_beta = 0: c_ema is this step's gate
        if trigger is None:
            assert (c < 1).sum() > 20  # continuous: any r > 0 damps
        else:
            quiet = [j for j in range(d_in) if j not in (3, 17)]
            assert torch.equal(c[quiet], torch.ones(d_in - 2, dtype=torch.float64))
        assert c[3] < 0.9 and c[17] < 0.9


def test_schedule_free_accumulates_current_lr_squared_after_warmup():
    d_out, d_in = 6, 10
    grads = bursty_grads(10, d_out, d_in, seed=10, factor=20.0)
    lrs = [0.1, 0.05, 0.2, 0.02, 0.07, 0.3, 0.01, 0.04, 0.06, 0.09]
    p = torch.nn.Parameter(torch.randn(d_out, d_in, dtype=torch.float64))
    opt = TrasMuon([p], lr=lrs[0], warmup_steps=2, clip_period=1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lrs[min(i, 9)] / lrs[0])
    s_expected = 0.0
    c_expected = torch.zeros(d_in, dtype=torch.float64)
    c_last = torch.ones(d_in, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(lrs[t - 1])
        p.grad = g
        opt.step()
        sched.step()
        if t > 2:
            s_expected += lr * lr
            c_expected += lr * lr * c_last
        c_last = opt.state[p]["c_last"].clone()
        assert float(opt.state[p]["sf_lr2_sum"]) == pytest.approx(s_expected, rel=1e-12)
        torch.testing.assert_close(opt.state[p]["sf_c_lr2_sum"], c_expected, rtol=1e-12, atol=0)
    assert (c_expected / s_expected < 1).any()


def test_energy_ref_is_first_quantile_then_an_ema_every_step_even_in_warmup():
    d_out, d_in = 5, 9
    grads = bursty_grads(4, d_out, d_in, seed=11)
    p = torch.nn.Parameter(torch.randn(d_out, d_in, dtype=torch.float64))
    opt = TrasMuon([p], warmup_steps=10, betas=(0.5, 0.95), energy_beta=0.9)
    m = torch.zeros(d_out, d_in, dtype=torch.float64)
    e_ref = None
    for g in grads:
        p.grad = g
        opt.step()
        m = 0.5 * m + 0.5 * g
        e_cur = torch.sort((m * m).sum(0)).values[ref.quantile_rank(d_in, 0.5) - 1]
        e_ref = e_cur if e_ref is None else 0.9 * e_ref + 0.1 * e_cur
        assert float(opt.state[p]["energy_ref"]) == pytest.approx(float(e_ref), rel=1e-12)


def test_zero_gradients_and_zero_columns_give_no_nan():
    for cls in (TrasMuon, NorMuon, Muon):
        p = torch.nn.Parameter(torch.randn(6, 12))
        opt = cls([p], lr=0.1)
        p.grad = torch.zeros(6, 12)
        opt.step()
        g = torch.randn(6, 12)
        g[:, :5] = 0.0
        g[2, :] = 0.0
        p.grad = g
        opt.step()
        assert torch.isfinite(p).all(), cls.__name__
        for key, value in opt.state[p].items():
            assert torch.isfinite(value).all(), (cls.__name__, key)


def test_nesterov_feeds_the_blend_to_newton_schulz_but_energy_uses_momentum():
    grads = bursty_grads(3, 6, 10, seed=12)
    w0 = torch.randn(6, 10, dtype=torch.float64)
    _, _, a = run(TrasMuon, w0, grads, lr=0.01, nesterov=True, ns_dtype=torch.float64)
    _, _, b = run(TrasMuon, w0, grads, lr=0.01, nesterov=False, ns_dtype=torch.float64)
    assert not torch.equal(a[-1], b[-1])


@pytest.mark.parametrize("cls", [TrasMuon, NorMuon, Muon, NAMO, NAMOD])
def test_gram_newton_schulz_option_follows_the_same_trajectory_in_float64(cls):
    """ns_method="gram-always" (and "gram" on a wide matrix) is the same polynomial: in
    float64 every step agrees with the standard iteration to rounding; in bf16 it is another
    rounding, so the weights differ (the option is taken)."""
    shapes = [(5, 23), (23, 5), (9, 9)]
    grads = [[torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
              for s in shapes] for t in range(4)]

    def run(dtype, **kw):
        ps = [torch.nn.Parameter(torch.ones(s, dtype=dtype)) for s in shapes]
        opt = cls(ps, lr=0.02, ns_dtype=dtype if dtype == torch.float64 else torch.bfloat16, **kw)
        for gs in grads:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.to(dtype)
            opt.step()
        return [p.detach() for p in ps], opt

    std, _ = run(torch.float64)
    for method in ("gram", "gram-always"):
        for restarts in ((), (2,), (1, 3)):
            got, opt = run(torch.float64, ns_method=method, ns_restarts=restarts)
            for a, b in zip(got, std, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
            assert opt.state_dict()["param_groups"][0]["ns_restarts"] == restarts
    low_std, _ = run(torch.float32)
    low_gram, _ = run(torch.float32, ns_method="gram")
    assert not torch.equal(low_gram[0], low_std[0])  # 5 x 23: the Gram form pays
    assert torch.equal(low_gram[2], low_std[2])  # square: "gram" keeps the standard form


def test_checkpoints_without_the_ns_method_keys_load_with_the_defaults():
    p = torch.nn.Parameter(torch.randn(4, 12))
    opt = TrasMuon([p], ns_method="gram", ns_restarts=(1,))
    p.grad = torch.randn(4, 12)
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["ns_method"] == "gram"
    for key in ("ns_method", "ns_restarts"):
        del sd["param_groups"][0][key]
    opt2 = TrasMuon([p], ns_method="gram")
    opt2.load_state_dict(sd)
    # A group is restored as saved, missing keys taking the loading optimizer's defaults.
    assert opt2.param_groups[0]["ns_method"] == "gram"
    assert opt2.param_groups[0]["ns_restarts"] == (2,)
